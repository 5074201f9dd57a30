"""Controller: measured labels, training / budget calibration, file round trip, use inside the cache,
and the calibrate command end to end on the tiny random model."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from kvexport.controller import labels as L
from kvexport.controller.features import RecordingPolicy, record_features
from kvexport.controller.model import Controller
from kvexport.controller.train import TrainConfig, avg_bits, pooled_target, shares, train_controller
from kvexport.errors import KvxError
from kvexport.kv.policy import CLASSES, FEATURES, RandomPolicy, class_bits
from kvexport.session import CacheOptions, Session

SINKS, WINDOW, GROUP = 2, 8, 32


def _ids(tiny_model, n):
    text = "The quick brown fox jumps over the lazy dog. " * 40 + "In 1998, the committee met in Paris; nobody came."
    return tiny_model.tokenizer.encode(text)[:n]


# ---------------------------------------------------------------- labels
def test_visibility_rule():
    vis = L.quantized_visibility(40, sinks=2, window=8, chunk=8)
    assert not vis[:, :2].any()  # sinks never quantized
    # token 5: overwritten by 13 (chunk [8, 16)), so queries from 16 on see it quantized
    assert not vis[15, 5] and vis[16, 5]
    assert not vis.triu(1).any()  # never a future key


@pytest.fixture(scope="module")
def tiny_attr(tiny_model):
    model = tiny_model.build()
    tokens = torch.tensor(_ids(tiny_model, 64))
    out = L.attribute(model, tokens, sinks=SINKS, window=WINDOW, chunk=WINDOW, group=GROUP, steps={2: 4, 4: 2, 8: 1})
    return model, tokens, out


def test_gated_forward_matches_the_cache(tiny_model, tiny_attr):
    """gate=None is the fp16 cache; gate=1 at 8 bits is static-8 (same visibility rule, same quantizer, keys and
    values rotated where the cache rotates them: by default wherever it quantizes)."""
    model, tokens, out = tiny_attr
    ids = tokens.tolist()
    for policy, gates in (("fp16", None), ("static-8", {8: torch.ones(len(ids))})):
        sess = Session(
            tiny_model,
            CacheOptions(policy=policy, max_context=128, sinks=SINKS, window=WINDOW, group=GROUP),
            model=model,
        )
        lp_cache = torch.log_softmax(sess.prefill(ids), -1)
        with torch.no_grad():
            lp = L.gated_forward(
                model, tokens, gates, GROUP, L.quantized_visibility(len(ids), SINKS, WINDOW, WINDOW),
                sess.cache.layout.rotation,
            )
        assert (lp - lp_cache).abs().max() < 2e-2, policy


def test_attribution_adds_up_to_measured_kl(tiny_attr):
    model, tokens, out = tiny_attr
    attr = out["attr"]
    T = tokens.shape[0]
    assert attr.shape == (T, 3)
    assert (attr[:SINKS] == 0).all()  # sinks are never quantized
    vis = L.quantized_visibility(T, SINKS, WINDOW, WINDOW)
    never = ~vis.any(0)
    assert (attr[never] == 0).all()  # tokens no query sees quantized cost nothing
    kw = dict(sinks=SINKS, window=WINDOW, chunk=WINDOW, group=GROUP, ref=out["ref"])
    for ci, bits in enumerate(L.QUANT_CLASSES[:2]):
        measured = L.measured_kl(model, tokens, {bits: torch.ones(T)}, **kw)
        assert measured > 0
        assert attr[:, ci].sum() == pytest.approx(measured, rel=0.25), bits
    # fewer bits cost more, in total
    assert attr[:, 0].sum() > attr[:, 1].sum() > attr[:, 2].sum()
    # the attribution ranks tokens: quantizing the dearest half hurts more than the cheapest half
    cand = torch.arange(SINKS, T)
    order = cand[torch.argsort(attr[cand, 0])]
    half = len(order) // 2
    cheap, dear = torch.zeros(T), torch.zeros(T)
    cheap[order[:half]] = 1
    dear[order[half:]] = 1
    assert L.measured_kl(model, tokens, {2: dear}, **kw) > L.measured_kl(model, tokens, {2: cheap}, **kw)


def test_labels_at_threshold():
    attr = torch.tensor([[0.0, 0.0, 0.0], [5.0, 0.5, 0.01], [5.0, 3.0, 2.0], [-1.0, 0.0, 0.0]])
    assert L.labels_at(attr, 0.1).tolist() == [0, 2, 3, 0]
    assert L.labels_at(attr, 1.0).tolist() == [0, 1, 3, 0]
    assert L.labels_at(attr, 10.0).tolist() == [0, 0, 0, 0]
    costs = L.class_costs(attr)
    assert costs.shape == (4, 4) and (costs[:, 3] == 0).all() and (costs >= 0).all()


# ---------------------------------------------------------------- training
def _synthetic(n=3000, seed=0):
    """Token cost grows with 'attn_received' (feature 3); other features are noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, len(FEATURES), generator=g)
    x[:, 3] = x[:, 3].exp()
    sens = x[:, 3] ** 2
    cost = torch.stack([sens * 1.0, sens * 0.05, sens * 0.002, torch.zeros(n)], dim=1)
    return x, cost


