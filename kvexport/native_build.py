"""Build the kernel libraries: ``libkvexport_ops.so`` for the installed executorch wheel, and
``libkvexport_ort.so``, the ONNX Runtime custom-op library (:func:`build_ort_library`).

The library is cached under ``$KVEXPORT_CACHE`` (default ``~/.cache/kvexport``)
``/ops/<key>/libkvexport_ops.so`` where ``key`` hashes the kernel sources, the compiler flags, the
executorch version and the location of executorch's ``_portable_lib`` (the library is linked to
that exact file, with an rpath to it). ``python -m kvexport.native_build [--force]`` builds it ahead of
time (the install step); :func:`kvexport.ops.load_executorch_kernels` builds it on first use.

The ONNX Runtime library compiles ``ort_ops.cpp`` and the runtime-free core ``layer_attention.cpp`` against
the ONNX Runtime C/C++ API headers, which the pip wheel does not ship: they come from the npm package
``com.github.asus4.onnxruntime`` (API version 29; the library asks the runtime for API 18, so any ONNX
Runtime from 1.18 on loads it), fetched once with ``npm pack`` into ``$KVEXPORT_CACHE/ort-headers/``. The
library itself lives in ``$KVEXPORT_CACHE/ops-ort/<key>/`` (key: sources, flags, header package). It links
to nothing: ONNX Runtime hands it its API when a session registers it.

This module imports no torch (it sits outside :mod:`kvexport.ops`, whose import registers the torch ops): the ONNX
Runtime runner builds and loads the library in a torch-free process (:mod:`kvexport.export.ort_runtime`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

from kvexport.fsutil import cache_root

# The executorch release the kernel sources are written against (headers and kernel ABI change
# between releases; the library must be rebuilt for each one).
EXECUTORCH_VERSION = "1.4.1"
LIB_NAME = "libkvexport_ops.so"
SOURCES = ("kvexport_ops.cpp", "layer_attention.cpp", "layer_attention_executorch.cpp", "q8_linear.cpp")
HEADERS = ("allocate.h", "kernel_common.h", "kernel_math.h", "layer_attention.h")
CSRC = Path(__file__).resolve().parent / "ops" / "csrc"
ORT_LIB_NAME = "libkvexport_ort.so"
ORT_API_VERSION = 18  # what the library asks ONNX Runtime for (ort_ops.cpp kApiVersion): releases from 1.18 on
ORT_SOURCES = ("ort_ops.cpp", "layer_attention.cpp")
ORT_HEADERS = ("allocate.h", "kernel_math.h", "layer_attention.h")
ORT_HEADERS_NPM = ("com.github.asus4.onnxruntime", "0.4.9")
# the C/C++ API headers inside the npm tarball (any one framework's copy)
ORT_HEADERS_IN_TARBALL = ("package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64_x86_64-simulator/"
                          "onnxruntime.framework/Headers/")

def _simd_flags() -> tuple[str, ...]:
    """x86-64: F16C widens fp16 rows in place; AVX2 (where this CPU has it: the library is built on the
    machine that runs it, and the flag is part of its cache key) gives the attention loops 8-wide
    vectors, and FMA (where present) their explicitly fused multiply-adds; ``-ffp-contract=off`` keeps
    the compiler from fusing anything else, so the quantizer stays bit-exact."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ()
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    if " avx2" not in flags:
        return ("-mf16c",)
    return ("-mf16c", "-mavx2", "-mfma") if " fma" in flags else ("-mf16c", "-mavx2")


CXXFLAGS = (
    "-std=c++17",
    "-O3",
    "-fPIC",
    "-shared",
    # bit-exact quantizer: no fused multiply-add, no fast-math reassociation
    "-ffp-contract=off",
    "-fno-fast-math",
    "-fvisibility=hidden",
    "-DNDEBUG",
) + _simd_flags()
ET_DEFINES = ("-DC10_USING_CUSTOM_GENERATED_MACROS", "-DET_USE_THREADPOOL")


class BuildError(RuntimeError):
    """The kernel library could not be built (message is one line)."""


def executorch_version() -> str:
    try:
        from executorch.version import __version__
    except ImportError as e:  # pragma: no cover - executorch is a hard dependency
        raise BuildError(f"executorch is not installed ({e}); install executorch=={EXECUTORCH_VERSION}") from None
    return __version__


def check_executorch_version() -> str:
    version = executorch_version()
    if version.split("+")[0] != EXECUTORCH_VERSION:
        raise BuildError(
            f"kvexport kernels need executorch=={EXECUTORCH_VERSION}, found {version}; "
            f"install executorch=={EXECUTORCH_VERSION} or use --ops portable"
        )
    return version


def executorch_root() -> Path:
    import executorch

    return Path(list(executorch.__path__)[0]).resolve()


def portable_lib_path() -> Path:
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    path = executorch_root() / "extension" / "pybindings" / f"_portable_lib{suffix}"
    if not path.is_file():
        raise BuildError(f"executorch runtime library not found at {path}; reinstall executorch=={EXECUTORCH_VERSION}")
    return path


def find_compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx or not shutil.which(cxx):
        raise BuildError(
            "no C++ compiler found (tried $CXX, g++, c++, clang++); install g++ "
            "(e.g. apt-get install g++) or use --ops portable"
        )
    return cxx


