"""Atomic output directories: write into a temporary sibling, rename when complete."""

from __future__ import annotations

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
