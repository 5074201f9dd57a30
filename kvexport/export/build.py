"""``kvexport build``: load -> transform -> export -> lower -> serialize, into ``graphs/<name>/``.

The output directory holds the program, ``manifest.json`` and the tokenizer files. It is written
to a temporary sibling directory and renamed only when complete. An existing directory there is
replaced only when it is a kvexport program built from the same model and options (a rebuild), or
with ``force`` when it is a kvexport program built otherwise; anything else is refused before the
model is touched. Default names (:func:`default_name`) encode every option that changes the program.

:func:`kvexport.export.manifest.read_manifest` checks what this writes, each time a command opens a program.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from importlib import metadata as importlib_metadata
from pathlib import Path

from kvexport.errors import KvxError
from kvexport.export.manifest import LAYOUT_VERSION
from kvexport.export.program import StepProgram, metadata_methods
from kvexport.fsutil import atomic_directory, check_replaceable, sha256_file
from kvexport.kv import quant
from kvexport.kv import stats as kv_stats
from kvexport.kv.policy import CLASSES
from kvexport.models.formats import TORCHAO_FORMATS
from kvexport.models.loader import LoadedModel
from kvexport.models.tokenizer import TOKENIZER_FILES
from kvexport.session import CacheOptions, build_cache

TARGETS = ("executorch", "onnx", "ort")
WEIGHT_FORMATS = {"executorch": TORCHAO_FORMATS, "onnx": ("fp32", "int8", "int4", "q4"),
                  "ort": ("fp32", "int8", "int4", "q4")}
# The default for a model that holds the GGUF's codes (the embedded default model): its 4-bit linears exactly,
# and the tied table stored once where the target can (ExecuTorch ``q4-q8``: the Q8_0 table read by the lookup
# and, through kvexport::q8_linear, by the lm_head; ONNX's ``q4``: the lm_head's 8-bit codes read by the
# lookup). A stock ExecuTorch runtime (``--ops portable``) has no q8_linear: ``q4-h8`` there (Q8_0 lookup + an
# int8 per-channel lm_head on XNNPACK, the table twice). ``kvexport build`` falls back to fp32 for other models
# (re-quantizing float weights to 4 bits costs quality: say ``--weights`` to ask for it).
DEFAULT_WEIGHTS = {"executorch": "q4-q8", "onnx": "q4", "ort": "q4"}
PORTABLE_WEIGHTS = {"q4-q8": "q4-h8"}  # a kernel format -> what a portable program of the same model uses


def default_weights(target: str, ops: str) -> str:
    """``build``'s weights for a model holding the GGUF's codes, by target and ops mode."""
    weights = DEFAULT_WEIGHTS[target]
    return PORTABLE_WEIGHTS.get(weights, weights) if ops == "portable" else weights


OPS_MODES = ("fused", "portable")


def default_ops(target: str) -> str:
    """``build``'s ops mode by target: our kernels (``fused``), except for ``.ort`` programs, whose ORT Mobile
    runtime is usually a stock (reduced) build without our custom-op library: ``portable`` there."""
    return "portable" if target == "ort" else "fused"


def tokenizer_files(tokenizer) -> list[Path]:
    return [tokenizer.directory / f for f in TOKENIZER_FILES if (tokenizer.directory / f).is_file()]


def copy_tokenizer(tokenizer, out_dir: Path) -> None:
    """The tokenizer files a program directory carries (the app and ``kvexport run`` read them)."""
    for src in tokenizer_files(tokenizer):
        shutil.copy(src, out_dir / src.name)


def tokenizer_entry(tokenizer) -> dict:
    """Manifest ``tokenizer``: file names and their SHA-256."""
    hashes = {p.name: sha256_file(p) for p in tokenizer_files(tokenizer)}
    return {"files": sorted(hashes), "sha256": hashes}


def default_name(loaded: LoadedModel, opts: CacheOptions, target: str, ops: str, weights: str) -> str:
    """``<model>-<policy>[-b<budget>]-w<window>-s<sinks>-g<group>[-norot][-novrot][-seed<seed>][-clip-<spec>]``
    ``[-<classes>]-ctx<N>-<weights>-<ops>-<target>`` (``<classes>``: the split ones of ``--kv-classes``, e.g. ``k4v2``):
    every option that changes the program (budget only where it picks the controller)."""
    policy = re.sub(r"[^A-Za-z0-9_+=-]", "_", opts.policy.replace(":", "-").replace(",", "_").replace(".", "p"))
    default = CacheOptions()
    budget = f"-b{opts.budget_bits:g}".replace(".", "p") if opts.policy == "learned" and opts.budget_bits else ""
    clip = "" if opts.clip == default.clip else "-clip-" + re.sub(r"[^A-Za-z0-9]", "", opts.clip.replace(".", "p"))
    split = [c for c in quant.classes_spec(quant.parse_classes(opts.classes)).split(",") if c[1] != c[3]]
    classes = "".join(f"-{c}" for c in split)
    return (f"{loaded.name}-{policy}{budget}-w{opts.window}-s{opts.sinks}-g{opts.group or loaded.args.head_dim}"
            f"{'' if opts.rotate_keys else '-norot'}{'' if opts.rotate_values else '-novrot'}"
            f"{f'-seed{opts.seed}' if opts.seed != default.seed else ''}{clip}"
            f"{classes}"
            f"-ctx{opts.max_context}-{weights}-{ops}-{target}")


def build_identity(manifest: dict) -> dict:
    """What decides a program: model, cache options, target, ops mode, weights."""
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    cache = manifest.get("cache") if isinstance(manifest.get("cache"), dict) else {}
    return {"model": [model.get("name"), model.get("identity")], "cache_options": manifest.get("cache_options"),
            "max_context": cache.get("max_context"), **{k: manifest.get(k) for k in ("target", "ops_mode", "weights")}}


def existing_program(path: Path) -> dict | None:
    """The manifest of ``path`` when it is a kvexport program directory (by its manifest), else None."""
    try:
        manifest = json.loads((Path(path) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == "kvexport-program" else None


def replaceable_program(identity: dict, force: bool):
    """``replaceable(path)`` for :func:`~kvexport.fsutil.atomic_directory`: a kvexport program built
    with ``identity`` (a rebuild), or any kvexport program with ``force``."""
    def replaceable(path: Path) -> bool:
        manifest = existing_program(path)
        if manifest is None:
            return False
        if not force and build_identity(manifest) != identity:
            raise KvxError(f"{path} holds a program built with other options; choose another --name, "
                           "or pass --force to replace it")
        return True
    return replaceable


def versions() -> dict:
    out = {}
    for pkg in ("kvexport", "torch", "executorch", "torchao", "onnx", "onnxscript", "onnxruntime"):
        try:
            out[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _io_signature(step: StepProgram) -> dict:
    vocab = step.model.args.vocab_size
    return {
        "forward": {
            "inputs": [
                {"name": "tokens", "dtype": "int64", "shape": [1, f"T<={step.cache.max_chunk}"]},
                {"name": "input_pos", "dtype": "int64", "shape": [1]},
            ],
            "outputs": [
                {"name": "logits", "dtype": "float32", "shape": [1, vocab]},
                {"name": "kv_stats", "dtype": "float32", "shape": [len(kv_stats.FIELDS)],
                 "fields": list(kv_stats.FIELDS)},
            ],
        }
    }


def manifest_for(loaded: LoadedModel, opts: CacheOptions, step: StepProgram, target: str, ops: str, weights: str,
                 out_dir: Path, written: dict, metadata: dict, build_seconds: float) -> dict:
    """``written``: what the target's writer returned for the files it put in ``out_dir``."""
    cache = step.cache
    policy = cache.policy.describe()
    ctrl = policy.get("controller")
    return {
        "format": "kvexport-program",
        "layout_version": LAYOUT_VERSION,
        "target": target,
        "program": written["program"],
        "program_files": {f: sha256_file(out_dir / f) for f in written["files"]},
        **{k: v for k, v in written.items() if k not in ("program", "files")},
        "ops_mode": ops,
        "weights": weights,
        "model": {"name": loaded.name, "source": loaded.source, "identity": loaded.identity,
                  "args": {k: getattr(loaded.args, k) for k in loaded.args.__dataclass_fields__}},
        "tokenizer": tokenizer_entry(loaded.tokenizer),
        "methods": {**_io_signature(step), **{k: {"constant": v} for k, v in metadata.items()}},
        "metadata": metadata,
        "cache_options": opts.to_dict(),
        "cache": {**cache.layout.to_dict(), "max_chunk": cache.max_chunk, "kv_bytes_allocated": cache.nbytes(),
                  "class_bits_per_element": dict(zip(map(str, CLASSES), _class_bits(cache))),
                  "class_names": cache.layout.class_names(),
                  "state": {n: {"shape": list(b.shape), "dtype": str(b.dtype).removeprefix("torch.")}
                            for n, b in cache.state_buffers().items()}},
        "policy": {"spec": opts.policy, **{k: v for k, v in policy.items() if k != "meta"},
                   "controller_sha256": sha256_file(Path(ctrl)) if ctrl else None},
        "versions": versions(),
        "build_seconds": round(build_seconds, 1),
    }


