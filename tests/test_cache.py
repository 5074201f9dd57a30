"""The mixed-precision cache on a tiny random Llama: layout, eviction, overflow, equivalences."""

import pytest
import torch

from kvexport.errors import KvxError
from kvexport.kv.cache import CacheLayout, pool_rows
from kvexport.kv.policy import CLASSES
from kvexport.session import CacheOptions, Session, build_cache

IDS = list(range(1000, 1100))


def run(session, ids, chunk):
    return torch.cat([session.step(ids[i : i + chunk]) for i in range(0, len(ids), chunk)])


def test_nbytes_is_the_sum_of_buffer_sizes(tiny_model):
    cache = build_cache(tiny_model, CacheOptions(policy="random:4", max_context=256, window=8))
    total = sum(b.numel() * b.element_size() for b in cache.state_buffers().values())
    assert cache.nbytes() == total
    lay = cache.layout
    per_class = lay.class_bytes_per_token()
    pooled = sum(c * b for c, b in zip(lay.capacities, per_class))
    assert pooled < cache.nbytes() < pooled + (lay.sinks + lay.window + 4 + 2) * per_class[3] + 4096


def test_fp32_chunked_prefill_matches_token_by_token(tiny_model):
    a = Session(tiny_model, CacheOptions(policy="fp32", max_context=128, window=8, sinks=2))
    b = Session(tiny_model, CacheOptions(policy="fp32", max_context=128, window=8, sinks=2))
    la, lb = run(a, IDS[:40], 8), run(b, IDS[:40], 1)
    assert (la - lb).abs().max() < 1e-3


def test_window_then_pools_hold_every_position_once(tiny_model):
    s = Session(tiny_model, CacheOptions(policy="random:0.25,0.25,0.25,0.25", max_context=128, window=8, sinks=3))
    run(s, IDS[:50], 4)
    c = s.cache
    win = sorted(p for p in c.win_pos[:8].tolist() if p >= 0)
    assert win == list(range(42, 50))
    pooled = []
    for cls, cap in zip(CLASSES, c.layout.capacities):
        n = int(c.fill[CLASSES.index(cls)])
        pooled += getattr(c, f"pool_pos{cls}")[:n].tolist()
    assert sorted(pooled) == list(range(3, 42))
    stats = s.kv_stats()
    assert stats["tokens_cached"] == 50 and sum(stats["class_histogram"].values()) == 50


def test_static4_window0_quantizes_every_token_and_counts_bits(tiny_model):
    s = Session(tiny_model, CacheOptions(policy="static-4", max_context=64, window=0, sinks=0))
    run(s, IDS[:20], 5)
    st = s.kv_stats()
    assert st["class_histogram"] == {"2": 0, "4": 20, "8": 0, "16": 0}
    head_dim = tiny_model.args.head_dim  # 16 -> group 16: 4 + 32/16 = 6 bits per element
    assert st["avg_bits"] == pytest.approx(4 + 32 / head_dim)


def test_overflow_falls_to_cheaper_then_dearer_classes(tiny_model):
    from kvexport.kv.cache import MixedKVCache
    from kvexport.kv.policy import FixedClass

    lay = CacheLayout(n_layers=2, n_kv_heads=2, head_dim=32, max_context=12, sinks=0, window=0, group=32,
                      capacities=(2, 3, 2, 5))  # sums to the 12 pooled tokens
    cache = MixedKVCache(lay, FixedClass(8), torch.zeros(49152))
    s = Session(tiny_model, CacheOptions(policy="static-8", max_context=12, window=0, sinks=0))
    s.cache = cache
    run(s, IDS[:12], 3)
    # wants 8: 8-pool (2) fills first, then 4 (3), then 2 (2), then the dearer 16 pool (5)
    assert cache.pool_pos8[:2].tolist() == [0, 1]
    assert cache.pool_pos4[:3].tolist() == [2, 3, 4]
    assert cache.pool_pos2[:2].tolist() == [5, 6]
    assert cache.pool_pos16[:5].tolist() == [7, 8, 9, 10, 11]


