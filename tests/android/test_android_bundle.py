"""kvexport.android.bundle: staging a program into the app's assets + contract validation."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from kvx_android_helpers import copy_demo

from kvexport.android.bundle import BundleError, bundle
from kvexport.android.contract import ContractError, render_chatml, render_jinja

pytestmark = pytest.mark.android


def test_bundle_copies_program_tokenizer_and_contract(bundled_app, program_dir):
    app, res = bundled_app
    assets = app / "app/src/main/assets"
    assert res.assets_dir == assets
    for f in res.files:
        assert (assets / f).is_file(), f
    c = json.loads((assets / "io_contract.json").read_text())
    pte = c["program"]
    assert (assets / pte).read_bytes() == (program_dir / pte).read_bytes()
    assert c["layout_version"] == 1
    fwd = c["methods"]["forward"]
    assert [(i["name"], i["dtype"]) for i in fwd["inputs"]] == [("tokens", "int64"), ("input_pos", "int64")]
    assert [(o["name"], o["dtype"]) for o in fwd["outputs"]] == [("logits", "float32"), ("kv_stats", "float32")]
    md = c["metadata"]
    assert fwd["outputs"][0]["shape"] == [1, md["get_vocab_size"]]
    assert fwd["inputs"][0]["max_T"] == md["get_max_seq_len"] >= 1
    assert md["get_layout_version"] == 1 and md["get_eos_ids"]
    # metadata really comes from the program: compare with a direct runtime call
    from executorch.runtime import Runtime
    prog = Runtime.get().load_program(str(program_dir / pte))
    assert md["get_max_context_len"] == int(prog.load_method("get_max_context_len").execute([])[0])
    assert c["chat"]["default_system"]  # extracted from chat_template.jinja
    msgs = [{"role": "user", "content": "x"}]
    tpl = (assets / "chat_template.jinja").read_text()
    assert render_jinja(tpl, msgs) == render_chatml(msgs, c["chat"]["default_system"])


def test_bundle_replaces_stale_assets(tmp_path, program_dir):
    app = copy_demo(tmp_path / "demo")
    stale = app / "app/src/main/assets/old.pte"
    stale.parent.mkdir(parents=True)
    stale.write_text("x")
    bundle(program_dir, app)
    assert not stale.exists()


def _broken(tmp_path, program_dir, edit):
    d = tmp_path / "prog"
    shutil.copytree(program_dir, d)
    edit(d)
    return d


def _manifest_edit(**kv):
    def edit(d):
        m = json.loads((d / "manifest.json").read_text())
        for k, v in kv.items():
            if v is None:
                m.pop(k, None)
            else:
                m[k] = v
        (d / "manifest.json").write_text(json.dumps(m))
    return edit


def _file_edit(name, data: bytes, rehash=True):
    """Replace a program or tokenizer file; ``rehash``: record its new SHA-256 in the manifest, so
    the check under test is the contract's, not the hash check (which ``rehash=False`` exercises)."""
    def edit(d):
        (d / name).write_bytes(data)
        m = json.loads((d / "manifest.json").read_text())
        for table in (m.get("program_files", {}), m.get("tokenizer", {}).get("sha256", {})):
            if rehash and name in table:
                table[name] = hashlib.sha256(data).hexdigest()
        (d / "manifest.json").write_text(json.dumps(m))
    return edit


@pytest.mark.parametrize("edit, fragment", [
    (_manifest_edit(metadata={"get_layout_version": 2}), "get_layout_version=2"),
    (_manifest_edit(metadata={"get_max_seq_len": 999}), "get_max_seq_len=999"),
    (_manifest_edit(ops_mode="turbo"), "ops_mode"),
    (_manifest_edit(methods=["forward", "get_kv_histogram"]), "get_kv_histogram"),
    (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json missing"),
    (_file_edit("chat_template.jinja", b"{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"),
     "ChatML"),
    (_file_edit("tokenizer.json", json.dumps({"model": {"type": "WordPiece"}}).encode()), "WordPiece"),
    (_file_edit("tokenizer.json", json.dumps({"model": {"type": "WordPiece"}}).encode(), rehash=False),
     "does not match its manifest"),
    (_file_edit("model.pte", b"not a program"), "cannot load"),
    (_file_edit("model.pte", b"not a program", rehash=False), "does not match its manifest"),
])
def test_bundle_rejects_mismatches_with_one_line_error(tmp_path, program_dir, edit, fragment):
    prog = _broken(tmp_path, program_dir, edit)
    app = copy_demo(tmp_path / "demo")
    with pytest.raises(BundleError) as ei:
        bundle(prog, app)
    msg = str(ei.value)
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, ContractError)
    assert "\n" not in msg and fragment in msg, msg
    assert not (app / "app/src/main/assets/io_contract.json").exists()


def test_bundle_rejects_wrong_input_dtype(tmp_path, int32_program_dir):
    app = copy_demo(tmp_path / "demo")
    with pytest.raises(BundleError, match="forward input tokens is int32, app expects int64"):
        bundle(int32_program_dir, app)


def test_bundle_requires_the_demo_project(tmp_path, program_dir):
    with pytest.raises(BundleError, match="not the android_demo project"):
        bundle(program_dir, tmp_path)


def test_fused_program_bundles_with_warning(tmp_path, program_dir):
    prog = _broken(tmp_path, program_dir, _manifest_edit(ops_mode="fused"))
    res = bundle(prog, copy_demo(tmp_path / "demo"))
    assert any("custom runtime" in w for w in res.warnings)
    assert "warning:" in res.summary()
