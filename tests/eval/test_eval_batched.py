"""The batched engine (packed rows, masks) gives the cache path's scores and KV statistics."""

from __future__ import annotations

import random

import pytest
import torch

from kvexport.eval.batched import Plan
from kvexport.eval.scoring import ReferenceScorer
from kvexport.session import CacheOptions


def _items(n_items: int, seed: int = 0):
    rng = random.Random(seed)
    items = []
    for _ in range(n_items):
        ctx = [rng.randrange(100, 20000) for _ in range(rng.randrange(3, 90))]
        conts = [[rng.randrange(100, 20000) for _ in range(rng.randrange(1, 12))] for _ in range(rng.randrange(2, 5))]
        items.append((ctx, conts))
    return items


def _compare(tiny_model, opts: CacheOptions, prefill_chunk=None, n_items=6, expect_packed=True):
    exact = ReferenceScorer(tiny_model, opts, prefill_chunk=prefill_chunk)
    batched = ReferenceScorer(tiny_model, opts, model=exact.session.model, prefill_chunk=prefill_chunk, batch_items=4)
    items = _items(n_items)
    results = batched.score_many(items)
    paths = [p for _, _, p in results]
    for (ctx, conts), (scores, stats, _) in zip(items, results):
        want = exact.score(ctx, conts)
        assert scores == pytest.approx(want, abs=2e-3, rel=1e-4)  # fp16 rounding of keys amplifies float noise
        assert stats == exact.kv_stats()
    assert "packed" in paths
    if expect_packed:
        assert set(paths) == {"packed"}
    return paths


@pytest.mark.parametrize(
    "policy", ["fp16", "fp32", "static-4", "static-2", "random:6", "random:0.3,0.3,0.2,0.2", "rule"]
)
@pytest.mark.parametrize("window,sinks", [(8, 4), (0, 0), (16, 0)])
def test_batched_equals_cache_path(tiny_model, policy, window, sinks):
    # rule: random token ids are mostly "rare" -> 8-bit, whose pool (10%) overflows in long contexts.
    # Unrotated: the rotation mixes every channel's GEMM noise (other matmul shapes) into each key, and a
    # 2-bit code at a group's edge flips (seen: 0.043 nats on a 113-nat score, random shares, no window);
    # rotation: test_batched_with_rotation here, and in float64 the real-model test below.
    _compare(
        tiny_model,
        CacheOptions(policy=policy, max_context=256, window=window, sinks=sinks, group=16, rotate_keys=False,
                     rotate_values=False),
        expect_packed=policy != "rule",
    )


def test_batched_learned_with_attention_features_and_chunks(tiny_model, hand_controller):
    # The hand-set controller thresholds attention at exactly uniform, where this random tiny model
    # puts many tokens: some long items do not settle and take the cache path (scores still equal).
    opts = CacheOptions(policy=f"learned:{hand_controller}", max_context=256, window=8, sinks=2, group=16)
    _compare(tiny_model, opts, expect_packed=False)
    _compare(tiny_model, opts, prefill_chunk=3, expect_packed=False)  # chunks smaller than the window
    w0 = CacheOptions(policy=f"learned:{hand_controller}", max_context=256, window=0, sinks=0, group=16)
    _compare(tiny_model, w0, prefill_chunk=5, expect_packed=False)  # window 0, attention received inside a chunk


@pytest.mark.parametrize("keys,values", [(True, False), (False, True), (True, True)])
def test_batched_with_rotation(tiny_model, keys, values):
    _compare(tiny_model, CacheOptions(policy="static-2", max_context=256, window=8, sinks=4, group=16,
                                      rotate_keys=keys, rotate_values=values))


def test_batched_with_split_classes(tiny_model):
    """Values coarser than keys (k4v2, k8v4) in both engines, every class in use."""
    _compare(tiny_model, CacheOptions(policy="random:0.2,0.4,0.3,0.1", max_context=256, window=8, sinks=4, group=16,
                                      rotate_keys=False, rotate_values=False, classes="k4v2,k8v4"))


def test_overflowing_items_fall_back_to_the_cache_path(tiny_model):
    # rule: random token ids are mostly "rare" -> 8-bit, whose pool (10% of 244 slots) overflows
    opts = CacheOptions(policy="rule", max_context=256, window=8, sinks=4, group=16)
    paths = _compare(tiny_model, opts, expect_packed=False)
    assert "cache" in paths and "packed" in paths


