"""Provisioning is idempotent and reports what it did."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.android


def test_provision_second_run_is_cached(toolchain, capsys):
    from kvexport.android.provision import provision
    tc = provision()
    out = capsys.readouterr().out
    assert tc.problems == toolchain.problems
    steps = [ln for ln in out.splitlines() if ln.startswith("[provision] ") and ":" in ln and "done in" not in ln]
    assert steps and all("ok (cached" in ln or "UNAVAILABLE" in ln for ln in steps), out