def _build_key(version: str, portable_lib: Path) -> str:
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    h.update(" ".join(CXXFLAGS + ET_DEFINES).encode())
    h.update(version.encode())
    h.update(str(portable_lib).encode())
    return h.hexdigest()[:16]


def library_path() -> Path:
    """Where the library for the installed executorch lives (whether or not it is built yet)."""
    version = check_executorch_version()
    plib = portable_lib_path()
    return cache_root() / "ops" / _build_key(version, plib) / LIB_NAME


def compile_command(cxx: str, output: Path) -> list[str]:
    root = executorch_root()
    plib = portable_lib_path()
    include = root / "include"
    return [
        cxx,
        *CXXFLAGS,
        *ET_DEFINES,
        f"-I{include}",
        f"-I{include / 'executorch' / 'runtime' / 'core' / 'portable_type' / 'c10'}",
        *(str(CSRC / s) for s in SOURCES),
        "-o",
        str(output),
        f"-L{plib.parent}",
        f"-l:{plib.name}",
        f"-Wl,-rpath,{plib.parent}",
    ]


def _compile(cmd: list[str], out: Path, what: str) -> Path:
    """Run ``cmd`` (which writes ``cmd``'s ``-o`` target, a temp file beside ``out``) and rename it to ``out``:
    concurrent builders never see a half-written library."""
    tmp = Path(cmd[cmd.index("-o") + 1])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            err = proc.stderr.strip().splitlines()
            first = next((line for line in err if "error" in line), err[0] if err else "")
            log = out.parent / "build.log"
            log.write_text(" ".join(cmd) + "\n\n" + proc.stderr)
            raise BuildError(f"compiling {what} failed: {first.strip()} (full log: {log})")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def _temp_beside(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out.parent)
    os.close(fd)
    return Path(tmp)


def build_kernels(force: bool = False) -> Path:
    """Compile the ExecuTorch kernel library into the cache (if missing or ``force``) and return its path."""
    out = library_path()
    if out.is_file() and not force:
        return out
    cxx = find_compiler()
    return _compile(compile_command(cxx, _temp_beside(out)), out, "kvexport kernels")


def ort_headers() -> Path:
    """The ONNX Runtime C/C++ API headers, fetched once from npm into the cache."""
    name, version = ORT_HEADERS_NPM
    dest = cache_root() / "ort-headers" / f"{name}-{version}"
    if (dest / "onnxruntime_cxx_api.h").is_file():
        return dest
    if shutil.which("npm") is None:
        raise BuildError(f"the ONNX Runtime kernel library needs the C/C++ API headers from npm {name}@{version} "
                         "and npm is not installed; install npm (apt-get install npm) or build with --ops portable")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as work:
        proc = subprocess.run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=work, capture_output=True,
                              text=True)
        tarballs = list(Path(work).glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            detail = (proc.stderr.strip().splitlines() or ["no tarball"])[-1]
            raise BuildError(f"npm pack {name}@{version} failed ({detail}); check the npm registry is reachable "
                             "or build with --ops portable")
        headers = Path(work) / "headers"
        headers.mkdir()
        with tarfile.open(tarballs[0]) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.startswith(ORT_HEADERS_IN_TARBALL) and member.name.endswith(".h"):
                    member.name = member.name[len(ORT_HEADERS_IN_TARBALL):]
                    tar.extract(member, headers, filter="data")
        if not (headers / "onnxruntime_cxx_api.h").is_file():
            raise BuildError(f"npm {name}@{version} has no onnxruntime_cxx_api.h under {ORT_HEADERS_IN_TARBALL}")
        if dest.exists():  # another builder won the race
            return dest
        os.replace(headers, dest)
    return dest


def ort_library_path() -> Path:
    """Where the ONNX Runtime library lives (whether or not it is built yet)."""
    h = hashlib.sha256()
    for name in ORT_SOURCES + ORT_HEADERS:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    h.update(" ".join(CXXFLAGS).encode())
    h.update("@".join(ORT_HEADERS_NPM).encode())
    return cache_root() / "ops-ort" / h.hexdigest()[:16] / ORT_LIB_NAME


def build_ort_library(force: bool = False) -> Path:
    """Compile ``libkvexport_ort.so`` into the cache (if missing or ``force``; fetches the headers on first use)."""
    out = ort_library_path()
    if out.is_file() and not force:
        return out
    cxx = find_compiler()
    include = ort_headers()
    cmd = [cxx, *CXXFLAGS, f"-I{include}", *(str(CSRC / s) for s in ORT_SOURCES), "-o", str(_temp_beside(out))]
    return _compile(cmd, out, "the kvexport ONNX Runtime library")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvexport.native_build", description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if the cached library exists")
    parser.add_argument("--print-path", action="store_true", help="only print where the library is/would be")
    args = parser.parse_args(argv)
    try:
        if args.print_path:
            print(library_path())
            print(ort_library_path())
            return 0
        t0 = time.perf_counter()
        path = build_kernels(force=args.force)
        print(f"{path} ({time.perf_counter() - t0:.1f}s)")
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:  # only ONNX --ops fused programs need it: a machine without npm still gets everything else
        t0 = time.perf_counter()
        path = build_ort_library(force=args.force)
        print(f"{path} ({time.perf_counter() - t0:.1f}s)")
    except BuildError as e:
        print(f"warning: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
