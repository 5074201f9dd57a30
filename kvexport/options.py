"""Command-line options shared by several ``kvexport`` commands, and the objects they turn into.

``add_model_args`` / ``add_cache_args`` / ``add_data_args`` add the option groups; ``load_model``
and ``cache_options`` read them back, the latter into a :class:`CacheOptions` (everything that decides a cache:
``kvexport.session.build_cache`` builds it, manifests record it). Nothing here imports torch: the runners read
manifests in torch-free processes. ``kvexport.cli`` and the command modules it registers
(``kvexport.eval.cli``, ...) import from here, never from each other.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from kvexport import validate
from kvexport.models.registry import DEFAULT_MODEL

# --kv-clip: 2-bit keys on the middle 70% of each group's range, 2-bit (rotated) values on the middle 85%
# (calibration/README.md, "2-bit keys", "2-bit values")
DEFAULT_CLIP = "k2=0.7,v2=0.85"
DEFAULT_CLASSES = "k2v2,k4v4,k8v8"  # --kv-classes: keys and values at the same bits (quant.classes_spec, test-pinned)
POLICY_GRAMMAR = ("fp32, fp16, static-2|4|8, static-k<b>v<c> (e.g. static-k4v2), random:B, random:f2,f4,f8,f16, rule, "
                  "learned[:FILE]")


@dataclass(frozen=True)
class CacheOptions:
    """Everything that decides the cache: ``--kv-policy``, ``--kv-window``, ``--kv-sinks``, ..."""

    policy: str = "fp16"
    max_context: int = 2048
    sinks: int = 4
    window: int = 32
    group: int | None = None  # default: head_dim
    rotate_keys: bool = True  # --kv-rotate
    rotate_values: bool = True  # --kv-rotate-values
    budget_bits: float | None = None  # picks the default learned controller
    seed: int = 0
    clip: str = DEFAULT_CLIP  # --kv-clip (quant.parse_clip)
    classes: str = DEFAULT_CLASSES  # --kv-classes (quant.parse_classes)

    def to_dict(self) -> dict:
        """The fields; ``classes`` only where not the default and ``rotate_values`` only where on, so eval records
        and program identities from before ``--kv-classes`` / ``--kv-rotate-values`` keep their keys."""
        d = asdict(self)
        if d["classes"] == DEFAULT_CLASSES:
            del d["classes"]
        if not d["rotate_values"]:
            del d["rotate_values"]
        return d

    @classmethod
    def from_manifest(cls, options: dict) -> CacheOptions:
        """The options a program was built with (programs from before ``--kv-clip`` clipped nothing, those from
        before ``--kv-rotate-values`` rotated no values)."""
        return cls(**{"clip": "none", "rotate_values": False, **options})


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="alias (see 'kvexport models'), HF directory or .gguf file")
    p.add_argument("--random-weights", action="store_true", help="the alias's architecture with seeded random weights")
    p.add_argument("--seed", type=validate.non_negative_int, default=0)


def add_cache_args(p: argparse.ArgumentParser, default_policy: str | None = "fp16",
                   policy_help: str | None = None, policy_type=validate.policy) -> None:
    """The ``--kv-*`` options and ``--max-context``; ``policy_help`` replaces the ``--kv-policy`` help,
    ``policy_type`` its parse-time check (``None`` where the command parses a list itself)."""
    p.add_argument("--kv-policy", default=default_policy, type=policy_type,
                   help=policy_help or POLICY_GRAMMAR
                   + ("" if default_policy else " (default: static-k4v2; learned when --kv-budget-bits is given)"))
    p.add_argument("--kv-window", type=validate.non_negative_int, default=32, help="FP16 recent-window tokens")
    p.add_argument("--kv-sinks", type=validate.non_negative_int, default=4, help="FP16 sink tokens at the start")
    p.add_argument("--kv-group", type=validate.positive_int, default=None,
                   help="quantization group size (default: head_dim)")
    p.add_argument("--kv-rotate", action=argparse.BooleanOptionalAction, default=True,
                   help="Hadamard-rotate queries and keys so keys are quantized in the rotated basis (default: on; "
                        "--no-kv-rotate for head_dims that are not a power of two)")
    p.add_argument("--kv-rotate-values", action=argparse.BooleanOptionalAction, default=True,
                   help="Hadamard-rotate values before they are cached and the attention output back (default: on)")
    p.add_argument("--kv-clip", type=validate.kv_clip, default=None,
                   help="clip ratios of the quantization range per class and side, e.g. 'k2=0.7,v2=0.9', or "
                        "'none' (default: k2=0.7,v2=0.85)")
    p.add_argument("--kv-classes", type=validate.kv_classes, default=None,
                   help="value bits per class, named by key bits: e.g. 'k4v2,k8v4' stores the values of the 4-bit "
                        "(8-bit) class at 2 (4) bits; values no finer than keys (default: k2v2,k4v4,k8v8)")
    p.add_argument("--kv-budget-bits", type=validate.positive_float, default=None,
                   help="budget; picks the learned controller")
    p.add_argument("--max-context", type=validate.positive_int, default=2048)


def add_data_args(p: argparse.ArgumentParser) -> None:
    """``--data-dir`` (benchmark files; see :mod:`kvexport.data`)."""
    p.add_argument("--data-dir", default=None,
                   help="folder with the benchmark files (default: $KVEXPORT_DATA, ~/.cache/kvexport/data, "
                        "else the Hugging Face hub copy, fetched once)")


def cache_options(a: argparse.Namespace) -> CacheOptions:
    return CacheOptions(policy=a.kv_policy, max_context=a.max_context, sinks=a.kv_sinks, window=a.kv_window,
                        group=a.kv_group, rotate_keys=a.kv_rotate, rotate_values=a.kv_rotate_values,
                        budget_bits=a.kv_budget_bits, seed=a.seed,
                        **({} if a.kv_clip is None else {"clip": a.kv_clip}),
                        **({} if a.kv_classes is None else {"classes": a.kv_classes}))


def load_model(a: argparse.Namespace):
    from kvexport.models.loader import resolve

    return resolve(a.model, random_weights=a.random_weights, seed=a.seed)
