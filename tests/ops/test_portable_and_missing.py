"""Programs that must run on a stock ExecuTorch runtime (no kvexport kernel library), and the
one-line error for a program that needs the library when it is not loaded. Both run in a fresh
interpreter: the kernel library can only be loaded once per process and never unloaded."""

from __future__ import annotations

import json

import pytest
import torch
from kvops_testlib import GROUP, HEADS, KvOps, R, check_outputs, export_et, make_inputs, run_python

import kvexport.ops as ops

HQ, HKV = HEADS["gqa3"]
CASES = [(7, 0), (7, 7), (64, 33), (257, 129)]

RUN_WITHOUT_LIBRARY = r"""
import json, sys
import torch
from executorch.runtime import Runtime
import kvexport.ops as ops
spec = json.loads(sys.argv[1])
runtime = Runtime.get()
assert not ops.kernels_loaded()
assert not any(n.startswith("kvexport::") for n in runtime.operator_registry.operator_names)
maps = open("/proc/self/maps").read()
assert "libkvexport_ops" not in maps, "kernel library is loaded"
results = {}
for name, pte in spec["programs"].items():
    method = runtime.load_program(pte).load_method("forward")
    results[name] = [method.execute(list(inp)) for inp in torch.load(spec["inputs"])]
torch.save(results, spec["out"])
print("ran", sorted(results))
"""


def test_portable_programs_run_without_library(tmp_path):
    """The module with the reference inlined (portable=True; bits 4), and the custom-op export
    turned portable by run_decompositions (bits 2 and 8), run on the stock runtime and match the
    reference."""
    ops.load()
    example = make_inputs(16, HQ, HKV, R, 9)
    bits_of = {"inlined": (4,), "decomposed": (2, 8)}
    programs = {
        "inlined": export_et(KvOps(bits_of["inlined"], portable=True).eval(), example),
        "decomposed": export_et(KvOps(bits_of["decomposed"]).eval(), example, decompose=True),
    }
    paths = {}
    for name, pte in programs.items():
        assert ops.program_custom_ops(pte) == [], name
        paths[name] = str(tmp_path / f"{name}.pte")
        with open(paths[name], "wb") as f:
            f.write(pte)
    inputs = [make_inputs(n, HQ, HKV, R, nv, seed=1000 + i) for i, (n, nv) in enumerate(CASES)]
    torch.save(inputs, tmp_path / "inputs.pt")
    spec = {"programs": paths, "inputs": str(tmp_path / "inputs.pt"), "out": str(tmp_path / "out.pt")}
    proc = run_python(RUN_WITHOUT_LIBRARY, json.dumps(spec))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = torch.load(tmp_path / "out.pt")
    for name in programs:
        for (n, nv), inp, out in zip(CASES, inputs, results[name]):
            check_outputs(out, inp, bits_of[name], GROUP, f"portable/{name} N={n} n_valid={nv}")


LOAD_WITHOUT_LIBRARY = r"""
import sys
import kvexport.ops as ops
try:
    ops.load_method(sys.argv[1])
except ops.KernelLibraryError as e:
    print(e)
    sys.exit(3)
print("loaded?!")
"""


def test_missing_library_gives_one_line_error(tmp_path, custom_pte):
    path = tmp_path / "custom.pte"
    path.write_bytes(custom_pte("gqa3"))
    proc = run_python(LOAD_WITHOUT_LIBRARY, str(path))
    assert proc.returncode == 3, proc.stdout + proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, lines
    msg = lines[0]
    for needle in ("kvexport::quantize_pack.out", "kvexport::pool_attention.out", "libkvexport_ops.so",
                   "load_executorch_kernels", "--ops portable"):
        assert needle in msg, (needle, msg)
    # the runtime itself reported the missing operators (error 0x14)
    assert "Missing operator" in proc.stderr and "kvexport::" in proc.stderr


def test_missing_kernel_message_parsing():
    err = RuntimeError("Failed to load method forward, error: 0x:14")
    log = "[method.cpp:819] Missing operator: [2] kvexport::pool_attention.out\n"
    msg = ops.missing_kernel_message(err, log=log)
    assert msg is not None and "kvexport::pool_attention.out" in msg and "\n" not in msg
    # other failures, and missing operators that are not ours, are left alone
    assert ops.missing_kernel_message(RuntimeError("Failed to load method forward, error: 0x:12"), log=log) is None
    assert ops.missing_kernel_message(err, log="Missing operator: [0] llama::custom_sdpa.out") is None
    with pytest.raises(ops.KernelLibraryError):
        ops.raise_if_missing_kernel(err, log=log)
    ops.raise_if_missing_kernel(RuntimeError("something else"))

