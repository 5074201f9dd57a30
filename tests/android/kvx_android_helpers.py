"""Helpers shared by tests/android (uniquely named to avoid clashing with other test packages)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def copy_demo(dst: Path) -> Path:
    """Copy android_demo (sources only) so tests never write into the repository."""
    shutil.copytree(REPO / "android_demo", dst, ignore=shutil.ignore_patterns("assets", "build", ".gradle"))
    return dst


def require(tc, *steps):
    """Skip (with the provisioning failure as reason) unless the given provisioning steps succeeded."""
    for step in steps:
        for k, reason in tc.problems.items():
            if k == step or k.startswith(step):
                pytest.skip(f"SKIPPED: {k} could not be provisioned: {reason}")
