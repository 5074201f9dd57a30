"""``kvexport bench``: decode ms/token and prefill tokens/s of built programs, in one process.

For each context length ``c`` the program is reset, a prompt of ``c`` tokens is prefilled in the
program's chunk size (timed: prefill tokens/s), then ``decode_steps`` single-token steps are timed
(median ms/token). The first program is the baseline; every row carries its ratio to the baseline
at the same context, measured in the same run. Token ids come from a fixed seeded stream, so all
programs see the same input. ExecuTorch rows also count the operator calls one step makes outside
XNNPACK (``kernel_calls``, read from the ``.pte``; ExecuTorch's own ``export_llama`` programs included).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from kvexport.errors import KvxError
from kvexport.export.runners import open_runner
from kvexport.export.runtime import StepRunner
from kvexport.kv.stats import named
from kvexport.ops import kernel_calls


def _bench_one(runner: StepRunner, context: int, decode_steps: int, ids: list[int]) -> dict:
    runner.reset()
    t0 = time.perf_counter()
    runner.prefill(ids[:context])
    prefill_s = time.perf_counter() - t0
    times = []
    for i in range(decode_steps):
        t = time.perf_counter()
        runner.step([ids[context + i]])
        times.append(time.perf_counter() - t)
    stats = named(runner.last_stats)
    return {
        "context": context,
        "prefill_tok_s": context / prefill_s,
        "decode_ms_per_token": 1000 * statistics.median(times),
        "decode_ms_min": 1000 * min(times),
        "kv_bytes_allocated": int(stats["kv_bytes_allocated"]),
        "kv_bytes_used": int(stats["kv_bytes_used"]),
        "avg_bits": stats["avg_bits"],
    }


def set_threads(threads: int) -> None:
    """Threads for torch and for ExecuTorch's own pool (XNNPACK), which ``torch.set_num_threads``
    does not reach: without the reset, ExecuTorch programs keep one thread per core."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    from kvexport import quiet

    torch.set_num_threads(threads)
    with quiet.native_stderr():  # the reset's cpuinfo / threadpool log lines
        _unsafe_reset_threadpool(threads)


def run_bench(programs: list[Path], contexts: list[int], decode_steps: int = 16, threads: int | None = None) -> dict:
    if threads:
        set_threads(threads)
    runners = [open_runner(p) for p in programs]
    for r in runners:
        too_long = [c for c in contexts if c + decode_steps > r.max_context]
        if too_long:
            raise KvxError(
                f"context {too_long[0]} + {decode_steps} decode steps exceed {r.dir}'s context of {r.max_context}"
            )
    calls = {r.dir: kernel_calls(r.path) if r.path.suffix == ".pte" else None for r in runners}
    ids = torch.randint(
        100, 40000, (max(contexts) + decode_steps,), generator=torch.Generator().manual_seed(0)
    ).tolist()
    rows = []
    for c in contexts:
        base = None
        for r in runners:
            row = {
                "program": str(r.dir),
                "policy": r.manifest["policy"]["spec"],
                "ops_mode": r.manifest["ops_mode"],
                "kernel_calls": calls[r.dir],
                **_bench_one(r, c, decode_steps, ids),
            }
            base = base or row
            row["decode_ratio_vs_baseline"] = row["decode_ms_per_token"] / base["decode_ms_per_token"]
            rows.append(row)
    return {
        "baseline": str(programs[0]),
        "threads": torch.get_num_threads(),
        "decode_steps": decode_steps,
        "rows": rows,
    }


def format_table(result: dict) -> str:
    lines = [
        f"{'program':48} {'ctx':>5} {'prefill tok/s':>13} {'decode ms/tok':>13} {'x baseline':>10} "
        f"{'KV KiB used':>11} {'bits':>5} {'ops outside XNNPACK':>19}"
    ]
    for r in result["rows"]:
        calls = "-" if r.get("kernel_calls") is None else r["kernel_calls"]
        lines.append(
            f"{Path(r['program']).name[:48]:48} {r['context']:>5} {r['prefill_tok_s']:>13.1f} "
            f"{r['decode_ms_per_token']:>13.2f} {r['decode_ratio_vs_baseline']:>10.2f} "
            f"{r['kv_bytes_used'] / 1024:>11.0f} {r['avg_bits']:>5.2f} {calls:>19}"
        )
    return "\n".join(lines)
