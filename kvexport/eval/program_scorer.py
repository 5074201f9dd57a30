"""A built program (``kvexport build``) behind the eval :class:`~kvexport.eval.scoring.Scorer`
interface, so ``kvexport eval --backend executorch|onnx --program graphs/<name>`` scores the
exported graph on the same items as the reference.

Protocol (programs are batch 1 and return the last position's logits only): reset, feed the
context in chunks of ``prefill_chunk`` tokens (as the reference does), take the first
continuation token's log-probability from the last context logits, then decode the continuation
one token at a time (teacher forcing), summing log-probabilities. Before each further continuation
the cache goes back to its state after the context by resetting and feeding the context again
(the runtimes keep their state inside the program). Unlike the reference, which scores all
continuations as one uncommitted batch, continuation tokens are committed as they are decoded (they
may push context tokens out of the window); the reference runs on the same items so the paired
comparison shows what this changes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kvexport.eval.scoring import SCORING_VERSION, default_prefill_chunk
from kvexport.kv import stats as kv_stats
from kvexport.session import CacheOptions


class ProgramScorer:
    def __init__(self, program_dir: Path, backend: str, prefill_chunk: int | None = None):
        from kvexport.export.runners import open_runner

        self.runner = open_runner(Path(program_dir))
        self.backend = backend
        self.opts = CacheOptions.from_manifest(self.runner.manifest["cache_options"])
        self.prefill_chunk = min(prefill_chunk or default_prefill_chunk(self.opts), self.runner.max_chunk)
        self._stats = None

    def _feed(self, ids: list[int]) -> torch.Tensor:
        """Reset and feed ``ids``; returns the last token's logits ``[V]``."""
        self.runner.reset()
        logits = None
        for i in range(0, len(ids), self.prefill_chunk):
            logits = self.runner.step(ids[i : i + self.prefill_chunk])
        return torch.from_numpy(logits)

    def score(self, context: list[int], continuations: list[list[int]]) -> list[float]:
        if not context or not continuations or not all(continuations):
            raise ValueError("context and every continuation need at least one token")
        last = torch.log_softmax(self._feed(context).double(), -1)
        self._stats = self.runner.last_stats.copy()
        scores = []
        for n, cont in enumerate(continuations):
            if n:
                self._feed(context)
            total, logp = 0.0, last
            for i, tok in enumerate(cont):
                total += float(logp[tok])
                if i + 1 < len(cont):
                    logp = torch.log_softmax(torch.from_numpy(self.runner.step([tok])).double(), -1)
            scores.append(total)
        return scores

    def kv_stats(self) -> dict:
        return kv_stats.readable(self._stats)

    @torch.no_grad()
    def token_logprobs(self, ids: list[int]) -> torch.Tensor:
        """Token by token (the program returns the last position's logits only)."""
        self.runner.reset()
        rows = [torch.log_softmax(torch.from_numpy(self.runner.step([t])), -1) for t in ids[:-1]]
        self._stats = self.runner.last_stats.copy()
        return torch.stack(rows)

    def describe(self) -> dict:
        m = self.runner.manifest
        return {"backend": self.backend, "program_files": m["program_files"], "target": m["target"],
                "ops_mode": m["ops_mode"], "weights": m["weights"], "cache": self.opts.to_dict(),
                "prefill_chunk": self.prefill_chunk, "scoring": SCORING_VERSION + "+program-decode"}
