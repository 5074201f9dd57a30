"""ExecuTorch's own llama export (export_llama) of the tiny random Llama as a bench baseline:
the program directory opens through open_runner and matches our fp32-KV reference step by step."""

import json

import pytest
import torch

from kvexport.baselines.executorch_llama import TARGET, export_baseline, meta_state_dict
from kvexport.errors import KvxError
from kvexport.export.manifest import LAYOUT_VERSION, read_manifest
from kvexport.export.runners import open_runner
from kvexport.session import CacheOptions, Session

MAX_CONTEXT = 48
# Measured: max |diff| ~2e-5 on logits of magnitude ~14 (fp32 both sides, different kernels).
RTOL = 1e-4


@pytest.fixture(scope="module")
def baseline(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("graphs") / "tiny-etllama"
    return export_baseline(tiny_model, MAX_CONTEXT, out, log=lambda m: None)


def _close(a, b: torch.Tensor) -> float:
    """``a``: the runner's logits (numpy), ``b``: the reference's."""
    return ((torch.from_numpy(a) - b).abs().max() / b.abs().max()).item()


def test_manifest_is_a_kvexport_program(baseline):
    m = read_manifest(baseline)  # format, layout version and program hash checked
    assert m["layout_version"] == LAYOUT_VERSION and m["target"] == TARGET
    assert m["ops_mode"] == "export_llama" and m["weights"] == "fp32"
    assert m["cache"]["max_context"] == MAX_CONTEXT and m["cache"]["max_chunk"] == MAX_CONTEXT - 1
    assert m["metadata"]["get_max_context_len"] == MAX_CONTEXT and m["metadata"]["get_eos_ids"]
    assert "--use_sdpa_with_kv_cache" in m["export_command"]
    assert not (baseline / "checkpoint.pth").exists() and (baseline / "tokenizer.json").is_file()
    json.dumps(m)


def test_prefill_and_decode_match_fp32_reference(baseline, tiny_model):
    runner = open_runner(baseline)
    ref = Session(tiny_model, CacheOptions(policy="fp32", max_context=MAX_CONTEXT))
    prompt = [1000, 2000, 3000, 4000, 5000, 6000, 7000]
    got = runner.prefill(prompt[:4])
    got = runner.prefill(prompt[4:])  # a second chunk at input_pos 4
    ref.step(prompt[:4])
    want = ref.step(prompt[4:])[-1]
    assert got.shape == want.shape and _close(got, want) < RTOL
    for _ in range(5):
        nxt = int(want.argmax())
        assert int(got.argmax()) == nxt
        got, want = runner.step([nxt]), ref.step([nxt])[-1]
        assert _close(got, want) < RTOL
    stats = runner.last_stats.tolist()
    per_token = 2 * tiny_model.args.n_layers * tiny_model.args.n_kv_heads * tiny_model.args.head_dim * 4
    assert stats[0] == per_token * MAX_CONTEXT and stats[1] == per_token * 12
    assert stats[2] == 32.0 and stats[7] == 12 == runner.pos

    runner.reset()  # a fresh cache: same logits as the first chunk alone
    ref2 = Session(tiny_model, CacheOptions(policy="fp32", max_context=MAX_CONTEXT))
    assert _close(runner.step(prompt), ref2.step(prompt)[-1]) < RTOL
    with pytest.raises(KvxError, match="exceed"):
        runner.step(list(range(100, 100 + MAX_CONTEXT - len(prompt) + 1)))


def test_weights_map_to_meta_names(tiny_model):
    sd = meta_state_dict(tiny_model)
    assert torch.equal(sd["output.weight"], sd["tok_embeddings.weight"])
    assert "layers.1.feed_forward.w1.weight" in sd and "layers.0.attention.wk.weight" in sd
    assert len(sd) == 2 + 1 + tiny_model.args.n_layers * 9
