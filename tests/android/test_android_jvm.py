"""JVM unit tests of the Kotlin core + ExecuTorch adapter (real org.pytorch.executorch Tensor/EValue),
and parity of the Kotlin tokenizer / decode loop with the Python tokenizer / ExecuTorch runtime."""

from __future__ import annotations

import json
import re

import pytest

from kvexport.android.jvm import junit_classes, run_junit, run_parity

pytestmark = pytest.mark.android

CORPUS = [
    "Hello world",
    "Hello, world! How are you today?",
    "  two  spaces, then three   and a tab\tend",
    "trailing spaces   ",
    "   leading spaces",
    "line one\nline two\n\n\nafter blank lines\r\nwindows",
    "digits 0123456789 and 3.14159 and 1,000,000 and -42",
    "emoji 😀👍🏽🇫🇷 family 👨‍👩‍👧 end",
    "unicode: café naïve Ångström Ελληνικά русский 日本語のテキスト 한국어 العربية עברית हिन्दी",
    "mixed scripts: abcабв123٣٤٥",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) { x[i] = y[i] * 2; }  // C code",
    '{"json": [1, 2.5, null], "key": "value"}',
    "I'm sure they'll say it's what we'd've done, don't you think? 'S' 'T",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>glued<|endoftext|>tokens <|im_start|>",
    "<repo_name>kvexport<file_sep>src/main.py",
    "not special: <|im_start |> <im_start> <|unknown|>",
    "symbols ~!@#$%^&*()_+-=[]{}|;':\",./<>? ‰ € £ ¥ © ® ™",
    "whitespace variety:\u00a0nbsp\u2003emsp\u3000ideographic\u2028linesep",
    # runs of (unicode) whitespace before a word exercise \s+(?!\S) vs \s+
    "a \u3000b x\u3000\u3000y \u00a0\u00a0word  \u2003 z\u2028\u2028q tab\t\t\tx \u0085\u0085n \u200a\u200av",
    "ends with unicode spaces\u3000\u3000",
    "zero width\u200bjoiner\u200dand combining e\u0301",
    "",
    " ",
    "\n",
    "a",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]


def test_junit_core_and_adapter(jvm_build, bundled_app):
    app, _ = bundled_app
    contract = app / "app/src/main/assets/io_contract.json"
    classes = junit_classes(jvm_build)
    assert {"org.kvexport.demo.core.GeneratorTest", "org.kvexport.demo.et.ExecuTorchBackendTest",
            "org.kvexport.demo.core.BpeTokenizerTest"} <= set(classes)
    r = run_junit(jvm_build, {"kvexport.contract": contract})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    m = re.search(r"OK \((\d+) tests\)", out)
    assert m and int(m.group(1)) >= 30, out[-3000:]


def test_junit_failures_are_reported(jvm_build, tmp_path):
    """The harness must see a failing Kotlin test: a contract with layout version 2 fails bundledContractIsAccepted."""
    bad = tmp_path / "io_contract.json"
    bad.write_text(json.dumps({"layout_version": 2}))
    r = run_junit(jvm_build, {"kvexport.contract": bad}, ["org.kvexport.demo.et.ContractTest"])
    assert r.returncode != 0 and "Failures: 1" in r.stdout, r.stdout[-3000:]


def test_tokenizer_parity_with_python(jvm_build, program_dir, tmp_path):
    from tokenizers import Tokenizer
    tj = program_dir / "tokenizer.json"
    tok = Tokenizer.from_file(str(tj))
    corpus = CORPUS + [" ".join(CORPUS)]
    items = [{"text": s, "py_ids": tok.encode(s, add_special_tokens=False).ids} for s in corpus]
    # ids that are not a canonical encoding: decode must still agree (split emoji bytes, specials, raw bytes)
    items.append({"text": "", "py_ids": [10813, 242, 1, 2, 0, 198, 216, 216]})
    items.append({"text": "", "py_ids": list(range(0, 300, 7)) + list(range(49000, tok.get_vocab_size(), 13))})
    (tmp_path / "in.json").write_text(json.dumps(items))
    r = run_parity(jvm_build, "encode", tj, tmp_path / "in.json", tmp_path / "out.json")
    assert r.returncode == 0, r.stderr[-4000:]
    got = json.loads((tmp_path / "out.json").read_text())
    assert len(got) == len(items)
    problems = []
    for it, g in zip(items, got):
        s, ids = it["text"], it["py_ids"]
        if s or not ids:
            pre = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(s)]
            if g["pre_tokens"] != pre:
                problems.append(f"pre-tokenize {s!r}: kotlin {g['pre_tokens']} python {pre}")
            if g["ids"] != ids:
                problems.append(f"encode {s!r}: kotlin {g['ids']} python {ids}")
            want_sp = tok.encode(s, add_special_tokens=True).ids
            if g["ids_special"] != want_sp:
                problems.append(f"encode+special {s!r}: kotlin {g['ids_special']} python {want_sp}")
        if g["decode_py_ids"] != tok.decode(ids):
            problems.append(f"decode {ids[:12]}: kotlin {g['decode_py_ids']!r} python {tok.decode(ids)!r}")
        keep = tok.decode(ids, skip_special_tokens=False)
        if g["decode_py_ids_keep_special"] != keep:
            problems.append(f"decode(keep) {ids[:12]}: kotlin {g['decode_py_ids_keep_special']!r} python {keep!r}")
        pref = [tok.decode(ids[:k]) for k in range(len(ids) + 1)]
        if g["decode_prefixes"] != pref:
            problems.append(f"prefix decodes of {s!r} differ")
    assert not problems, "\n".join(p if len(p) < 400 else p[:400] + "..." for p in problems[:20])


def test_replay_decode_loop_against_executorch(jvm_build, program_dir, tmp_path):
    from kvexport.android.replay import record_greedy
    rec = record_greedy(program_dir, [{"role": "user", "content": "Write a haiku about caches 🧠 in 3 lines."}],
                        max_new_tokens=20)
    assert rec["generated"], "the program produced no tokens"
    (tmp_path / "rec.json").write_text(json.dumps(rec))
    r = run_parity(jvm_build, "replay", program_dir / "tokenizer.json", tmp_path / "rec.json", tmp_path / "out.json")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    k = json.loads((tmp_path / "out.json").read_text())
    assert k["prompt_text"] == rec["prompt_text"]
    assert k["prompt_ids"] == rec["prompt_ids"]
    assert k["calls"] == [{"tokens": c["tokens"], "pos": c["pos"]} for c in rec["calls"]]
    assert k["generated"] == rec["generated"]
    assert k["stop_reason"] == rec["stop_reason"]
    assert k["text"] == rec["text"]
    assert k["streamed"] == rec["text"].rstrip("\ufffd")
    last = rec["calls"][-1]["kv_stats"]
    assert k["kv_stats_last"] == pytest.approx([last[0], last[1], last[2], last[7]])
