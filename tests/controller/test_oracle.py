"""The routing-headroom oracle (kvexport.controller.oracle) on the tiny random model."""

from __future__ import annotations

import pytest
import torch

from kvexport.controller import labels as L
from kvexport.controller import oracle
from kvexport.kv.policy import CLASSES, class_bits

SINKS, WINDOW, GROUP = 2, 8, 32


def test_assignments_meet_the_budget_and_random_keeps_the_oracles_shares():
    g = torch.Generator().manual_seed(0)
    T = 200
    cost = torch.cat([torch.rand(T, 3, generator=g) * torch.tensor([10.0, 1.0, 0.1]), torch.zeros(T, 1)], dim=1)
    pooled = torch.zeros(T, dtype=torch.bool)
    pooled[2:180] = True
    bits = torch.tensor(class_bits(64))
    out = oracle.assignments(cost, pooled, [3.0, 4.0], bits, seeds=[0, 1])
    assert set(out) == {"static-2", "static-4", "static-8", "oracle@3", "random@3/seed0", "random@3/seed1",
                        "oracle@4", "random@4/seed0", "random@4/seed1"}
    for choice in out.values():
        assert (choice[~pooled] == oracle.FP_CLASS).all()  # only pooled tokens are quantized
    for b in (3.0, 4.0):
        o = out[f"oracle@{b:g}"]
        assert float(bits[o[pooled]].mean()) == pytest.approx(b, abs=0.1)
        for s in (0, 1):
            r = out[f"random@{b:g}/seed{s}"]
            assert torch.equal(torch.bincount(r, minlength=4), torch.bincount(o, minlength=4))
            assert not torch.equal(r, o)
        # the oracle's choice is the cheapest at its bits: its attributed cost is below random's
        assert cost.gather(1, o[:, None]).sum() < cost.gather(1, out[f"random@{b:g}/seed0"][:, None]).sum()
    assert (out["static-4"][pooled] == CLASSES.index(4)).all()


def test_mixed_gates_add_up(tiny_model):
    """Disjoint gates at two classes: a zero gate changes nothing, and each class's own error applies."""
    model = tiny_model.build()
    ids = tiny_model.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 12)[:48]
    tokens = torch.tensor(ids)
    qvis = L.quantized_visibility(len(ids), SINKS, WINDOW, WINDOW)
    half = (torch.arange(len(ids)) % 2).float()
    with torch.no_grad():
        only2 = L.gated_forward(model, tokens, {2: half}, GROUP, qvis)
        with_zero = L.gated_forward(model, tokens, {2: half, 8: torch.zeros(len(ids))}, GROUP, qvis)
        mixed = L.gated_forward(model, tokens, {2: half, 8: 1 - half}, GROUP, qvis)
        ref = L.gated_forward(model, tokens, None, GROUP, qvis)
    assert torch.allclose(only2, with_zero, atol=1e-6)
    assert not torch.allclose(mixed, only2, atol=1e-6)
    kl = lambda lp: float((ref.exp() * (ref - lp)).sum())  # noqa: E731
    assert kl(mixed) > kl(only2) * 0.5 and kl(mixed) > 0


def test_key_and_value_bits_apart(tiny_model):
    """A gate's class may give key and value bits apart: (b, b) is class b, (16, 16) changes nothing, and
    each side's error counts."""
    model = tiny_model.build()
    ids = tiny_model.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 12)[:48]
    tokens, ones = torch.tensor(ids), torch.ones(len(ids))
    qvis = L.quantized_visibility(len(ids), SINKS, WINDOW, WINDOW)
    with torch.no_grad():
        lp = {cls: L.gated_forward(model, tokens, {cls: ones}, GROUP, qvis) for cls in (2, (2, 2), (16, 16), (2, 16),
                                                                                          (16, 2))}
        ref = L.gated_forward(model, tokens, None, GROUP, qvis)
    assert torch.equal(lp[2], lp[(2, 2)]) and torch.allclose(lp[(16, 16)], ref, atol=1e-6)
    kl = {c: float((ref.exp() * (ref - x)).sum()) for c, x in lp.items()}
    assert 0 < kl[(2, 16)] < kl[(2, 2)] and 0 < kl[(16, 2)] < kl[(2, 2)]


def test_measure_window_and_report(tiny_model, tmp_path):
    model = tiny_model.build()
    ids = tiny_model.tokenizer.encode("In 1998, the committee met in Paris; nobody came. " * 10)[:64]
    res = oracle.measure_window(model, ids, sinks=SINKS, window=WINDOW, chunk=WINDOW, group=GROUP,
                                budgets=[3.5], seeds=[0], steps={2: 1, 4: 1, 8: 1}, progress=False)
    rows = res["rows"]
    assert res["tokens"] == 64 and 0 < res["pooled_tokens"] < 64
    assert rows["static-2"]["kl_per_token"] > rows["static-4"]["kl_per_token"] > rows["static-8"]["kl_per_token"] > 0
    assert rows["static-2"]["pooled_bits"] == pytest.approx(2 + 32 / GROUP)
    assert rows["oracle@3.5"]["shares"] == rows["random@3.5/seed0"]["shares"]
    result = {"model": "tiny", "settings": {"tokens": 64, "sinks": SINKS, "window": WINDOW, "chunk": WINDOW,
                                            "group": GROUP}, "windows": [res], "summary": oracle.summarize([res])}
    assert result["summary"]["budgets"][0]["budget"] == 3.5
    paths = oracle.write_report(result, tmp_path)
    assert "oracle@3.5" in paths["md"].read_text()
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_rotated_gated_forward_matches_the_rotated_cache(tiny_model):
    """With --kv-rotate (--kv-rotate-values) the cache quantizes keys (values) in the Hadamard basis, with the
    default --kv-clip; the gated forward must too."""
    from kvexport.session import CacheOptions, Session

    model = tiny_model.build()
    ids = tiny_model.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 12)[:64]
    qvis = L.quantized_visibility(len(ids), SINKS, WINDOW, WINDOW)
    sess = Session(tiny_model, CacheOptions(policy="static-2", max_context=128, sinks=SINKS, window=WINDOW,
                                            group=GROUP, rotate_keys=True), model=model)
    lp_cache = torch.log_softmax(sess.prefill(ids), -1)
    with torch.no_grad():
        gates = {2: torch.ones(len(ids))}
        clip = (sess.cache.layout.key_clip, sess.cache.layout.value_clip)  # the default --kv-clip
        mask = sess.cache.layout.rotation  # keys and values (the defaults)
        rotated = L.gated_forward(model, torch.tensor(ids), gates, GROUP, qvis, mask, clip)
        plain = L.gated_forward(model, torch.tensor(ids), gates, GROUP, qvis, clip=clip)
        keys_only = L.gated_forward(model, torch.tensor(ids), gates, GROUP, qvis, 1, clip)
        unclipped = L.gated_forward(model, torch.tensor(ids), gates, GROUP, qvis, mask)
    assert (rotated - lp_cache).abs().max() < 2e-2
    assert mask == 3
    assert (plain - lp_cache).abs().max() > (rotated - lp_cache).abs().max()
    assert (keys_only - lp_cache).abs().max() > (rotated - lp_cache).abs().max()
    assert (unclipped - lp_cache).abs().max() > (rotated - lp_cache).abs().max()
