"""Statistics of a run: seeded percentile-bootstrap confidence intervals, paired comparisons of two
policies on the same items (bootstrap of the per-item difference, McNemar counts + exact p-value).

Resampling items with replacement from a vector that takes few distinct values (accuracies are 0/1,
paired differences -1/0/1) is the same as drawing the value counts from a multinomial; that exact
shortcut is used when there are at most ``_DISCRETE_MAX`` distinct values, so a 10k-item CI with
10,000 resamples costs milliseconds. Other statistics resample indices in chunks.
"""

from __future__ import annotations

import math

import numpy as np

N_BOOT = 10_000
_DISCRETE_MAX = 16
_CHUNK_ELEMS = 4_000_000


def _percentiles(stats: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap_means(values, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """``n_boot`` means of resamples (with replacement, same size) of ``values``."""
    x = np.asarray(values, dtype=np.float64).ravel()
    n = len(x)
    if n == 0:
        raise ValueError("bootstrap needs at least one value")
    rng = np.random.default_rng(seed)
    uniq, counts = np.unique(x, return_counts=True)
    if len(uniq) <= _DISCRETE_MAX:
        draws = rng.multinomial(n, counts / n, size=n_boot)
        return draws @ uniq / n
    out = np.empty(n_boot)
    step = max(1, _CHUNK_ELEMS // n)
    for s in range(0, n_boot, step):
        m = min(step, n_boot - s)
        out[s : s + m] = x[rng.integers(0, n, size=(m, n))].mean(axis=1)
    return out


def bootstrap_ci(values, n_boot: int = N_BOOT, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile-bootstrap ``1 - alpha`` interval of the mean of ``values`` (seeded)."""
    return _percentiles(bootstrap_means(values, n_boot, seed), alpha)


def bootstrap_ratio_ci(num, den, transform=None, n_boot: int = N_BOOT, seed: int = 0,
                       alpha: float = 0.05) -> tuple[float, float]:
    """Interval of ``transform(sum(num) / sum(den))`` resampling the (num, den) pairs together
    (e.g. perplexity = exp(sum NLL / sum tokens) over WikiText windows)."""
    a, b = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    n = len(a)
    if n == 0 or len(b) != n:
        raise ValueError("num and den need the same, non-zero length")
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    step = max(1, _CHUNK_ELEMS // n)
    for s in range(0, n_boot, step):
        m = min(step, n_boot - s)
        idx = rng.integers(0, n, size=(m, n))
        out[s : s + m] = a[idx].sum(1) / b[idx].sum(1)
    if transform is not None:
        out = transform(out)
    return _percentiles(out, alpha)


def mcnemar(a, b) -> dict:
    """McNemar on paired 0/1 outcomes: ``a_only`` (a right, b wrong), ``b_only``, ``both``,
    ``neither`` and the exact two-sided binomial p-value on the discordant pairs."""
    a = np.asarray(a).astype(bool)
    b = np.asarray(b).astype(bool)
    if a.shape != b.shape:
        raise ValueError("paired outcomes need the same length")
    n01, n10 = int((a & ~b).sum()), int((~a & b).sum())
    n = n01 + n10
    k = min(n01, n10)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    return {"a_only": n01, "b_only": n10, "both": int((a & b).sum()), "neither": int((~a & ~b).sum()), "p_exact": p}


def paired_comparison(a, b, n_boot: int = N_BOOT, seed: int = 0, alpha: float = 0.05) -> dict:
    """Policy ``a`` minus policy ``b`` on the same items (0/1 per item): difference of means, its
    paired-bootstrap interval, and McNemar counts."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or len(a) == 0:
        raise ValueError("paired outcomes need the same, non-zero length")
    d = a - b
    lo, hi = bootstrap_ci(d, n_boot, seed, alpha)
    return {"n": len(d), "diff": float(d.mean()), "ci": [lo, hi], "mcnemar": mcnemar(a, b)}
