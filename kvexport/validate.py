"""Parse-time validators: ``argparse`` ``type=`` callables for every option a careless user can get
wrong, so a bad value ends in one line and exit code 2 before any model loads or long work starts.

Each validator takes the option's text and returns the parsed value, or raises
``argparse.ArgumentTypeError`` with a message that names the problem and the fix; :class:`Parser`
prints that as the single line ``kvexport: error: argument --x: <message>`` and exits 2.

* numbers: :func:`positive_int`, :func:`non_negative_int`, :func:`positive_float`, :func:`int_list`
  (comma-separated positive ints, e.g. ``--contexts``);
* names: :func:`program_name` (one path component under ``--out``: no separators, no leading dot);
* output paths, checked for writability without creating anything: :func:`output_file` (``--json``,
  ``--records``) and :func:`output_dir` (``--out``);
* :func:`policy` (a ``--kv-policy`` spec, parsed by :func:`kvexport.kv.policy.parse_policy`).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")


class Parser(argparse.ArgumentParser):
    """``ArgumentParser`` whose errors are one line (``kvexport: error: ...``) and exit code 2."""

    def error(self, message: str):
        print(f"kvexport: error: {message}; see '{self.prog} --help'", file=sys.stderr)
        sys.exit(2)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def int_list(text: str) -> list[int]:
    """``"128,512"`` -> ``[128, 512]`` (each positive)."""
    parts = [p.strip() for p in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of positive whole numbers")
    return [positive_int(p) for p in parts]


def program_name(text: str) -> str:
    """A directory name under ``--out``: letters, digits and ``._+=-``, not starting with a dot."""
    if not _NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a plain name (letters, digits, '._+=-', no path separators, not starting with "
            "a dot); put directories in --out")
    return text


def _writable_dir(path: Path) -> str | None:
    """Why files cannot be created in directory ``path`` (created if missing), or None when they can."""
    probe = path
    while not probe.exists():  # the nearest existing ancestor decides whether the rest can be created
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def output_file(text: str) -> Path:
    """A file to write: not a directory, its folder exists or can be created, and is writable."""
    path = Path(text).expanduser()
    if not text or path.is_dir():
        raise argparse.ArgumentTypeError(f"'{text}' is a directory; give a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{path} is not writable; choose another path")
    if reason := _writable_dir(path.parent):
        raise argparse.ArgumentTypeError(f"cannot write {path}: {reason}; choose another path")
    return path


def output_dir(text: str) -> Path:
    """A directory to write into: a directory or creatable, and writable."""
    path = Path(text).expanduser()
    if reason := _writable_dir(path):
        raise argparse.ArgumentTypeError(f"cannot write into {path}: {reason}; choose another directory")
    return path


def _parses(text: str, parse) -> str:
    """``text`` as given once ``parse(text)`` accepts it; its ``ValueError`` becomes the option's error."""
    try:
        parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def kv_clip(text: str) -> str:
    """A ``--kv-clip`` spec, returned as given once it parses."""
    from kvexport.kv.quant import parse_clip

    return _parses(text, parse_clip)


def kv_classes(text: str) -> str:
    """A ``--kv-classes`` spec, returned as given once it parses."""
    from kvexport.kv.quant import parse_classes

    return _parses(text, parse_classes)


def policy(text: str) -> str:
    """A ``--kv-policy`` spec, returned as given once it parses."""
    from kvexport.kv.policy import parse_policy

    return _parses(text, parse_policy)
