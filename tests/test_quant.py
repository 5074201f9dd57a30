"""Quantizers and packing: round trips, error bounds, storage accounting."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvexport.kv import quant
from kvexport.kv.policy import class_bits
from kvexport.options import DEFAULT_CLASSES


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), rows=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_unpack_inverts_pack(bits, rows, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, 3, 64), generator=g, dtype=torch.uint8)
    packed = quant.pack(codes, bits)
    assert packed.shape[-1] == 64 * bits // 8 and packed.dtype == torch.uint8
    assert torch.equal(quant.unpack(packed, bits), codes)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([2, 4, 8]),
    group=st.sampled_from([16, 32, 64]),
    seed=st.integers(0, 10_000),
    scale=st.floats(1e-3, 1e3),
    shift=st.floats(-100, 100),
)
def test_dequantization_error_within_half_a_step(bits, group, seed, scale, shift):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 2, 64, generator=g) * scale + shift
    codes, s, z = quant.quantize(x, bits, group)
    assert codes.max() <= 2**bits - 1
    err = (quant.dequantize(codes, s, z, group) - x).abs().reshape(4, 2, 64 // group, group)
    half_step = s.float().unsqueeze(-1) / 2
    # fp32 arithmetic adds a few ulps of the values involved on top of the half step
    assert (err <= half_step + 4e-7 * (x.abs().max() + abs(shift))).all()


@pytest.mark.parametrize("bits", [2, 4])
def test_clipping_spans_the_middle_of_the_range_and_saturates_outliers(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(256, 64, generator=g)
    x[:, 5], x[:, 6] = 12.0, -12.0  # two outlier channels
    codes, s, z = quant.quantize(x, bits, 64, clip=0.6)
    full = quant.quantize(x, bits, 64)
    assert torch.equal(quant.quantize(x, bits, 64, clip=1.0)[0], full[0])
    assert (s.float() < full[1].float()).all()  # a finer grid ...
    assert (codes[:, 5] == 2**bits - 1).all() and (codes[:, 6] == 0).all()  # ... that saturates the outliers
    inner = torch.ones(64, dtype=torch.bool)
    inner[5:7] = False
    err = (quant.dequantize(codes, s, z, 64) - x)[:, inner].pow(2).mean()
    err_full = (quant.dequantize(*full, 64) - x)[:, inner].pow(2).mean()
    assert err < 0.7 * err_full
    with pytest.raises(ValueError, match="clip ratio"):
        quant.check_clip(0.0)


def test_constant_group_is_exact():
    x = torch.full((1, 1, 64), 0.3)
    codes, s, z = quant.quantize(x, 4, 64)
    assert torch.allclose(quant.dequantize(codes, s, z, 64), x, atol=2e-4)


def test_known_packing_layout():
    codes = torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8)
    assert quant.pack(codes, 2).tolist() == [[1 + 2 * 4 + 3 * 16]]
    assert quant.pack(torch.tensor([[5, 9]], dtype=torch.uint8), 4).tolist() == [[5 + 9 * 16]]


@pytest.mark.parametrize(
    "bits,group,expected", [(4, 64, 4.5), (2, 64, 2.5), (8, 64, 8.5), (4, 32, 5.0), (16, 64, 16.0)]
)
def test_bits_per_element_counts_metadata(bits, group, expected):
    assert quant.bits_per_element(bits, group) == expected


def test_hadamard_is_orthonormal_and_rejects_odd_dims():
    h = quant.hadamard(64)
    assert torch.allclose(h @ h.T, torch.eye(64), atol=1e-6)
    with pytest.raises(ValueError):
        quant.hadamard(48)


def test_rotate_is_the_hadamard_matmul_and_independent_of_the_batch_shape():
    g = torch.Generator().manual_seed(0)
    for d in (4, 32, 64):
        x = torch.randn(5, 3, 7, d, generator=g) * 3
        r = quant.rotate(x)
        torch.testing.assert_close(r, x @ quant.hadamard(d), rtol=1e-5, atol=1e-5)
        assert torch.equal(quant.rotate(x[2:3, 1]), r[2:3, 1])  # additions only: no shape-dependent rounding
        torch.testing.assert_close(quant.rotate(r), x, rtol=1e-5, atol=1e-5)  # H is symmetric and orthonormal
    with pytest.raises(ValueError, match="--no-kv-rotate"):
        quant.rotate(torch.zeros(2, 48))


def test_layout_checks():
    with pytest.raises(ValueError, match="group size"):
        quant.check_layout(64, 4, 48)
    with pytest.raises(ValueError, match="bit-width"):
        quant.check_layout(64, 3, 64)


def test_class_specs_name_value_bits_per_key_class():
    assert quant.parse_classes("k2v2,k4v4,k8v8") == quant.EQUAL_VALUE_BITS
    assert quant.parse_classes("k4v2, k8v4") == (2, 2, 4)
    assert quant.classes_spec(quant.parse_classes("k8v2")) == "k2v2,k4v4,k8v2"
    for bad in ("k4v8", "k3v2", "k4", "none", "k4v2,"):
        with pytest.raises(ValueError, match="bad --kv-classes entry"):
            quant.parse_classes(bad)
    assert class_bits(64, (2, 2, 4)) == [2.5, 3.5, 6.5, 16.0]
    # the torch-free default of --kv-classes (kvexport.options) names the equal classes
    assert DEFAULT_CLASSES == quant.classes_spec(quant.EQUAL_VALUE_BITS)
