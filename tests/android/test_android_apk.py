"""Structural APK build (aapt2, kotlinc, dx, zipalign, apksigner): a PACKAGING CHECK, NOT A RUNNABLE APP.
The APK lacks the ExecuTorch classes and native libraries (see kvexport/android/apk.py)."""

from __future__ import annotations

import json
import zipfile

import pytest

from kvexport.android.apk import ALIGN, build_apk

pytestmark = pytest.mark.android


def test_structural_apk_packaging(toolchain, bundled_app, tmp_path):
    from kvx_android_helpers import require
    require(toolchain, "apt:", "tool:", "npm:kotlin-compiler", "npm:react-native-executorch")
    app, _ = bundled_app
    # aapt2 stores poorly-compressible files anyway; a highly compressible probe .pte shows that the
    # "*.pte is never compressed" rule (Gradle: androidResources.noCompress "pte") is what keeps programs stored
    probe = app / "app/src/main/assets/zz_compressible_probe.pte"
    probe.write_bytes(b"\0" * 1_000_000)
    try:
        res = build_apk(toolchain, app, tmp_path / "apk")
    finally:
        probe.unlink()
    print(f"packaging check (not a runnable app): {res.apk} {res.apk.stat().st_size} bytes")
    assert "Verifies" in res.verify_output, res.verify_output
    contract = json.loads((app / "app/src/main/assets/io_contract.json").read_text())
    pte = f"assets/{contract['program']}"
    with zipfile.ZipFile(res.apk) as z:
        names = set(z.namelist())
        assert {"AndroidManifest.xml", "classes.dex", "resources.arsc", pte, "assets/io_contract.json",
                "assets/tokenizer.json"} <= names
        info = z.getinfo(pte)
        assert info.compress_type == zipfile.ZIP_STORED
        assert info.file_size == (app / "app/src/main/assets" / contract["program"]).stat().st_size
        assert z.read(pte) == (app / "app/src/main/assets" / contract["program"]).read_bytes()
    assert res.stored_entries[pte] % ALIGN == 0
    assert "assets/zz_compressible_probe.pte" in res.stored_entries
    assert "package: name='org.kvexport.demo'" in res.badging, res.badging[:2000]
    assert "launchable-activity: name='org.kvexport.demo.MainActivity'" in res.badging, res.badging[:2000]
    assert "Lorg/kvexport/demo/MainActivity;" in res.dex_classes
    assert "Lorg/kvexport/demo/core/Generator;" in res.dex_classes
    assert "Lkotlin/jvm/internal/Intrinsics;" in res.dex_classes
