"""The built wheel, installed (not editable) into a fresh venv, runs from another directory.

To stay at a few minutes, the fresh venv gets kvexport from the wheel (``--no-deps``) and sees the
heavy dependencies (torch, executorch, ...) of the test's own environment through a ``.pth`` line;
a ``.pth`` listed there is not processed, so the checkout's editable install stays out of it.
"""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run(cmd, **kw):
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert res.returncode == 0, f"{cmd}\n{res.stdout}\n{res.stderr}"
    return res


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", REPO],
        cwd=tmp)
    (wheel,) = (tmp / "dist").glob("kvexport-*.whl")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    py = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel])
    site = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "deps-of-the-test-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("KVEXPORT_CALIBRATION", "PYTHONPATH")}
    return venv, work, env


def test_installed_package_is_not_the_checkout(installed):
    venv, work, env = installed
    where = run([venv / "bin" / "python", "-c", "import kvexport; print(kvexport.__file__)"], cwd=work, env=env)
    assert Path(where.stdout.strip()).is_relative_to(venv)


def test_models_and_generate_from_another_directory(installed):
    venv, work, env = installed
    kvx = venv / "bin" / "kvexport"
    assert "smollm2-135m-instruct" in run([kvx, "models"], cwd=work, env=env).stdout
    # the learned policy needs the shipped controller and token table
    res = run([kvx, "generate", "--prompt", "The capital of France is", "--max-new-tokens", "4",
               "--kv-policy", "learned", "--kv-window", "2", "--kv-sinks", "1"], cwd=work, env=env)
    assert res.stdout.startswith("The capital of France is") and "KV cache:" in res.stderr
    assert not (work / "graphs").exists() and sorted(p.name for p in work.iterdir()) == []
