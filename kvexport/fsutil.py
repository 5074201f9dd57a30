"""Atomic output directories (write into a temporary sibling, rename when complete), required JSON
files, file hashes."""

from __future__ import annotations

import hashlib
import json
import os
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
        _default_permissions(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _default_permissions(root: Path) -> None:
    """Temporary directories and files are created owner-only (0700/0600); give the finished output
    the modes an ordinary ``mkdir``/``open`` would (umask applied)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


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


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in blocks (weights and programs are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
