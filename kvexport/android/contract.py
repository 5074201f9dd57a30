"""What the Android demo app expects of a program (layout version 1), and
readers that extract the actual I/O contract from a program directory.

The Kotlin side holds the same expectations in
``android_demo/app/src/main/java/org/kvexport/demo/core/ProgramContract.kt``;
the JVM test ``ContractTest.bundledContractIsAccepted`` parses a contract
written here, so the two cannot drift apart silently.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from kvexport.errors import KvxError
from kvexport.fsutil import read_json
from kvexport.kv import stats as kv_stats

LAYOUT_VERSION = 1
METADATA_METHODS = (
    "get_max_context_len",
    "get_max_seq_len",
    "get_vocab_size",
    "get_bos_id",
    "get_n_layers",
    "get_layout_version",
    "get_eos_ids",
)
FORWARD_INPUTS = (("tokens", "int64"), ("input_pos", "int64"))
FORWARD_OUTPUTS = (("logits", "float32"), ("kv_stats", "float32"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

# ExecuTorch ScalarType codes -> names used in the contract
_SCALAR = {
    0: "uint8",
    1: "int8",
    2: "int16",
    3: "int32",
    4: "int64",
    5: "float16",
    6: "float32",
    7: "float64",
    11: "bool",
    15: "bfloat16",
}


class ContractError(ValueError):
    """A program directory does not match what the app expects (one-line message)."""

    def __init__(self, msg: str):
        super().__init__(msg.replace("\n", " "))


@dataclass
class ProgramInfo:
    program_dir: Path
    pte: Path
    manifest: dict
    methods: list[str]
    forward_inputs: list[dict]
    forward_outputs: list[dict]
    metadata: dict
    ops_mode: str
    warnings: list[str] = field(default_factory=list)


def find_pte(program_dir: Path, manifest: dict) -> Path:
    for key in ("program", "pte", "program_file"):
        if isinstance(manifest.get(key), str) and (program_dir / manifest[key]).is_file():
            return program_dir / manifest[key]
    ptes = sorted(program_dir.glob("*.pte"))
    if len(ptes) != 1:
        raise ContractError(f"{program_dir}: expected exactly one .pte file, found {len(ptes)}")
    return ptes[0]


def _manifest_metadata(manifest: dict) -> dict:
    """Metadata values from the manifest, accepting `metadata: {get_x: v}` or `{x: v}` or top-level keys."""
    out = {}
    md = manifest.get("metadata") if isinstance(manifest.get("metadata"), dict) else {}
    for m in METADATA_METHODS:
        short = m[len("get_") :]
        for src in (md, manifest):
            for k in (m, short):
                if k in src and not isinstance(src[k], dict):
                    out.setdefault(m, src[k])
    if "get_layout_version" not in out and "layout_version" in manifest:
        out["get_layout_version"] = manifest["layout_version"]
    return out


def _manifest_methods(manifest: dict) -> list[str] | None:
    m = manifest.get("methods")
    if isinstance(m, dict):
        return list(m)
    if isinstance(m, list):
        return [x if isinstance(x, str) else x.get("name") for x in m]
    return None


def read_program(program_dir) -> ProgramInfo:
    """Read manifest + program; raise ContractError (one line) on any mismatch with the app."""
    program_dir = Path(program_dir)
    manifest = read_json(
        program_dir / "manifest.json",
        f"{program_dir}: no manifest.json",
        "{path}: invalid JSON ({reason})",
        ContractError,
    )
    if not isinstance(manifest, dict):
        raise ContractError(f"{program_dir / 'manifest.json'}: not a JSON object")
    pte = find_pte(program_dir, manifest)
    for f in TOKENIZER_FILES:
        if not (program_dir / f).is_file():
            raise ContractError(f"{program_dir}: tokenizer file {f} missing")
    from kvexport.export.executorch import check_pte_header
    from kvexport.export.manifest import verify_hashes

    try:  # the runtime aborts the process on some corrupt programs: hashes and header first
        verify_hashes(program_dir, manifest)
        check_pte_header(pte)
    except KvxError as err:
        raise ContractError(str(err)) from None

    from executorch.runtime import Runtime  # heavy import, only when needed

    try:
        prog = Runtime.get().load_program(str(pte))
    except Exception as e:  # noqa: BLE001
        raise ContractError(f"{pte}: ExecuTorch cannot load the program ({type(e).__name__}: {e})") from None
    methods = sorted(prog.method_names)
    missing = [m for m in ("forward", *METADATA_METHODS) if m not in methods]
    if missing:
        raise ContractError(f"{pte.name}: missing methods {missing} (app needs forward + {list(METADATA_METHODS)})")
    man_methods = _manifest_methods(manifest)
    if man_methods is not None and set(man_methods) - set(methods):
        raise ContractError(f"manifest lists methods {sorted(set(man_methods) - set(methods))} that the program lacks")

    meta = prog.metadata("forward")
    ins = [meta.input_tensor_meta(i) for i in range(meta.num_inputs())]
    outs = [meta.output_tensor_meta(i) for i in range(meta.num_outputs())]

    metadata = {}
    for m in METADATA_METHODS:
        res = prog.load_method(m).execute([])
        vals = [int(v.item()) if hasattr(v, "item") else int(v) for v in res]
        metadata[m] = vals if m == "get_eos_ids" else (vals[0] if len(vals) == 1 else None)
        if metadata[m] is None:
            raise ContractError(f"{m} returned {len(vals)} values, expected one int64")

    def io(infos, want, kind):
        if len(infos) != len(want):
            raise ContractError(
                f"forward has {len(infos)} {kind}, app expects {len(want)} ({', '.join(n for n, _ in want)})"
            )
        rows = []
        for ti, (name, dt) in zip(infos, want):
            got = _SCALAR.get(int(ti.dtype()), f"scalar_type_{int(ti.dtype())}")
            if got != dt:
                raise ContractError(f"forward {kind[:-1]} {name} is {got}, app expects {dt}")
            rows.append({"name": name, "dtype": dt, "shape": list(ti.sizes())})
        return rows

    fin = io(ins, FORWARD_INPUTS, "inputs")
    fout = io(outs, FORWARD_OUTPUTS, "outputs")
    V = metadata["get_vocab_size"]
    if len(fin[0]["shape"]) != 2 or fin[0]["shape"][0] != 1:
        raise ContractError(f"forward tokens shape {fin[0]['shape']}, app expects [1, T]")
    if fin[1]["shape"] != [1]:
        raise ContractError(f"forward input_pos shape {fin[1]['shape']}, app expects [1]")
    if fout[0]["shape"] != [1, V]:
        raise ContractError(f"forward logits shape {fout[0]['shape']}, app expects [1, {V}]")
    if fout[1]["shape"] != [len(kv_stats.FIELDS)]:
        raise ContractError(f"forward kv_stats shape {fout[1]['shape']}, app expects [{len(kv_stats.FIELDS)}]")
    if metadata["get_layout_version"] != LAYOUT_VERSION:
        raise ContractError(f"program layout version {metadata['get_layout_version']}, app expects {LAYOUT_VERSION}")
    if fin[0]["shape"][1] < metadata["get_max_seq_len"]:
        raise ContractError(
            f"forward tokens take at most {fin[0]['shape'][1]} ids but get_max_seq_len is {metadata['get_max_seq_len']}"
        )
    fin[0]["shape"] = [1, "T"]
    fin[0]["max_T"] = metadata["get_max_seq_len"]

    for k, v in _manifest_metadata(manifest).items():
        pv = metadata[k]
        if (sorted(v) if isinstance(v, list) else v) != (sorted(pv) if isinstance(pv, list) else pv):
            raise ContractError(f"manifest says {k}={v} but the program returns {pv}")

    ops_mode = manifest.get("ops_mode")
    if ops_mode not in ("fused", "portable"):
        raise ContractError(f"manifest ops_mode is {ops_mode!r}, expected 'fused' or 'portable'")
    info = ProgramInfo(program_dir, pte, manifest, methods, fin, fout, metadata, ops_mode)
    if ops_mode == "fused":
        info.warnings.append(
            "ops_mode=fused: the stock executorch-android runtime lacks the kvexport:: kernels; "
            "the app needs a custom runtime build (see android_demo/README.md)"
        )
    return info


# ------------------------------------------------------------------ chat template
CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"


def render_chatml(messages: list[dict], default_system: str | None, add_generation_prompt: bool = True) -> str:
    """Python twin of ChatTemplate.kt."""
    s = ""
    if default_system is not None and messages and messages[0]["role"] != "system":
        s += f"{CHATML_START}system\n{default_system}{CHATML_END}\n"
    for m in messages:
        s += f"{CHATML_START}{m['role']}\n{m['content']}{CHATML_END}\n"
    if add_generation_prompt:
        s += f"{CHATML_START}assistant\n"
    return s


def render_jinja(template: str, messages: list[dict], add_generation_prompt: bool = True) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # same environment options as transformers' apply_chat_template
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token="", eos_token=""
    )


def chat_default_system(program_dir) -> str | None:
    """Default system text of the program's chat_template.jinja, after checking it renders as ChatML."""
    tpl = (Path(program_dir) / "chat_template.jinja").read_text()
    probe = [{"role": "user", "content": "Hi there"}]
    rendered = render_jinja(tpl, probe)
    m = re.match(re.escape(CHATML_START) + r"system\n(.*?)" + re.escape(CHATML_END) + "\n", rendered, re.S)
    default = m.group(1) if m else None
    cases = [
        probe,
        [{"role": "system", "content": "S"}, {"role": "user", "content": "a\nb"}],
        [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}, {"role": "user", "content": "3"}],
    ]
    for msgs in cases:
        for gen in (True, False):
            want = render_jinja(tpl, msgs, gen)
            got = render_chatml(msgs, default, gen)
            if want != got:
                raise ContractError(
                    f"chat_template.jinja does not render as the app's ChatML template "
                    f"(jinja {want[:60]!r}... vs app {got[:60]!r}...)"
                )
    return default


def check_tokenizer(program_dir) -> None:
    """Reject tokenizer.json features the app's Kotlin tokenizer does not implement."""
    tj = json.loads((Path(program_dir) / "tokenizer.json").read_text())
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise ContractError(f"tokenizer model {model.get('type')!r}; the app implements byte-level BPE only")

    def pre_types(p):
        if not p:
            return []
        if p["type"] == "Sequence":
            return [t for q in p["pretokenizers"] for t in pre_types(q)]
        return [p["type"]]

    pts = pre_types(tj.get("pre_tokenizer"))
    if "ByteLevel" not in pts or set(pts) - {"ByteLevel", "Digits"}:
        raise ContractError(f"tokenizer pre-tokenizers {pts}; the app implements ByteLevel (+ Digits)")
    norm = tj.get("normalizer")
    if norm and not (norm.get("type") == "Sequence" and not norm.get("normalizers")):
        raise ContractError(f"tokenizer normalizer {norm.get('type')!r} is not implemented by the app")