def test_export_mode_masks_match_trimmed_eager(tiny_model):
    opts = CacheOptions(policy="random:4.5", max_context=96, window=4, sinks=2)
    a = Session(tiny_model, opts)
    b = Session(tiny_model, opts)
    b.cache = build_cache(tiny_model, opts, trim=False)
    # Different matmul sizes round differently (~1e-6), which can flip a code at a rounding boundary.
    assert (run(a, IDS[:30], 4) - run(b, IDS[:30], 4)).abs().max() < 5e-3


def test_quantized_policies_change_logits_in_order_of_bits(tiny_model):
    ref = run(Session(tiny_model, CacheOptions(policy="fp32", max_context=96, window=0, sinks=0)), IDS[:60], 1)
    errs = {}
    for p in ("static-8", "static-4", "static-2"):
        out = run(Session(tiny_model, CacheOptions(policy=p, max_context=96, window=0, sinks=0)), IDS[:60], 1)
        errs[p] = (out - ref).abs().mean().item()
    assert 0 < errs["static-8"] < errs["static-4"] < errs["static-2"]


def test_rotation_keeps_fp_results_and_changes_quantized_ones(tiny_model):
    # 20 tokens inside a 32-token window: every key and value attended at fp16, rotated or not
    off = dict(rotate_keys=False, rotate_values=False)
    base = CacheOptions(policy="static-4", max_context=64, window=32, sinks=0, **off)
    rot = CacheOptions(policy="static-4", max_context=64, window=32, sinks=0)  # keys and values: the default
    rs, fwht = Session(tiny_model, rot), Session(tiny_model, rot, fwht=True)
    assert rs.cache.layout.rotation == 3 and Session(tiny_model, CacheOptions(policy="fp16")).cache.layout.rotation == 0
    a, b, c = (run(s, IDS[:20], 4) for s in (Session(tiny_model, base), rs, fwht))
    # fp16 storage rounds keys and values in another basis (seen: 0.04 on logits of ~5); MatMul vs transform: 6e-4
    assert (a - b).abs().max() < 0.1 and (b - c).abs().max() < 2e-3
    plain = run(Session(tiny_model, CacheOptions(policy="static-2", max_context=64, window=0, sinks=0, **off)),
                IDS[:20], 4)
    for side in ("rotate_keys", "rotate_values"):  # seen: 23 and 14
        q = CacheOptions(policy="static-2", max_context=64, window=0, sinks=0, **{**off, side: True})
        assert (run(Session(tiny_model, q), IDS[:20], 4) - plain).abs().max() > 1.0, side


def test_clip_ratios_reach_the_pools_of_their_class_and_side(tiny_model):
    def pools(clip):
        s = Session(tiny_model, CacheOptions(policy="static-2", max_context=64, window=0, sinks=0, clip=clip))
        s.prefill(IDS[:40])
        return s.cache
    plain, keys, values = pools("none"), pools("k2=0.6"), pools("v2=0.6,k4=0.5")
    assert keys.layout.side(2, 0) == (2, 0.6) and keys.layout.side(2, 1) == (2, 1.0)
    assert values.layout.side(4, 0) == (4, 0.5) and values.layout.side(2, 1) == (2, 0.6)
    # layer 0 (its K/V depend on the tokens only; later layers see the clipped cache through attention)
    def layer0(buf, n=40):
        return pool_rows(buf, tiny_model.args.n_layers, 0, n)

    assert not torch.equal(layer0(plain.pool2_k), layer0(keys.pool2_k))
    assert torch.equal(layer0(plain.pool2_v), layer0(keys.pool2_v))
    assert torch.equal(layer0(plain.pool2_k), layer0(values.pool2_k))
    assert not torch.equal(layer0(plain.pool2_v), layer0(values.pool2_v))
    assert (layer0(keys.pool2_ks).float() < layer0(plain.pool2_ks).float()).all()  # a finer grid per group