@pytest.mark.parametrize("budget", [3.0, 4.0])
def test_training_meets_budget_and_beats_random(budget):
    x, cost = _synthetic()
    target = pooled_target(budget, 2048, 4, 32)
    ctrl, summary = train_controller(x, cost, target_bits=target, group=64, cfg=TrainConfig(steps=400))
    bits = torch.tensor(class_bits(64))
    choice = ctrl(x)
    assert abs(avg_bits(choice, bits) - target) < 0.05
    assert ctrl.n_params() <= 500
    assert ctrl.meta["fractions"] == pytest.approx(shares(choice))
    assert set(ctrl.meta["loss"]) >= {"alpha", "beta", "gamma"}
    # held-out synthetic tokens: the learned choice beats random classes at the same shares
    x2, cost2 = _synthetic(seed=1)
    learned = cost2.gather(1, ctrl(x2)[:, None]).mean()
    rnd = RandomPolicy(tuple(ctrl.meta["fractions"]), seed=0)(x2, torch.arange(len(x2)))
    random_cost = cost2.gather(1, rnd[:, None]).mean()
    assert learned < 0.5 * random_cost
    assert abs(avg_bits(ctrl(x2), bits) - target) < 0.15


def test_dropped_feature_is_ignored():
    x, cost = _synthetic()
    ctrl, _ = train_controller(x, cost, target_bits=3.0, group=64, cfg=TrainConfig(steps=200, drop_feature=3))
    assert (ctrl.w1[:, 3] == 0).all()
    x2 = x.clone()
    x2[:, 3] = torch.randn(len(x))
    assert torch.equal(ctrl(x), ctrl(x2))


def test_save_load_round_trip(tmp_path):
    x, cost = _synthetic()
    ctrl, _ = train_controller(
        x, cost, target_bits=3.0, group=64, cfg=TrainConfig(steps=200), meta={"budget_bits": 3.0}
    )
    path = tmp_path / "c.safetensors"
    ctrl.save(path)
    back = Controller.load(path)
    assert torch.equal(back(x), ctrl(x))
    assert back.meta == json.loads(json.dumps(ctrl.meta))
    assert back.meta["features"] == list(FEATURES) and back.meta["classes"] == list(CLASSES)
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------- inside the cache
def test_recording_policy_delegates(tiny_model):
    sess = Session(
        tiny_model,
        CacheOptions(policy="random:0.25,0.25,0.25,0.25", max_context=128, sinks=SINKS, window=WINDOW, group=GROUP),
    )
    ids = _ids(tiny_model, 100)
    sess.prefill(ids)
    plain = sess.kv_stats()
    pos, feats, _ = record_features(sess, ids)
    assert sess.kv_stats() == plain  # same decisions with the wrapper
    assert pos.tolist() == list(range(SINKS, len(ids) - WINDOW))
    assert feats.shape == (len(pos), len(FEATURES)) and torch.isfinite(feats).all()
    assert not isinstance(sess.cache.policy, RecordingPolicy)