def test_wikitext_logprobs_match(tiny_model, hand_controller):
    opts = CacheOptions(policy=f"learned:{hand_controller}", max_context=256, window=8, sinks=4, group=16,
                        rotate_keys=False, rotate_values=False)  # see test_batched_equals_cache_path
    exact = ReferenceScorer(tiny_model, opts)
    batched = ReferenceScorer(tiny_model, opts, model=exact.session.model, batch_items=4)
    ids = _items(1, seed=3)[0][0]
    # fp32 noise of other matmul shapes, machine-dependent (AVX-512: up to 5.8e-4 on log-probs of ~20, even
    # with the fp16 policy); a wrong mask or eviction moves them by O(1)
    assert torch.allclose(batched.token_logprobs(ids), exact.token_logprobs(ids), rtol=1e-4, atol=2e-4)
    assert batched.kv_stats() == exact.kv_stats()


def test_plan_masks_follow_the_eviction_rule():
    # context of 6, chunk 2, window 2, sinks 1; one continuation of 2 tokens
    plan = Plan([(list(range(6)), [[7, 8]])], chunk=2, window=2, sinks=1)
    stored = plan.stored[0].int()
    # token 1 leaves the window at the commit of chunk(1 + 2) = 1, so queries of chunk 2 (4, 5) see it stored
    assert stored[4, 1] == 1 and stored[3, 1] == 0 and stored[4, 0] == 0  # 0 is a sink
    # tokens 4 and 5 never leave the window (4 + 2 >= 6); the continuation sees 1..3 stored
    assert stored[6, 1:4].tolist() == [1, 1, 1] and stored[6, 4:6].tolist() == [0, 0]
    assert plan.evicted[0].tolist() == [False, True, True, True, False, False]
    assert plan.fp[0, 7].tolist() == [True, False, False, False, True, True, True, True]


def _to_float64(module) -> None:
    """float32 parameters/buffers -> float64 (fp16 storage stays fp16)."""
    for mod in module.modules():
        for store in (mod._parameters, mod._buffers):
            for k, v in list(store.items()):
                if v is not None and v.dtype == torch.float32:
                    store[k] = (
                        torch.nn.Parameter(v.double(), requires_grad=False) if k in mod._parameters else v.double()
                    )


@pytest.mark.real
@pytest.mark.parametrize("policy,window,sinks", [("learned", 32, 4), ("static-2", 0, 0)])
def test_real_model_batched_equals_cache_path_in_float64(real_model, policy, window, sinks, monkeypatch):
    """Real weights, long HellaSwag contexts (WikiHow part), so the policy is at work. In float32 the
    two paths differ by float noise that fp16 rounding and 2-bit codes amplify (several nats at 2 bits
    without a window); in float64 that noise cannot flip a code, and the paths must agree to 1e-9."""
    from kvexport.eval import tasks as T
    from kvexport.eval.runner import tokenize_items

    items = T.load_task("hellaswag")[6000:6003]
    toks = tokenize_items(real_model.tokenizer, items)
    opts = CacheOptions(policy=policy, max_context=1024, window=window, sinks=sinks, budget_bits=4)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    monkeypatch.setattr(torch.Tensor, "float", lambda self: self.double())  # the cache's "float" is float64 now
    try:
        model = real_model.build()
        _to_float64(model)
        exact = ReferenceScorer(real_model, opts, model=model)
        batched = ReferenceScorer(real_model, opts, model=model, batch_items=3)
        for scorer in (exact, batched):
            _to_float64(scorer.session.cache)
        _to_float64(batched.engine.policy)
        batched.engine.rarity = batched.engine.rarity.double()
        for (ctx, conts), (scores, stats, path) in zip(toks, batched.score_many(toks)):
            want = exact.score(ctx, conts)
            assert path == "packed" and stats == exact.kv_stats()
            assert stats["class_histogram"]["16"] < stats["tokens_cached"]  # some tokens were quantized
            assert scores == pytest.approx(want, abs=1e-9)
    finally:
        torch.set_default_dtype(default)
