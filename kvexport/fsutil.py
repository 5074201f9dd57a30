"""Atomic outputs (directories and text files: written into a temporary sibling, renamed when
complete), required JSON files, file hashes, the per-user cache folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def cache_root() -> Path:
    """The per-user cache: ``$KVEXPORT_CACHE`` (default ``~/.cache/kvexport``)."""
    env = os.environ.get("KVEXPORT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvexport"


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


def write_text_atomic(path: Path, text: str) -> None:
    """``path.write_text(text)`` through a temporary sibling and a rename (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _default_permissions(root: Path) -> None:
    """Temporary directories and files are created owner-only (0700/0600); give the finished output
    the modes an ordinary ``mkdir``/``open`` would (umask applied)."""
    umask = _umask()
    for path in [root, *root.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


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
