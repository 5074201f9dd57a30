"""The C++ ExecuTorch kernels, run through real .pte programs in the ExecuTorch Python runtime,
against the reference in kvexport.kv."""

from __future__ import annotations

import pytest
import torch
from kvops_testlib import (
    BITS,
    CLASSES,
    GROUP,
    HEADS,
    OUTPUT_NAMES,
    R,
    assert_quant_identical,
    check_outputs,
    make_inputs,
    stress_rows,
)

import kvexport.ops as ops
from kvexport.kv import quant


@pytest.fixture(scope="module")
def methods(et_runtime, custom_pte):
    loaded = {}

    def get(heads):
        if heads not in loaded:
            pte = custom_pte(heads)
            assert ops.program_custom_ops(pte) == [
                "kvexport::quantize_pack.out",
                "kvexport::pool_attention.out",
            ]
            loaded[heads] = et_runtime.load_program(pte).load_method("forward")
        return loaded[heads]

    return get


@pytest.mark.parametrize("heads", sorted(HEADS))
def test_program_matches_reference(methods, heads):
    """bits 2/4/8; odd, tiny and larger N; n_valid = 0, an odd prefix, N, and > N (clamped)."""
    method = methods(heads)
    hq, hkv = HEADS[heads]
    cases = [(1, 0), (1, 1), (7, 0), (7, 3), (7, 7), (64, 33), (64, 64), (257, 0), (257, 129), (257, 257), (5, 9)]
    for i, (n, nv) in enumerate(cases):
        inputs = make_inputs(n, hq, hkv, R, nv, seed=i)
        out = method.execute(list(inputs))
        check_outputs(out, inputs, CLASSES, GROUP, f"{heads} N={n} n_valid={nv}")


def test_long_pool_accuracy(methods):
    """Decode-sized pool (N=4096, Hq=9, Hkv=3): the flash-style accumulation stays within 1e-5."""
    method = methods("gqa3")
    for nv in (4096, 3001):
        inputs = make_inputs(4096, 9, 3, R, nv, seed=7 + nv)
        out = method.execute(list(inputs))
        check_outputs(out, inputs, CLASSES, GROUP, f"N=4096 n_valid={nv}")


def test_only_prefix_is_read(methods):
    """Slots >= n_valid are never read: NaN/inf K and V there change nothing."""
    method = methods("gqa3")
    xk, xv, q, nv = make_inputs(64, 9, 3, R, 20, seed=3)
    clean = method.execute([xk, xv, q, nv])
    xk2, xv2 = xk.clone(), xv.clone()
    xk2[20:] = float("nan")
    xv2[20:] = float("inf")
    dirty = method.execute([xk2, xv2, q, nv])
    k = len(OUTPUT_NAMES)
    for i in range(len(CLASSES)):
        for name, a, b in zip("oml", clean[i * k + 7:(i + 1) * k], dirty[i * k + 7:(i + 1) * k]):
            assert torch.equal(a, b), name


STRESS = [(b, g, c) for b in BITS for g in (8, 32, 64) for c in (1.0, 0.7)] + [(2, 64, 0.65), (4, 32, 0.9)]


class _Quant(torch.nn.Module):
    def forward(self, x):
        outs = []
        for bits, group, clip in STRESS:
            p, s, z = torch.ops.kvexport.quantize_pack(x, bits, group, clip)
            outs += [p, s, z]
        return tuple(outs)


def test_quantize_pack_bit_exact_stress(et_runtime):
    """~2k rows x 4 heads of corner-case data, bits 2/4/8 x group 8/32/64 x clip ratios: codes,
    scales and zeros bit-identical to quant.quantize_packed."""
    from executorch.exir import to_edge_transform_and_lower

    ops.load()
    x = stress_rows(2048, seed=1)
    x = torch.cat([x, x.clamp(-6e4, 6e4).half().float()])  # fp16-valued rows (as the cache evicts): ties are common
    ep = torch.export.export(_Quant(), (x[:16],), dynamic_shapes=({0: torch.export.Dim("n", max=8192)},))
    method = et_runtime.load_program(to_edge_transform_and_lower(ep).to_executorch().buffer).load_method("forward")
    out = method.execute([x])
    for i, (bits, group, clip) in enumerate(STRESS):
        p, s, z = out[3 * i:3 * i + 3]
        ref = quant.quantize_packed(x, bits, group, clip)
        assert_quant_identical((p, s, z), ref, f"bits={bits} group={group} clip={clip}")


def test_load_is_idempotent_and_single_copy(et_runtime, tmp_path):
    path = ops.load_executorch_kernels()
    assert ops.load_executorch_kernels() == path
    assert ops.load_executorch_kernels(path) == path
    other = tmp_path / "libkvexport_ops.so"
    other.write_bytes(path.read_bytes())
    with pytest.raises(ops.KernelLibraryError, match="already loaded"):
        ops.load_executorch_kernels(other)
    names = set(et_runtime.operator_registry.operator_names)
    assert {"kvexport::quantize_pack.out", "kvexport::pool_attention.out", "kvexport::layer_attention.out"} <= names


class _Q8Head(torch.nn.Module):
    def __init__(self, codes, scales):
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)

    def forward(self, x):
        return torch.ops.kvexport.q8_linear(x, self.codes, self.scales)


def test_q8_linear_matches_reference(et_runtime):
    """kvexport::q8_linear.out against tied.q8_0_linear: 1 and 5 input rows (the decode and the chunk
    path), an odd number of output rows (the thread split's tail), an all-zero block, large and tiny
    magnitudes."""
    from kvexport.models.tied import q8_0_linear

    ops.load()
    gen = torch.Generator().manual_seed(11)
    codes = torch.randint(-127, 128, (1001, 96), generator=gen, dtype=torch.int8)
    scales = (torch.rand(1001, 3, generator=gen) * 0.02 + 1e-5).half()
    ep = torch.export.export(_Q8Head(codes, scales), (torch.randn(2, 96),),
                             dynamic_shapes=({0: torch.export.Dim("m", max=64)},))
    from executorch.exir import to_edge_transform_and_lower

    method = et_runtime.load_program(to_edge_transform_and_lower(ep).to_executorch().buffer).load_method("forward")
    for m in (1, 5):
        x = torch.randn(m, 96, generator=gen) * torch.tensor([3.0, 1e-4, 40.0]).repeat_interleave(32)
        x[0, 32:64] = 0
        got = method.execute([x])[0]
        want = q8_0_linear(x, codes, scales)
        assert got.shape == (m, 1001)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), f"M={m}"
