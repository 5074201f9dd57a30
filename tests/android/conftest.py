"""Fixtures for the Android demo checks.

Program under test: ``KVEXPORT_ANDROID_PROGRAM=graphs/<name>`` when set (a real
kvexport build), else the STAND-IN program from ``standin_program.py``
(built once into ~/.cache/kvexport-android/standin/).

Tool-chain: ``kvexport.android.provision`` (cached in ~/.cache/kvexport-android).
Anything that cannot be provisioned turns into a pytest skip with the reason.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import pytest
from kvx_android_helpers import require

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "android: Android demo checks needing the provisioned tool-chain "
                                       "(~/.cache/kvexport-android; npm + Debian packages on first run)")


def _standin_module():
    spec = importlib.util.spec_from_file_location("kvexport_android_standin", HERE / "standin_program.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def toolchain():
    from kvexport.android.provision import provision
    return provision()


@pytest.fixture(scope="session")
def tokenizer_dir(toolchain):
    require(toolchain, "tokenizer")
    return toolchain.tokenizer_dir


def _build_cached(tc, tokenizer_dir, name, **kw) -> Path:
    import executorch
    src = (HERE / "standin_program.py").read_bytes()
    key = hashlib.sha256(src + repr(sorted(kw.items())).encode() +
                         getattr(executorch, "__version__", "?").encode()).hexdigest()[:12]
    out = tc.root / "standin" / f"{name}-{key}"
    if (out / "manifest.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _standin_module().build_standin(tmp, tokenizer_dir, **kw)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _kvexport_build_cached(tc, tiny_model) -> Path:
    """A real ``kvexport build`` (our exporter: mixed-precision cache, rule policy, portable ops) of
    the tiny random Llama, cached by the hash of the kvexport sources."""
    import executorch

    import kvexport
    from kvexport.export.build import build
    from kvexport.session import CacheOptions

    pkg = Path(kvexport.__file__).parent
    h = hashlib.sha256(getattr(executorch, "__version__", "?").encode())
    for f in sorted(pkg.rglob("*.py")):
        h.update(f.read_bytes())
    out = tc.root / "kvexport-build" / f"tiny-rule-{h.hexdigest()[:12]}"
    if not (out / "manifest.json").is_file():
        opts = CacheOptions(policy="rule", max_context=64, window=8, sinks=2)
        build(tiny_model, opts, "executorch", "portable", "fp32", out, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def program_dir(request, toolchain):
    """``KVEXPORT_ANDROID_PROGRAM`` when set, else our exporter's build of the tiny random Llama."""
    env = os.environ.get("KVEXPORT_ANDROID_PROGRAM")
    if env:
        p = Path(env)
        assert (p / "manifest.json").is_file(), f"KVEXPORT_ANDROID_PROGRAM={env} has no manifest.json"
        return p
    return _kvexport_build_cached(toolchain, request.getfixturevalue("tiny_model"))


@pytest.fixture(scope="session")
def int32_program_dir(toolchain, tokenizer_dir):
    """A stand-in whose tokens input is int32: breaks the contract on purpose."""
    import torch
    return _build_cached(toolchain, tokenizer_dir, "standin-int32", tokens_dtype=torch.int32)


@pytest.fixture(scope="session")
def jvm_build(toolchain):
    require(toolchain, "npm:react-native-executorch", "npm:kotlin-compiler", "junit", "apt:bookworm")
    from kvexport.android.jvm import build_jvm
    return build_jvm(toolchain)


@pytest.fixture(scope="session")
def bundled_app(tmp_path_factory, program_dir):
    from kvx_android_helpers import copy_demo

    from kvexport.android.bundle import bundle
    app = copy_demo(tmp_path_factory.mktemp("app") / "android_demo")
    result = bundle(program_dir, app)
    return app, result