def test_split_classes_store_keys_and_values_at_their_own_bits(tiny_model):
    """k4v2: the 4-bit class's keys are static-4's, its values static-2's (bit for bit, layer 0), at the
    bytes and average bits of 4-bit keys with 2-bit values."""
    def cache(policy, classes="k2v2"):
        s = Session(tiny_model, CacheOptions(policy=policy, max_context=64, window=0, sinks=0, clip="none",
                                             classes=classes))
        s.prefill(IDS[:30])
        return s
    four, two, split = cache("static-4"), cache("static-2"), cache("static-4", "k4v2,k8v4")
    c = split.cache
    d, g = tiny_model.args.head_dim, c.layout.group
    assert c.layout.value_bits == (2, 2, 4) and c.layout.class_names() == ["k2v2", "k4v2", "k8v4", "16"]
    assert c.pool4_k.shape[-1] == d // 2 and c.pool4_v.shape[-1] == d // 4 and c.pool8_v.shape[-1] == d // 2
    layers = tiny_model.args.n_layers
    assert torch.equal(pool_rows(c.pool4_k, layers, 0, 30), pool_rows(four.cache.pool4_k, layers, 0, 30))
    for name in ("v", "vs", "vz"):
        assert torch.equal(pool_rows(getattr(c, f"pool4_{name}"), layers, 0, 30),
                           pool_rows(getattr(two.cache, f"pool2_{name}"), layers, 0, 30))
    per_head = (d * 4 // 8 + d * 2 // 8 + 2 * 2 * 2 * d // g)
    assert c.layout.class_bytes_per_token()[1] == c.layout.n_layers * c.layout.n_kv_heads * per_head
    assert split.kv_stats()["avg_bits"] == pytest.approx(3 + 32 / g)  # (4 + 2) / 2 + fp16 scale and zero
    alias = cache("static-k4v2")  # the policy names its class: the same pool as static-4 with --kv-classes k4v2
    assert alias.cache.layout.value_bits == (2, 2, 8) and torch.equal(alias.cache.pool4_v, c.pool4_v)
    logits = [run(s, IDS[30:40], 1) for s in (four, split, two)]
    err = [(x - logits[0]).abs().max() for x in logits[1:]]
    assert 0 < err[0] < err[1]  # coarser values cost something, less than 2-bit keys do


def test_context_overflow_is_a_clear_error(tiny_model):
    s = Session(tiny_model, CacheOptions(policy="fp16", max_context=16, window=4, sinks=2))
    with pytest.raises(KvxError, match="exceed the cache's context of 16"):
        s.prefill(IDS[:17])


@pytest.mark.parametrize("opts,msg", [
    (CacheOptions(policy="static-3"), "static bit-width"),
    (CacheOptions(policy="random:1"), "average bits"),
    (CacheOptions(policy="random:2.1", max_context=64, window=32), "below the minimum"),
    (CacheOptions(policy="fp16", window=3000), "must fit in the context"),
    (CacheOptions(policy="fp16", group=5), "group size"),
    (CacheOptions(policy="learned:/nonexistent.safetensors"), "controller file not found"),
    (CacheOptions(policy="static-2", clip="k3=0.5"), "bad --kv-clip entry"),
    (CacheOptions(policy="static-2", clip="k2=1.5"), "outside"),
    (CacheOptions(policy="static-4", classes="k4v8"), "bad --kv-classes entry"),
    (CacheOptions(policy="static-4", classes="k4"), "bad --kv-classes entry"),
    (CacheOptions(policy="static-k4v8"), "values at no more bits than keys"),
])
def test_bad_options_are_one_line_errors(tiny_model, opts, msg):
    with pytest.raises(KvxError, match=msg) as err:
        build_cache(tiny_model, opts)
    assert "\n" not in str(err.value)


def test_batched_continuation_scores_equal_one_by_one_decoding(tiny_model):
    opts = CacheOptions(policy="static-4", max_context=128, window=4, sinks=1)
    s = Session(tiny_model, opts)
    ctx, conts = IDS[:21], [IDS[30:33], IDS[40:45], [IDS[50]]]
    batched = s.score_continuations(ctx, conts)
    for cont, score in zip(conts, batched):
        # reference: decode the continuation token by token (chunk of the whole continuation at once
        # sees the same quantized context; the continuation's own tokens are full precision either way)
        s.reset()
        lp = torch.log_softmax(s.prefill(ctx)[-1], -1)
        ref = lp[cont[0]].item()
        if len(cont) > 1:
            out = torch.log_softmax(s.model(torch.tensor([cont]), torch.tensor([s.pos]), s.cache)[0], -1)
            ref += sum(out[j, cont[j + 1]].item() for j in range(len(cont) - 1))
        assert abs(score - ref) < 1e-3
