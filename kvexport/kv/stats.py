"""The ``kv_stats`` vector by name: float32 ``[8]`` that the cache computes
(:meth:`kvexport.kv.cache.MixedKVCache.stats`) and every program returns after each step.

:data:`FIELDS` is its order. ``kvexport build`` writes it into the manifest
(``methods.forward.outputs[1].fields``), ``kvexport bundle`` into the app's contract
(``kv_stats_fields``, which the Android app checks against its own copy); readers index by name.
"""

from __future__ import annotations

FIELDS = ("kv_bytes_allocated", "kv_bytes_used", "avg_bits", "tokens_2bit", "tokens_4bit", "tokens_8bit",
          "tokens_16bit", "tokens_cached")
INDEX = {name: i for i, name in enumerate(FIELDS)}
TOKEN_COUNTS = tuple(f for f in FIELDS if f.startswith("tokens_"))  # per class, then all cached


def named(stats) -> dict[str, float]:
    """A ``kv_stats`` vector (tensor or sequence of 8 numbers) -> ``{field: value}``."""
    values = stats.tolist() if hasattr(stats, "tolist") else list(stats)
    return dict(zip(FIELDS, values, strict=True))


def readable(stats) -> dict:
    """A ``kv_stats`` vector as the dict commands print and records keep: bytes, average bits, tokens per class."""
    s = named(stats)
    return {
        "kv_bytes_allocated": int(s["kv_bytes_allocated"]),
        "kv_bytes_used": int(s["kv_bytes_used"]),
        "avg_bits": round(s["avg_bits"], 4),
        "class_histogram": {f.removeprefix("tokens_").removesuffix("bit"): int(s[f]) for f in TOKEN_COUNTS[:-1]},
        "tokens_cached": int(s["tokens_cached"]),
    }
