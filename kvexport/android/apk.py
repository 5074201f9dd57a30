"""Structural APK build — a PACKAGING CHECK, NOT A RUNNABLE APP.

Builds ``android_demo`` by hand with Debian's Android tools (aapt2, dx,
zipalign, apksigner) and kotlinc, against android.jar API 23, to prove that
the manifest/resources link, the Kotlin sources compile for Android and dex,
the bundled program sits in the APK *stored* (uncompressed) and aligned, and
the result signs and verifies.

What the APK lacks, on purpose (so it cannot run): the ExecuTorch Java
classes and ``libexecutorch.so``/``libfbjni.so`` — in the real Gradle build
they come from the executorch-android AAR (its classes are Java 11 bytecode
that Debian's ``dx`` cannot dex; ``libfbjni.so`` is in no available package).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kvexport.android.jvm import KOTLINC_FLAGS, kotlinc, prune
from kvexport.android.provision import Toolchain

ALIGN = 4


@dataclass
class ApkResult:
    apk: Path
    verify_output: str
    stored_entries: dict[str, int]     # name -> data offset
    dex_classes: list[str]
    badging: str


def _run(tc: Toolchain, cmd: list[str], what: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, env=tc.env(), timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed ({' '.join(cmd[:3])} ...):\n{r.stdout}\n{r.stderr}")
    return r.stdout + r.stderr


def data_offset(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> int:
    """Offset of an entry's data in the archive (after its local file header)."""
    fp = zf.fp
    fp.seek(info.header_offset)
    hdr = fp.read(30)
    name_len = int.from_bytes(hdr[26:28], "little")
    extra_len = int.from_bytes(hdr[28:30], "little")
    return info.header_offset + 30 + name_len + extra_len


def build_apk(tc: Toolchain, app_dir, out_dir) -> ApkResult:
    app_dir, out_dir = Path(app_dir), Path(out_dir)
    main = app_dir / "app/src/main"
    assets = main / "assets"
    if not (assets / "io_contract.json").is_file():
        raise RuntimeError(f"{assets} has no bundled program: run bundle() first")
    out_dir.mkdir(parents=True, exist_ok=True)
    aapt2, zipalign = tc.tool("aapt2"), tc.tool("zipalign")

    # 1. resources + manifest (+ assets, *.pte kept uncompressed).  Like AGP's manifest
    #    merger, inject the package name from `namespace` in app/build.gradle.
    m = re.search(r'namespace\s*=?\s*["\']([\w.]+)["\']', (app_dir / "app/build.gradle").read_text())
    if not m:
        raise RuntimeError("no namespace in app/build.gradle")
    manifest = out_dir / "AndroidManifest.xml"
    manifest.write_text((main / "AndroidManifest.xml").read_text().replace(
        "<manifest ", f'<manifest package="{m.group(1)}" ', 1))
    res_zip = out_dir / "res.zip"
    _run(tc, [*aapt2, "compile", "--dir", str(main / "res"), "-o", str(res_zip)], "aapt2 compile")
    base = out_dir / "base.apk"
    _run(tc, [*aapt2, "link", "-I", str(tc.android_jar), "--manifest", str(manifest),
              "--min-sdk-version", "23", "--target-sdk-version", "23", "--version-code", "1",
              "--version-name", "0.1", "-A", str(assets), "-0", ".pte", "-o", str(base), str(res_zip)], "aapt2 link")

    # 2. Kotlin -> JVM classes (Java 8 bytecode, no invokedynamic lambdas so dx accepts them)
    srcs = sorted((main / "java").rglob("*.kt"))
    h = hashlib.sha256("|".join(KOTLINC_FLAGS).encode())
    for s in srcs:
        h.update(s.read_bytes())
    classes = kotlinc(tc, srcs, [tc.android_jar, tc.executorch_classes_jar],
                      tc.root / "build" / f"apk-{h.hexdigest()[:16]}")
    prune(classes.parent, "apk-", classes)

    # 3. dex: app classes + kotlin-stdlib (minus Java 9 module descriptors)
    stdlib = tc.root / "build" / "kotlin-stdlib-dx"
    if not (stdlib / ".ok").exists():
        shutil.rmtree(stdlib, ignore_errors=True)
        with zipfile.ZipFile(tc.kotlin_stdlib) as z:
            for n in z.namelist():
                if n.endswith(".class") and not n.startswith("META-INF/") and not n.endswith("module-info.class"):
                    z.extract(n, stdlib)
        (stdlib / ".ok").touch()
    dex = out_dir / "classes.dex"
    _run(tc, [*tc.tool("dx"), "--min-sdk-version=26", f"--output={dex}", str(classes), str(stdlib)], "dx")
    with zipfile.ZipFile(base, "a", compression=zipfile.ZIP_DEFLATED) as z:
        z.write(dex, "classes.dex")

    # 4. align, sign, verify
    aligned = out_dir / "aligned.apk"
    _run(tc, [*zipalign, "-f", "-p", str(ALIGN), str(base), str(aligned)], "zipalign")
    _run(tc, [*zipalign, "-c", "-p", str(ALIGN), str(aligned)], "zipalign -c")
    ks = tc.root / "debug.keystore"
    if not ks.exists():
        _run(tc, ["keytool", "-genkeypair", "-keystore", str(ks), "-storepass", "android", "-keypass", "android",
                  "-alias", "androiddebugkey", "-keyalg", "RSA", "-keysize", "2048", "-validity", "10000",
                  "-dname", "CN=kvexport debug"], "keytool")
    apk = out_dir / "kvexport-demo-structural.apk"
    _run(tc, [*tc.tool("apksigner"), "sign", "--ks", str(ks), "--ks-pass", "pass:android",
              "--min-sdk-version", "23", "--out", str(apk), str(aligned)], "apksigner sign")
    verify = _run(tc, [*tc.tool("apksigner"), "verify", "--verbose", "--min-sdk-version", "23", str(apk)],
                  "apksigner verify")

    stored = {}
    with zipfile.ZipFile(apk) as z:
        for info in z.infolist():
            if info.compress_type == zipfile.ZIP_STORED:
                stored[info.filename] = data_offset(z, info)
    dump = _run(tc, [*tc.tool("dexdump"), str(dex)], "dexdump")
    dex_classes = [ln.split("'")[1] for ln in dump.splitlines() if "Class descriptor" in ln]
    badging = _run(tc, [*aapt2, "dump", "badging", str(apk)], "aapt2 dump badging")
    return ApkResult(apk, verify, stored, dex_classes, badging)
