"""Quiet output: third-party warnings, log lines and native fd-2 lines are dropped unless --verbose."""

import subprocess
import sys

SCRIPT = """
import os, sys
from kvexport import quiet
if sys.argv[1] == "quiet":
    quiet.configure()
import torchao  # logs "Failed to load ..." for the CUDA extensions it cannot load here
import warnings
warnings.warn("a torch-style note", FutureWarning)
with quiet.native_stderr():
    os.write(2, b"[cpuinfo_utils.cpp:71] native noise\\n")
print("ours", file=sys.stderr)
"""


def stderr_of(mode: str) -> str:
    res = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stderr


def test_quiet_drops_third_party_noise_and_keeps_ours():
    quiet, verbose = stderr_of("quiet"), stderr_of("verbose")
    assert quiet.strip() == "ours", quiet
    assert "native noise" in verbose and "a torch-style note" in verbose and verbose.rstrip().endswith("ours")
