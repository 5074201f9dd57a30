"""Compile and run the demo's Kotlin core/adapter and its JUnit tests on a
plain JVM, with the tool-chain from :mod:`kvexport.android.provision`.

Compiled classes are cached under ``<cache>/build/<hash of sources>`` so a
second run only re-runs the JVM.  ``MainActivity.kt`` is left out (it needs
android.jar and is compiled by the APK packaging check instead).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kvexport.android.provision import Toolchain

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "android_demo"
MAIN_SRC = DEMO / "app/src/main/java"
TEST_SRC = DEMO / "app/src/test/java"
KOTLINC_FLAGS = ["-nowarn", "-jvm-target", "1.8", "-Xlambdas=class", "-Xsam-conversions=class"]


def sources(root: Path, exclude=("MainActivity.kt",)) -> list[Path]:
    return sorted(p for p in root.rglob("*.kt") if p.name not in exclude)


def _digest(files: list[Path], extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for f in files:
        h.update(str(f.relative_to(REPO)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def kotlinc(tc: Toolchain, srcs: list[Path], classpath: list[Path], out: Path, extra_flags=()) -> Path:
    """Compile into ``out`` unless a finished build of the same inputs is there."""
    stamp = out / ".ok"
    if stamp.exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = dict(os.environ)
    env.setdefault("JAVA_OPTS", "-Xmx1g")
    cmd = [str(tc.kotlinc), *KOTLINC_FLAGS, *extra_flags, "-cp", ":".join(map(str, classpath)),
           "-d", str(out), *map(str, srcs)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        raise RuntimeError(f"kotlinc failed:\n{r.stdout}\n{r.stderr}")
    stamp.touch()
    return out


@dataclass
class JvmBuild:
    main: Path
    test: Path
    runtime_cp: list[Path]

    @property
    def classpath(self) -> str:
        return ":".join(map(str, [self.main, self.test, *self.runtime_cp]))


def prune(parent: Path, prefix: str, keep: Path) -> None:
    """Drop cached builds of older sources (same prefix, other hash)."""
    for d in parent.glob(prefix + "*"):
        if d != keep and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)


def build_jvm(tc: Toolchain) -> JvmBuild:
    main_srcs = sources(MAIN_SRC)
    test_srcs = sources(TEST_SRC)
    key = _digest(main_srcs + test_srcs, "jvm1|" + " ".join(KOTLINC_FLAGS))
    base = tc.root / "build" / f"jvm-{key}"
    libs = [tc.executorch_classes_jar, *tc.junit_jars]
    main = kotlinc(tc, main_srcs, libs, base / "main")
    # tests see `internal` declarations of main, as in Gradle's test source set
    test = kotlinc(tc, test_srcs, [main, *libs], base / "test", [f"-Xfriend-paths={main}"])
    prune(base.parent, "jvm-", base)
    return JvmBuild(main, test, [tc.kotlin_stdlib, *libs])


def junit_classes(build: JvmBuild) -> list[str]:
    """JUnit test classes: compiled classes named *Test (top-level)."""
    out = []
    for p in build.test.rglob("*Test.class"):
        out.append(".".join(p.relative_to(build.test).with_suffix("").parts))
    return sorted(out)


def run_junit(build: JvmBuild, props: dict[str, str] | None = None, classes: list[str] | None = None):
    cmd = ["java", *[f"-D{k}={v}" for k, v in (props or {}).items()], "-cp", build.classpath,
           "org.junit.runner.JUnitCore", *(classes or junit_classes(build))]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def run_parity(build: JvmBuild, *args: str):
    cmd = ["java", "-Xmx1g", "-cp", build.classpath, "org.kvexport.demo.tools.ParityMain", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)
