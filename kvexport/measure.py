"""What ``kvexport bench`` measures in a runner's process, torch-free: the token stream every program sees
(:func:`token_stream`), one timed round (:func:`timed_round`), and the peak RSS of a child process that loads
one program alone and runs a round (:func:`peak_rss`; ``python -m kvexport.measure`` is that child).

The child imports only what the program's runner imports, so an ONNX Runtime program's row is a process without
torch, as ``kvexport run`` is; ExecuTorch's pybindings and the peers' build modules import torch
(``import_rss_mb`` shows what the imports alone take).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from kvexport import threads
from kvexport.errors import KvxError
from kvexport.export.runtime import StepRunner


def token_stream(n: int) -> list[int]:
    """``n`` token ids from a fixed seeded stream (the same for every program of a run)."""
    return np.random.default_rng(0).integers(100, 40000, n).tolist()


def timed_round(runner: StepRunner, context: int, decode_steps: int, ids: list[int]) -> tuple[float, list[float]]:
    """One reset + prefill of ``context`` tokens + ``decode_steps`` steps: (prefill seconds, step seconds).
    Python's cyclic garbage collector is off while timing (and run before): its pauses belong to this
    harness, not to the program (perf of decode steps at 128 tokens: ~0.7 ms of CPU a step in
    ``gc_collect_main``, for our programs and ``export_llama``'s alike)."""
    runner.reset()
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        runner.prefill(ids[:context])
        prefill_s = time.perf_counter() - t0
        times = []
        for i in range(decode_steps):
            t = time.perf_counter()
            runner.step([ids[context + i]])
            times.append(time.perf_counter() - t)
    finally:
        gc.enable()
    return prefill_s, times


def peak_rss(program: Path, context: int, decode_steps: int, n_threads: int) -> dict:
    """Load ``program`` in a child process, prefill ``context`` tokens of the bench stream, decode
    ``decode_steps``: ``{"peak_rss_mb", "import_rss_mb"}`` of that child (or ``{"rss_error": ...}``)."""
    cmd = [sys.executable, "-m", "kvexport.measure", str(program), str(context), str(decode_steps), str(n_threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        err = [ln for ln in done.stderr.splitlines() if ln.strip()]
        return {"rss_error": (err[-1] if err else f"exit {done.returncode}")[:200]}
    return json.loads(lines[-1])


def _status_mb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in MB (``/proc/self/status``; unlike ``ru_maxrss``, the
    high-water mark starts afresh at ``exec``, so a child does not inherit its parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KvxError(f"/proc/self/status has no {field}; peak RSS is measured on Linux only")


def _child(program: str, context: str, decode_steps: str, n_threads: str) -> None:
    from kvexport.export.manifest import read_manifest
    from kvexport.export.runners import runner_class

    threads.set_count(int(n_threads))
    cls = runner_class(read_manifest(Path(program))["target"])  # imports the runtime's modules
    imported = _status_mb("VmRSS")
    runner = cls(Path(program))
    timed_round(runner, int(context), int(decode_steps), token_stream(int(context) + int(decode_steps)))
    peak = _status_mb("VmHWM")
    print(json.dumps({"peak_rss_mb": round(peak, 1), "import_rss_mb": round(imported, 1)}))


if __name__ == "__main__":  # the child of :func:`peak_rss`
    _child(*sys.argv[1:5])
