"""The layer forms that keep a decode step inside XNNPACK: the q4 block sums as a linear, RMSNorm's mean as a linear,
q/k/v and gate/up as one linear each — each against the reference form in float64 — and the census they buy: a layer
adds only its ``kvexport::layer_attention`` call (which splits the heads and applies RoPE itself) and two splits to
the operator calls a fused ExecuTorch program makes outside XNNPACK."""

from __future__ import annotations

import dataclasses
import json
import re

import torch
import torch.nn.functional as F

from kvexport.export.build import build
from kvexport.export.executorch import LinearRMSNorm, delegable_forms
from kvexport.models.llama import Attention, FeedForward, FusedAttention, FusedFeedForward, RMSNorm
from kvexport.models.loader import LoadedModel
from kvexport.models.q4 import BLOCK, Q4Linear, block_ones
from kvexport.session import CacheOptions

# layer_attention + the splits of qkv and gate_up (XNNPACK takes no slice of a dynamic-length tensor)
PER_LAYER_CALLS = 3


def test_block_sums_and_linear_norm_match_the_reference_forms_in_float64():
    x = torch.randn(3, 7, 96, dtype=torch.float64)
    torch.testing.assert_close(F.linear(x, block_ones(96).double()), x.unflatten(-1, (96 // BLOCK, BLOCK)).sum(-1),
                               rtol=1e-14, atol=1e-13)
    norm = RMSNorm(96, 1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(96) + 0.5)
    linear = LinearRMSNorm(norm)
    assert linear.weight is norm.weight
    torch.testing.assert_close(linear(x), norm(x), rtol=1e-13, atol=1e-13)


def test_stacked_projections_compute_the_separate_ones_in_float64(tiny_model):
    model = tiny_model.build(fused=False).double()
    assert "layers.0.self_attn.q_proj.weight" in model.state_dict()  # Hugging Face names, as loaded
    x = torch.randn(2, 5, tiny_model.args.dim, dtype=torch.float64)
    block = model.layers[1]
    att, mlp = FusedAttention(block.self_attn), FusedFeedForward(block.mlp)
    for got, want in zip(att.project(x), block.self_attn.project(x)):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-13)
    torch.testing.assert_close(mlp(x), block.mlp(x), rtol=1e-14, atol=1e-13)
    fused = tiny_model.build()  # every program and reference runs this form: 4 linears a block
    assert [type(b.self_attn) for b in fused.layers] == [FusedAttention] * tiny_model.args.n_layers
    assert [type(b.mlp) for b in fused.layers] == [FusedFeedForward] * tiny_model.args.n_layers
    assert not any(type(m) in (Attention, FeedForward) for m in fused.modules())
    assert fused.fuse_projections() is fused and type(fused.layers[0].mlp) is FusedFeedForward  # idempotent


def test_delegable_forms_replace_every_norm_in_place(tiny_model):
    model = tiny_model.build()
    norms = {fqn: m for fqn, m in model.named_modules() if type(m) is RMSNorm}
    assert delegable_forms(model) == len(norms) == 2 * tiny_model.args.n_layers + 1
    assert delegable_forms(model) == 0  # nothing left to replace
    for fqn, old in norms.items():
        new = model.get_submodule(fqn)
        assert isinstance(new, LinearRMSNorm) and new.weight is old.weight and new.eps == old.eps


def test_q4_linears_share_one_block_sum_weight_per_width(tiny_model):
    from kvexport.models.q4 import quantize_q4

    model = tiny_model.build()
    quantize_q4(model)
    by_width = {}
    for m in model.modules():
        if isinstance(m, Q4Linear):
            assert by_width.setdefault(m.in_features, m.block_sums) is m.block_sums
    assert sorted(by_width) == [tiny_model.args.dim, tiny_model.args.intermediate_size]


def test_a_layer_adds_only_its_kernel_and_two_splits_outside_xnnpack(tiny_model, tmp_path):
    # 2 and 3 layers (the third a copy of the second): a 1-layer program partitions its tail differently
    state = {**tiny_model.state_dict, **{k.replace("layers.1.", "layers.2."): v
                                         for k, v in tiny_model.state_dict.items() if "layers.1." in k}}

    def kernel_calls(n_layers: int) -> int:
        keep = {k: v for k, v in state.items()
                if not (m := re.search(r"layers\.(\d+)\.", k)) or int(m.group(1)) < n_layers}
        args = dataclasses.replace(tiny_model.args, n_layers=n_layers)
        loaded = LoadedModel("tiny-random", args, keep, tiny_model.tokenizer, "tiny-random", tiny_model.identity)
        opts = CacheOptions(policy="static-4", max_context=64, window=4, sinks=2)
        out = build(loaded, opts, "executorch", "fused", "fp32", tmp_path / f"l{n_layers}", log=lambda m: None)
        return json.loads((out / "manifest.json").read_text())["executorch"]["kernel_calls_per_step"]

    assert kernel_calls(3) - kernel_calls(2) == PER_LAYER_CALLS
