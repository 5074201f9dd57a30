"""Run a built program through its runtime: the step interface the reference
:class:`kvexport.session.Session` also has, so parity, bench and generation share one loop.

:func:`kvexport.export.runners.open_runner` picks the runner from the manifest's target. A runner
subclass only loads the program (``_load``) and executes one chunk (``_execute``); positions,
chunking and the context limit live here. At load, the program's own metadata
(``get_max_context_len``, ``get_max_seq_len``, ``get_vocab_size``) must agree with the manifest, whose
numbers the loop trusts; an ExecuTorch program's file header is checked before its bytes reach the
runtime (a corrupt file aborts it).

Arrays cross this interface as numpy (tokens, logits, ``kv_stats``), and this module and the ONNX Runtime runner import
no torch: ``kvexport run`` of an ONNX program is a process without it (245 MB of RSS less). Callers that compute with
the logits wrap them with ``torch.from_numpy`` (no copy).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvexport.errors import KvxError
from kvexport.export.manifest import read_manifest


class StepRunner:
    """Loads ``graphs/<name>``; ``step(ids)`` commits a chunk and returns its last logits, numpy float32 ``[V]``;
    ``last_stats`` holds the program's ``kv_stats``, numpy float32 ``[8]``, after each step."""

    targets: tuple[str, ...] = ()

    def __init__(self, program_dir: Path, manifest: dict | None = None):
        self.dir = Path(program_dir)
        self.manifest = manifest or read_manifest(self.dir)
        self.path = self.dir / self.manifest["program"]
        if self.manifest["target"] not in self.targets:
            raise KvxError(
                f"{self.dir} is a {self.manifest['target']} program; this runner takes {', '.join(self.targets)}"
            )
        self.max_context = self.manifest["cache"]["max_context"]
        self.max_chunk = self.manifest["cache"]["max_chunk"]
        self.reset()
        self._check_metadata(self._metadata())

    CHECKED_METADATA = ("get_max_context_len", "get_max_seq_len", "get_vocab_size")

    def _check_metadata(self, program: dict) -> None:
        """``program``: the loaded program's own constant values; each must equal the manifest's."""
        for key in self.CHECKED_METADATA:
            want = self.manifest["metadata"].get(key)
            if program.get(key) != want:
                raise KvxError(
                    f"{self.dir / 'manifest.json'} says {key}={want} but the program says "
                    f"{program.get(key)}; the manifest was edited or belongs to another program; rebuild"
                )

    def reset(self) -> None:
        """Fresh state: the initial cache, position 0."""
        self._load()
        self.pos = 0
        self.last_stats = None

    def step(self, ids: list[int]) -> np.ndarray:
        if len(ids) > self.max_chunk:
            raise ValueError(f"chunk of {len(ids)} > max_chunk {self.max_chunk}")
        if self.pos + len(ids) > self.max_context:
            raise KvxError(
                f"{self.pos + len(ids)} tokens exceed the program's context of {self.max_context}; "
                "rebuild with a larger --max-context"
            )
        logits, stats = self._execute(np.array([ids], dtype=np.int64), np.array([self.pos], dtype=np.int64))
        self.pos += len(ids)
        self.last_stats = stats
        return logits[0]

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Feed a prompt in chunks; returns the last token's logits ``[V]``."""
        logits = None
        for i in range(0, len(ids), self.max_chunk):
            logits = self.step(ids[i : i + self.max_chunk])
        return logits

    def _load(self) -> None:
        raise NotImplementedError

    def _metadata(self) -> dict:
        """The loaded program's constant methods (:data:`CHECKED_METADATA` at least) as ints."""
        raise NotImplementedError

    def _execute(self, tokens: np.ndarray, input_pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """tokens int64 [1, T], input_pos int64 [1] -> (logits float32 [1, V], kv_stats float32 [8]), numpy arrays the
        caller may keep (not the runner's buffers)."""
        raise NotImplementedError