def _class_bits(cache) -> list[float]:
    per_elem = cache.layout.elements_per_token()
    return [8 * b / per_elem for b in cache.layout.class_bytes_per_token()]


def build(loaded: LoadedModel, opts: CacheOptions, target: str, ops: str, weights: str, out_dir: Path,
          log=print, force: bool = False, **target_options) -> Path:
    """Build one program directory; returns its path. :class:`KvxError` on bad options or an
    ``out_dir`` it may not replace (see the module docstring; ``force``).

    ``target_options`` go to the target's writer (e.g. ``ort_version`` for ort)."""
    if target not in TARGETS:
        raise KvxError(f"unknown target '{target}'; choose one of {', '.join(TARGETS)}")
    if ops not in OPS_MODES:
        raise KvxError(f"unknown ops mode '{ops}'; choose fused or portable")
    if weights not in WEIGHT_FORMATS[target]:
        raise KvxError(f"weights '{weights}' not supported for {target}; "
                       f"choose one of {', '.join(WEIGHT_FORMATS[target])}")
    if ops == "portable" and weights in PORTABLE_WEIGHTS:
        raise KvxError(f"weights '{weights}' read the table with a kvexport kernel, which --ops portable leaves out; "
                       f"use --ops fused, or --weights {PORTABLE_WEIGHTS[weights]} for a stock runtime")
    writer = target_writer(target)
    out_dir = Path(out_dir)
    identity = {"model": [loaded.name, loaded.identity], "cache_options": opts.to_dict(),
                "max_context": opts.max_context, "target": target, "ops_mode": ops, "weights": weights}
    replaceable = replaceable_program(json.loads(json.dumps(identity, default=str)), force)
    check_replaceable(out_dir, replaceable)

    t0 = time.perf_counter()
    model = loaded.build()
    # fused: one kvexport::layer_attention per layer (ONNX: its ONNX form, run by our ONNX Runtime library);
    # portable ONNX: the per-part ops as standard-ONNX functions (stock ONNX Runtime)
    fused = ops == "fused"
    cache = build_cache(loaded, opts, trim=False, fused_ops=fused or target != "executorch", layer_kernel=fused,
                        onnx_kernel=fused and target != "executorch")
    step = StepProgram(model, cache).eval()
    meta = metadata_methods(step, loaded.tokenizer.bos_id, loaded.tokenizer.eos_ids)
    with atomic_directory(out_dir, replaceable) as tmp:
        written = writer(step, tmp, target=target, ops=ops, weights=weights, metadata=meta, log=log,
                         **target_options)
        copy_tokenizer(loaded.tokenizer, tmp)
        manifest = manifest_for(loaded, opts, step, target, ops, weights, tmp, written, meta, time.perf_counter() - t0)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    return out_dir


def target_writer(target: str):
    """``writer(step, out_dir, *, target, ops, weights, metadata, log, **options) -> dict`` with
    ``program`` (file name), ``files`` (every program file the manifest must hash) and any
    target-specific manifest fields."""
    if target == "executorch":
        from kvexport.export.executorch import write_program
    else:
        from kvexport.export.onnx import write_program
    return write_program


def loaded_for_manifest(manifest: dict) -> LoadedModel:
    """The model a program was built from (for the reference side of parity)."""
    from kvexport.models.loader import resolve

    ident = manifest["model"]["identity"]
    if ident.get("random_weights"):
        name = manifest["model"]["name"].removesuffix("-random")
        loaded = resolve(name, random_weights=True, seed=ident.get("seed", 0))
    else:
        loaded = resolve(manifest["model"]["source"])
        if ident.get("weights_sha256") and loaded.identity.get("weights_sha256") != ident["weights_sha256"]:
            raise KvxError(f"the weights at {manifest['model']['source']} changed since the build; rebuild the program")
    return loaded
