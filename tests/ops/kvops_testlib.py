"""Shared pieces of the kvexport.ops tests: a tiny module calling the three ops, exporters, inputs
and comparisons against the reference in kvexport.kv (never against the op itself)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import torch

import kvexport.ops as ops
from kvexport.kv import attention, quant

REPO = Path(__file__).resolve().parents[2]
HEADS = {"gqa1": (5, 5), "gqa3": (9, 3)}  # (Hq, Hkv) per GQA ratio
R = 2  # query rows
D = 64
GROUP = 32
SCALE = 1.0 / math.sqrt(D)
MAX_N = 4096
OUTPUT_NAMES = ("kp", "ks", "kz", "vp", "vs", "vz", "q", "o", "m", "l")


BITS = (2, 4, 8)
CLASSES = (2, 4, 8, (4, 2), (8, 4))  # a bit-width for keys and values, or (key bits, value bits)


def sides(cls) -> tuple[int, int]:
    """(key bits, value bits) of a class of :data:`CLASSES`."""
    return cls if isinstance(cls, tuple) else (cls, cls)


class KvOps(torch.nn.Module):
    """For each class (bit-width, or key and value bit-widths): quantize new K/V rows, attend over the
    resulting pool with projected queries (10 outputs per class, see OUTPUT_NAMES; one export covers all).

    The projection is a Linear (delegated to XNNPACK in the .pte); its output is returned so the
    attention reference can use exactly the queries the program saw.
    """

    def __init__(self, bits=CLASSES, group: int = GROUP, portable: bool = False):
        super().__init__()
        self.bits, self.group, self.portable = tuple(bits), group, portable
        self.proj = torch.nn.Linear(D, D)
        g = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(D, D, generator=g) / math.sqrt(D) + torch.eye(D))
            self.proj.bias.copy_(torch.randn(D, generator=g) * 0.1)

    def forward(self, xk, xv, q, n_valid):
        g, p = self.group, self.portable
        q = self.proj(q)
        outs = []
        for cls in self.bits:
            kb, vb = sides(cls)
            kp, ks, kz = ops.quantize_pack(xk, kb, g, portable=p)
            vp, vs, vz = ops.quantize_pack(xv, vb, g, portable=p)
            o, m, l = ops.pool_attention(q, kp, ks, kz, vp, vs, vz, n_valid, kb, g, SCALE, portable=p)
            outs += [kp, ks, kz, vp, vs, vz, q, o, m, l]
        return tuple(outs)


def make_inputs(n: int, hq: int, hkv: int, r: int, n_valid: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xk = torch.randn(n, hkv, D, generator=g) * 2.0 + torch.randn(1, hkv, D, generator=g)  # per-channel offsets
    xv = torch.randn(n, hkv, D, generator=g)
    q = torch.randn(hq, r, D, generator=g) * 2.0
    return xk, xv, q, torch.tensor([n_valid], dtype=torch.int64)


def dynamic_shapes():
    n = torch.export.Dim("n", min=1, max=MAX_N)
    return ({0: n}, {0: n}, None, None)


def export_et(module: torch.nn.Module, example, decompose: bool = False, dynamic=None) -> bytes:
    """torch.export (``dynamic`` shapes, default :func:`dynamic_shapes`) -> (optionally inline the
    reference) -> XNNPACK lowering -> .pte bytes."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    ep = torch.export.export(module, example, dynamic_shapes=dynamic if dynamic is not None else dynamic_shapes())
    if decompose:
        ep = ep.run_decompositions(ops.portable_decompositions())
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    targets = [str(n.target) for n in edge.exported_program().graph.nodes if n.op == "call_function"]
    assert any("executorch_call_delegate" in t for t in targets), "the Linear was not delegated to XNNPACK"
    return edge.to_executorch().buffer


def f16_bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def assert_quant_identical(got, ref, what: str):
    """Packed codes, fp16 scales and zeros all bit-identical."""
    gp, gs, gz = got
    rp, rs, rz = ref
    assert gp.dtype == torch.uint8 and gp.shape == rp.shape, what
    assert torch.equal(gp, rp), f"{what}: packed codes differ at {(gp != rp).nonzero()[:5].tolist()}"
    for name, a, b in (("scale", gs, rs), ("zero", gz, rz)):
        assert a.dtype == torch.float16 and a.shape == b.shape, f"{what}: {name} dtype/shape"
        diff = f16_bits(a) != f16_bits(b)
        assert not diff.any(), (
            f"{what}: {name} differs at {diff.nonzero()[:5].tolist()}: {a[diff][:5]} vs {b[diff][:5]}"
        )


def assert_attention_close(got, ref, what: str, rtol: float = 1e-5):
    for name, a, b in zip("oml", got, ref):
        assert a.dtype == torch.float32 and a.shape == b.shape, f"{what}: {name} dtype/shape {a.shape} vs {b.shape}"
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {name}: {m}")


def check_outputs(out, inputs, bits, group: int, what: str):
    """Compare a program's outputs (KvOps with the classes ``bits``) with the reference applied to the same
    inputs."""
    bits = (bits,) if isinstance(bits, int) else tuple(bits)
    k = len(OUTPUT_NAMES)
    assert len(out) == k * len(bits), (len(out), what)
    for i, b in enumerate(bits):
        _check_one(out[i * k : (i + 1) * k], inputs, b, group, f"{what} bits={b}")


def _check_one(out, inputs, cls, group: int, what: str):
    xk, xv, _, n_valid = inputs
    kb, vb = sides(cls)
    got = dict(zip(OUTPUT_NAMES, out))
    ref_k = quant.quantize_packed(xk, kb, group)
    ref_v = quant.quantize_packed(xv, vb, group)
    assert_quant_identical((got["kp"], got["ks"], got["kz"]), ref_k, f"{what} K")
    assert_quant_identical((got["vp"], got["vs"], got["vz"]), ref_v, f"{what} V")
    ref_att = attention.pool_attention(got["q"], *ref_k, *ref_v, n_valid, kb, group, SCALE)
    assert_attention_close((got["o"], got["m"], got["l"]), ref_att, what)
    nv = int(n_valid)
    if nv <= 0:  # the NEG convention, exactly
        assert torch.all(got["m"] == attention.NEG) and torch.all(got["l"] == 0) and torch.all(got["o"] == 0), what


def stress_rows(n: int, d: int = D, seed: int = 0) -> torch.Tensor:
    """Rows that hit the quantizer's corner cases: magnitudes 1e-9..1e5 (fp16 subnormals and
    near-overflow), fp16-exact values, constant groups, signed zeros, exact .5 ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, d, generator=g) * 10 ** (torch.rand(n, 4, 1, generator=g) * 14 - 9)
    x[::7] = x[::7].half().float()
    x[1::11] = 3.0
    x[2::13, :, : d // 2] = -0.0
    ties = x[3::17]
    x[3::17] = torch.randint(-8, 8, ties.shape, generator=g).float() * 0.5
    big = x[4::19]
    x[4::19] = torch.randn(big.shape, generator=g) * 6e4
    x[5::23] = torch.randn(x[5::23].shape, generator=g) * 1e-6 + 1.0  # tiny range around 1
    return x.clamp(-65000, 65000)


def run_python(code: str, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (repo importable); returns the completed process."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO
    )
