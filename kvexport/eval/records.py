"""Per-item records in an append-only JSONL file, so an interrupted run resumes where it stopped.

Each line is one scored item (or WikiText window) with ``key`` = hash of everything that decides
its numbers (model identity, policy, cache options, prefill chunk, backend, prompt and scoring
versions), ``task`` and ``idx``. A rerun skips every (key, task, idx) already in the file; records
of other configurations in the same file are kept and ignored. A line cut short by a kill is
skipped on load and the next append starts on a fresh line. A ``.gz`` file (committed results) is
read only. A file that is not UTF-8 text (or not gzip, for ``.gz``) is a :class:`KvxError`: nothing
is appended to it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

from kvexport.errors import KvxError


def config_key(config: dict) -> str:
    """Short stable hash of a JSON-able configuration."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class RecordStore:
    """``items.jsonl`` of a results folder: lookup by (key, task, idx) and flushed appends."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: dict[tuple[str, str, int], dict] = {}
        self.bad_lines = 0
        if self.path.is_file():
            try:
                self._read()
            except (UnicodeDecodeError, EOFError, OSError) as err:  # gzip.BadGzipFile is an OSError
                raise KvxError(f"{self.path} is not a records file ({type(err).__name__}); move it away or "
                               "pass another --records / --out") from None
        self._fh = None

    def _read(self) -> None:
        opener = gzip.open if self.path.suffix == ".gz" else open
        with opener(self.path, "rt", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    self.records[(rec["key"], rec["task"], int(rec["idx"]))] = rec
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    self.bad_lines += 1

    def has(self, key: str, task: str, idx: int) -> bool:
        return (key, task, idx) in self.records

    def get(self, key: str, task: str) -> list[dict]:
        """Records of one configuration and task, by item index."""
        return sorted((r for (k, t, _), r in self.records.items() if k == key and t == task), key=lambda r: r["idx"])

    def append(self, rec: dict) -> None:
        if self.path.suffix == ".gz":
            raise ValueError(f"{self.path} is compressed and read only")
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            needs_newline = self.path.is_file() and self.path.stat().st_size > 0 and not self._ends_with_newline()
            self._fh = open(self.path, "a", encoding="utf-8")
            if needs_newline:
                self._fh.write("\n")
        self._fh.write(json.dumps(rec, separators=(",", ":")) + "\n")
        self._fh.flush()
        self.records[(rec["key"], rec["task"], int(rec["idx"]))] = rec

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, 2)
            return f.read(1) == b"\n"

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
