"""Atomic outputs (directories and text files: written into a temporary sibling, renamed when
complete), required JSON files, file hashes, the per-user cache folder.

An existing directory is only ever replaced when the caller's ``replaceable(path)`` says so (a
kvexport program, a model cache entry); the swap renames the old one aside first and deletes it
only after the new one is in place. Temporary siblings are named ``.<name>.kvxtmp-<pid>-*``, so
the next write into the same folder removes those whose process is gone (a ``kill -9``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from kvexport.errors import KvxError

_TEMP = re.compile(r"\..*\.kvx(?:tmp|old)-(\d+)-[^/]*")


def check_replaceable(out_dir: Path, replaceable=lambda path: False) -> None:
    """:class:`KvxError` unless ``out_dir`` is absent or ``replaceable(out_dir)``."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink() or out_dir.exists() and not (out_dir.is_dir() and replaceable(out_dir)):
        raise KvxError(f"{out_dir} exists and is not something kvexport may replace; "
                       "move it away or choose another name")


def remove_stale_temporaries(parent: Path) -> list[Path]:
    """Delete temporary siblings in ``parent`` left by processes that no longer run; returns them."""
    removed = []
    for entry in Path(parent).glob(".*.kvx*-*"):
        m = _TEMP.fullmatch(entry.name)
        if m and entry.is_dir() and not entry.is_symlink() and not _alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def cache_root() -> Path:
    """The per-user cache: ``$KVEXPORT_CACHE`` (default ``~/.cache/kvexport``)."""
    env = os.environ.get("KVEXPORT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvexport"


@contextmanager
def atomic_directory(out_dir: Path, replaceable=lambda path: False):
    """Yield a temporary directory next to ``out_dir``; on success it replaces ``out_dir``, on any
    error (Ctrl-C, or SIGTERM turned into an exception by the CLI) it is removed, so no half-written
    output is ever left at ``out_dir``. An existing ``out_dir`` is replaced only when
    ``replaceable(out_dir)``; :class:`KvxError` otherwise, before anything is written."""
    out_dir = Path(out_dir)
    check_replaceable(out_dir, replaceable)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.kvxtmp-{os.getpid()}-", dir=out_dir.parent))
    try:
        yield tmp
        _default_permissions(tmp)
        check_replaceable(out_dir, replaceable)  # again: the directory may have appeared meanwhile
        aside = None
        if out_dir.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.kvxold-{os.getpid()}-", dir=out_dir.parent))
            out_dir.rename(aside / out_dir.name)
        try:
            tmp.rename(out_dir)
        except OSError:
            if aside is not None:  # put the old one back
                (aside / out_dir.name).rename(out_dir)
                aside.rmdir()
            raise
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """``path.write_text(text)`` through a temporary sibling and a rename (parents created)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """``path.write_bytes(data)`` through a temporary sibling and a rename (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.kvxtmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
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
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(corrupt.format(path=path, reason=getattr(err, "msg", "not UTF-8 text"))) from None


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in blocks (weights and programs are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
