"""A program directory's ``manifest.json``, read back and checked: :func:`read_manifest` is the load-time check every
command runs on a program directory: the manifest's shape (an object with the keys and types the runners read, known
cache options), the SHA-256 of every program file and every tokenizer file it records. ``kvexport build``
(:mod:`kvexport.export.build`) writes it.

Nothing here imports torch: a runner opens a program in a torch-free process (ONNX Runtime programs,
:mod:`kvexport.export.ort_runtime`).
"""

from __future__ import annotations

from pathlib import Path

from kvexport.errors import KvxError
from kvexport.fsutil import read_json, sha256_file
from kvexport.options import CacheOptions

LAYOUT_VERSION = 1  # of the cache state and the step signature; the programs' get_layout_version


# Keys (dotted paths) every manifest has, with their types: what the runners and commands read.
MANIFEST_KEYS = {
    "target": str, "program": str, "program_files": dict, "ops_mode": str, "weights": str, "model": dict,
    "model.name": str, "model.source": str, "model.identity": dict, "tokenizer": dict, "tokenizer.sha256": dict,
    "metadata": dict, "metadata.get_max_context_len": int, "metadata.get_vocab_size": int,
    "metadata.get_eos_ids": list, "cache": dict, "cache.max_context": int, "cache.max_chunk": int,
    "policy": dict, "policy.spec": str,
}


def _check_manifest_shape(manifest, path: Path) -> None:
    def fail(what: str):
        raise KvxError(f"{path} is malformed ({what}); rebuild the program with 'kvexport build'")

    if not isinstance(manifest, dict):
        fail(f"a JSON {type(manifest).__name__}, not an object")
    for key, kind in MANIFEST_KEYS.items():
        value = manifest
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool):
            fail(f"'{key}' is missing or not a {kind.__name__}")
    tables = (("program_files", manifest["program_files"]), ("tokenizer.sha256", manifest["tokenizer"]["sha256"]))
    for table, files in tables:
        if not all(isinstance(n, str) and Path(n).name == n and isinstance(h, str) for n, h in files.items()):
            fail(f"'{table}' must map plain file names to SHA-256 strings")
    if manifest["program"] not in manifest["program_files"]:
        fail(f"the program '{manifest['program']}' is not among its hashed files")
    if manifest["cache"]["max_context"] != manifest["metadata"]["get_max_context_len"]:
        fail(f"cache.max_context {manifest['cache']['max_context']} != get_max_context_len "
             f"{manifest['metadata']['get_max_context_len']}")
    state = manifest["cache"].get("state")
    if isinstance(state, dict) and any(n.startswith("pool") and len(v.get("shape", ())) == 4 for n, v in state.items()
                                       if isinstance(v, dict) and not n.startswith("pool_pos")):
        raise KvxError(f"{path.parent} was built by an older kvexport (slot-major KV pools, which this kvexport's "
                       "kernels no longer read); rebuild it with 'kvexport build'")
    if "cache_options" in manifest:
        opts = manifest["cache_options"]
        known = set(CacheOptions.__dataclass_fields__)
        if not isinstance(opts, dict) or set(opts) - known:
            fail(f"unknown cache options {sorted(set(opts) - known) if isinstance(opts, dict) else opts}")


def read_manifest(program_dir: Path) -> dict:
    """Manifest of a program directory, checked (shape, every program and tokenizer file against its
    SHA-256); :class:`KvxError` with one line naming the first problem."""
    program_dir = Path(program_dir)
    path = program_dir / "manifest.json"
    manifest = read_json(path, f"{program_dir} has no manifest.json; build it with 'kvexport build'",
                         "{path} is corrupt (not JSON: {reason}); rebuild with 'kvexport build'", KvxError)
    if not isinstance(manifest, dict) or manifest.get("format") != "kvexport-program" \
            or manifest.get("layout_version") != LAYOUT_VERSION:
        raise KvxError(f"{path} is not a layout-v{LAYOUT_VERSION} kvexport manifest; rebuild with this kvexport")
    _check_manifest_shape(manifest, path)
    verify_hashes(program_dir, manifest)
    return manifest


def verify_hashes(program_dir: Path, manifest: dict) -> None:
    """Every program file (``program_files``) and tokenizer file (``tokenizer.sha256``) the manifest
    records must be there with that SHA-256; :class:`KvxError` naming the first that is not."""
    tokenizer = manifest.get("tokenizer") if isinstance(manifest.get("tokenizer"), dict) else {}
    for kind, files in (("program file", manifest.get("program_files")), ("tokenizer file", tokenizer.get("sha256"))):
        for name, sha in (files or {}).items():
            file = Path(program_dir) / Path(name).name
            if not file.is_file():
                raise KvxError(f"{kind} {file} is missing; rebuild with 'kvexport build'")
            if sha256_file(file) != sha:
                raise KvxError(f"{file} does not match its manifest (truncated, corrupt or replaced); rebuild it")
