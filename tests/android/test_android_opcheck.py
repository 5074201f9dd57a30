"""Every operator of the program is registered in the Android runtime library the app would load."""

from __future__ import annotations

import pytest

from kvexport.android import opcheck

pytestmark = pytest.mark.android
ABIS = ["arm64-v8a", "x86_64"]


@pytest.fixture(scope="module")
def libs(toolchain):
    from kvx_android_helpers import require

    require(toolchain, "npm:react-native-executorch")
    return {abi: opcheck.read_library(toolchain.libexecutorch(abi)) for abi in ABIS}


@pytest.mark.parametrize("abi", ABIS)
def test_library_kernel_table_is_readable(libs, abi):
    lib = libs[abi]
    # sanity of the detector itself: well-known kernels found through the kernel table, nonsense not found
    assert lib.kernels.get("aten::add.out") == "table"
    assert lib.kernels.get("aten::mm.out") == "table"
    assert "aten::definitely_not_an_op.out" not in lib.kernels
    assert lib.has_backend("XnnpackBackend")
    assert not lib.has_backend("KvexportNoSuchBackend")
    assert len(lib.kernels) > 100


@pytest.mark.parametrize("abi", ABIS)
def test_program_ops_registered(toolchain, libs, program_dir, abi):
    rep = opcheck.check_program_dir(program_dir, toolchain.libexecutorch(abi))
    print(rep.summary())
    assert rep.operators, "no operators read from the program"
    assert opcheck.inconsistent_ops_mode(rep) is None
    if rep.ops_mode == "fused" or rep.custom_ops:
        assert rep.needs_custom_runtime
        assert set(rep.custom_ops) <= set(rep.missing), "kvexport kernels unexpectedly in the stock runtime"
        pytest.skip(
            f"SKIPPED: ops_mode={rep.ops_mode}: needs a custom runtime build with {rep.custom_ops}; "
            f"other missing: {sorted(set(rep.missing) - set(rep.custom_ops))}"
        )
    assert not rep.missing, rep.summary()
    assert not rep.missing_backends, rep.summary()


def test_custom_and_missing_ops_are_flagged(toolchain, libs, program_dir, monkeypatch):
    monkeypatch.setattr(
        opcheck,
        "program_operators",
        lambda pte: (
            ["aten::add.out", "aten::made_up_op.out", "kvexport::kv_quant_update.out"],
            ["XnnpackBackend", "MadeUpBackend"],
        ),
    )
    rep = opcheck.check_program_dir(program_dir, toolchain.libexecutorch("arm64-v8a"))
    assert rep.custom_ops == ["kvexport::kv_quant_update.out"] and rep.needs_custom_runtime
    assert rep.missing == ["aten::made_up_op.out", "kvexport::kv_quant_update.out"]
    assert rep.missing_backends == ["MadeUpBackend"]
    assert not rep.ok_on_stock_runtime
    rep.ops_mode = "portable"
    assert "portable" in opcheck.inconsistent_ops_mode(rep)
