"""Fixtures for the kvexport.ops tests.

The ExecuTorch kernel library can be loaded once per process, so everything that must run
*without* it (portable programs, the missing-kernel error) runs in a subprocess.
"""

from __future__ import annotations

import pytest

import kvexport.ops as ops


@pytest.fixture(scope="session")
def et_runtime():
    """The ExecuTorch Python runtime with the kvexport kernel library loaded (built on first use)."""
    ops.load()
    ops.load_executorch_kernels()
    from executorch.runtime import Runtime

    return Runtime.get()


@pytest.fixture(scope="session")
def custom_pte():
    """.pte bytes of KvOps (bits 2/4/8, custom ops, Linear on XNNPACK) per GQA ratio; exported once."""
    from kvops_testlib import HEADS, KvOps, R, export_et, make_inputs

    ops.load()
    cache = {}

    def get(heads: str) -> bytes:
        if heads not in cache:
            hq, hkv = HEADS[heads]
            cache[heads] = export_et(KvOps().eval(), make_inputs(16, hq, hkv, R, 9))
        return cache[heads]

    return get
