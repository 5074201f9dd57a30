"""Bootstrap intervals and paired comparisons on hand-made data."""

import math

import numpy as np
import pytest

from kvexport.eval import stats as S


def _binary(n, p, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.random(n) < p).astype(float)


def test_ci_contains_the_mean_and_is_seeded():
    x = _binary(500, 0.4)
    lo, hi = S.bootstrap_ci(x, seed=3)
    assert lo < x.mean() < hi
    assert (lo, hi) == S.bootstrap_ci(x, seed=3)
    assert (lo, hi) != S.bootstrap_ci(x, seed=4)


def test_ci_narrows_with_n():
    widths = []
    for n in (50, 500, 5000):
        lo, hi = S.bootstrap_ci(_binary(n, 0.4), seed=0)
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    # about 2 * 1.96 * sqrt(p(1-p)/n) for a binomial proportion
    assert widths[2] == pytest.approx(2 * 1.96 * math.sqrt(0.24 / 5000), rel=0.15)


def test_discrete_shortcut_matches_index_resampling():
    x = _binary(400, 0.3)
    fast = S.bootstrap_means(x, n_boot=20000, seed=0)
    # > _DISCRETE_MAX distinct values forces index resampling; the jitter is far below the spread
    jitter = np.random.default_rng(9).normal(0, 1e-9, len(x))
    slow = S.bootstrap_means(x + jitter, n_boot=20000, seed=0)
    assert fast.mean() == pytest.approx(slow.mean(), abs=2e-3)
    assert fast.std() == pytest.approx(slow.std(), rel=0.05)


def test_continuous_ci_contains_mean():
    x = np.random.default_rng(0).normal(5.0, 2.0, 300)
    lo, hi = S.bootstrap_ci(x, n_boot=2000)
    assert lo < x.mean() < hi and hi - lo < 1.0


def test_ratio_ci_contains_point_estimate():
    rng = np.random.default_rng(0)
    tok = rng.integers(50, 60, 40).astype(float)
    nll = tok * rng.normal(3.0, 0.2, 40)
    lo, hi = S.bootstrap_ratio_ci(nll, tok, np.exp, n_boot=2000)
    assert lo < math.exp(nll.sum() / tok.sum()) < hi


def test_mcnemar_counts_and_exact_p():
    a = [1, 1, 1, 0, 0, 1, 0, 1]
    b = [1, 0, 0, 0, 1, 1, 0, 0]
    m = S.mcnemar(a, b)
    assert (m["a_only"], m["b_only"], m["both"], m["neither"]) == (3, 1, 2, 2)
    assert m["p_exact"] == pytest.approx(2 * (1 + 4) / 16)  # 2 * P(X <= 1), X ~ Bin(4, 1/2)
    assert S.mcnemar([1] * 10, [0] * 10)["p_exact"] == pytest.approx(2 / 1024)
    assert S.mcnemar([1, 0], [1, 0])["p_exact"] == 1.0


def test_paired_comparison():
    base = _binary(1000, 0.5, seed=2)
    same = S.paired_comparison(base, base)
    assert same["diff"] == 0.0 and same["ci"] == [0.0, 0.0] and same["mcnemar"]["a_only"] == 0
    better = base.copy()
    better[np.flatnonzero(base == 0)[:100]] = 1.0  # 100 more items right
    c = S.paired_comparison(better, base)
    assert c["diff"] == pytest.approx(0.1)
    assert 0 < c["ci"][0] < 0.1 < c["ci"][1]
    assert c["mcnemar"]["a_only"] == 100 and c["mcnemar"]["b_only"] == 0 and c["mcnemar"]["p_exact"] < 1e-20
    # the paired interval is much narrower than the unpaired one on correlated outcomes
    lo_a, hi_a = S.bootstrap_ci(better)
    assert c["ci"][1] - c["ci"][0] < 0.75 * (hi_a - lo_a)
    with pytest.raises(ValueError):
        S.paired_comparison([1, 0], [1])
