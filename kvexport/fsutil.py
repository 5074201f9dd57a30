"""Atomic output directories: write into a temporary sibling, rename when complete."""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(out_dir: Path):
    """Yield a temporary directory next to ``out_dir``; on success it replaces ``out_dir``, on any
    error (or Ctrl-C) it is removed, so no half-written output is ever left at ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: Path, missing: str, corrupt: str, error: type[Exception]):
    """Parse a required JSON file; raise ``error`` with the one-line ``missing`` message when it is
    absent, or ``corrupt`` (``{path}`` and ``{reason}`` filled in) when it is not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise error(missing)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise error(corrupt.format(path=path, reason=err.msg)) from None