def test_learned_policy_in_cache_uses_controller(tiny_model, tmp_path):
    """Every evicted token lands in the pool the controller picks from the features the cache saw."""
    x, cost = _synthetic()
    ctrl, _ = train_controller(x, cost, target_bits=4.0, group=64, cfg=TrainConfig(steps=100))
    # decide on the tiny model's real feature range: re-centre the normalisation on recorded features
    sess = Session(tiny_model, CacheOptions(policy="fp16", max_context=256, sinks=SINKS, window=WINDOW, group=GROUP))
    ids = _ids(tiny_model, 200)
    _, feats, _ = record_features(sess, ids)
    with torch.no_grad():
        ctrl.feat_mean.copy_(feats.mean(0))
        ctrl.feat_std.copy_(feats.std(0).clamp(min=1e-6))
        ctrl.class_bias.zero_()
    ctrl.meta["fractions"] = [1.0, 1.0, 1.0, 1.0]  # room everywhere: no overflow
    path = tmp_path / "ctrl.safetensors"
    ctrl.save(path)
    sess = Session(
        tiny_model, CacheOptions(policy=f"learned:{path}", max_context=256, sinks=SINKS, window=WINDOW, group=GROUP)
    )
    pos, feats, _ = record_features(sess, ids)
    want = ctrl(feats)
    assert len(set(want.tolist())) > 1  # a real test: more than one class chosen
    cache = sess.cache
    got = torch.full_like(pos, -1)
    for i, c in enumerate(CLASSES):
        slots = getattr(cache, f"pool_pos{c}")[: int(cache.fill[i])]
        for p in slots.tolist():
            got[pos == p] = i
    assert torch.equal(got, want)


# ---------------------------------------------------------------- the command
def _args(tmp_path, corpus, **over):
    from kvexport.controller.cli import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    argv = [
        "--model",
        "tiny-random",
        "--kv-budget-bits",
        "8",
        "--corpus",
        str(corpus),
        "--out",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--windows",
        "2",
        "--window-tokens",
        "80",
        "--horizon",
        "16",
        "--eval-windows",
        "1",
        "--eval-tokens",
        "128",
        "--hidden",
        "8",
    ]
    for k, v in over.items():
        argv += [f"--{k}", str(v)]
    return p.parse_args(argv)


def test_calibrate_command_tiny(tiny_model, tmp_path, monkeypatch):
    import kvexport.models.loader as loader
    from kvexport.controller import calibrate

    monkeypatch.setattr(loader, "resolve", lambda name, **kw: tiny_model)
    corpus = tmp_path / "wiki.raw"
    para = " = Heading = \n Some text about the river , which flows 120 km to the sea . It was built in 1901 . \n"
    corpus.write_text(para * 80)
    args = _args(tmp_path, corpus)
    assert calibrate.run(args) == 0
    out = tmp_path / "out"
    ctrl = Controller.load(out / "controller-8.safetensors")
    assert ctrl.n_params() <= 500 and sum(ctrl.meta["fractions"]) == pytest.approx(1.0)
    rep = json.loads((out / "report-8.json").read_text())
    assert rep["parameters"] == ctrl.n_params()
    assert set(rep["heldout"]) >= {"fp16", "learned", "random:8", "static-2", "static-4", "rule"}
    assert rep["heldout"]["fp16"]["kl"] == 0.0 and rep["heldout"]["static-2"]["kl"] > 0
    assert abs(rep["heldout"]["learned"]["avg_bits"] - 8.0) <= 0.15
    assert rep["budget_check"]["within_0.15"]
    # restart: cached labels and evaluations give the same controller
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert any(n.startswith("window") for n in cached) and any(n.startswith("eval-") for n in cached)
    before = (out / "controller-8.safetensors").read_bytes()
    assert calibrate.run(args) == 0
    assert (out / "controller-8.safetensors").read_bytes() == before


def test_calibrate_rejects_bad_budget(tiny_model, tmp_path, monkeypatch):
    import kvexport.models.loader as loader
    from kvexport.controller import calibrate

    monkeypatch.setattr(loader, "resolve", lambda name, **kw: tiny_model)
    with pytest.raises(KvxError, match="outside"):
        calibrate.run(_args(tmp_path, tmp_path / "none.raw", **{"kv-budget-bits": 1.0}))
    with pytest.raises(KvxError, match="corpus not found"):
        calibrate.run(_args(tmp_path, tmp_path / "none.raw"))
