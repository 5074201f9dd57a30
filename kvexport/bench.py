"""``kvexport bench``: decode ms/token, prefill tokens/s, memory and size of built programs, in one process.

For each context length ``c`` and each of ``repeats`` rounds, every program is reset, a prompt of ``c``
tokens is prefilled in the program's chunk size (timed: prefill tokens/s), then ``decode_steps``
single-token steps are timed. A row reports the median, min and p90 of all its decode steps (ms/token),
the median prefill rate, KV bytes in use and allocated and average bits (the program's ``kv_stats``),
the program's size on disk (every hashed program file) and, at the largest context, the peak RSS of a
child process that loads the program alone and runs the same prompt (``peak_rss_mb``; ``import_rss_mb``
is that child's RSS after importing the runtime, before loading the program). The first program is the
baseline: every row carries ``decode_ratio_vs_baseline`` at the same context, measured in the same run.
Rounds interleave the programs, so a slow spell of the machine hits all of them alike; Python's garbage
collector is off while a round is timed. Token ids come from a fixed seeded stream, so all programs see
the same input. ExecuTorch rows also count the operator calls one step makes outside XNNPACK
(``kernel_calls``, read from the ``.pte``; ``export_llama``'s too).

Peers that could not be built (``kvexport bench --peers``; :mod:`kvexport.baselines.peers`) come as
``unavailable`` entries with their one-line reason: the table and the markdown say so instead of
dropping the row. :func:`write_report` writes ``bench.json``, ``bench.md`` and ``bench.png`` (ms/token
against context, one line per program).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

import kvexport.threads
from kvexport.errors import KvxError
from kvexport.export.runners import open_runner
from kvexport.export.runtime import StepRunner
from kvexport.fsutil import write_bytes_atomic, write_text_atomic
from kvexport.kv.stats import named
from kvexport.measure import peak_rss, timed_round, token_stream
from kvexport.ops import kernel_calls
from kvexport.plots import png_bytes, pyplot


def _row(runner: StepRunner, context: int, prefills: list[float], times: list[float]) -> dict:
    stats = named(runner.last_stats)
    ms = sorted(1000 * t for t in times)
    return {
        "context": context,
        "prefill_tok_s": context / statistics.median(prefills),
        "decode_ms_per_token": statistics.median(ms),
        "decode_ms_min": ms[0],
        "decode_ms_p90": ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))],
        "kv_bytes_allocated": int(stats["kv_bytes_allocated"]),
        "kv_bytes_used": int(stats["kv_bytes_used"]),
        "avg_bits": stats["avg_bits"],
    }


def set_threads(threads: int) -> None:
    """Threads for torch and for every runtime's pool: ONNX Runtime, onnxruntime-genai, llama.cpp and ExecuTorch's
    own pool (XNNPACK, which ``torch.set_num_threads`` does not reach) are sized to :func:`kvexport.threads.count`
    when a runner opens its program (:func:`kvexport.export.et_runtime.size_pool` for ExecuTorch's)."""
    torch.set_num_threads(threads)
    kvexport.threads.set_count(threads)


def program_bytes(runner: StepRunner) -> int:
    return sum((runner.dir / name).stat().st_size for name in runner.manifest["program_files"])


def _policy_label(manifest: dict) -> str:
    """The program's ``--kv-policy``, with its ``--kv-classes`` where they are not the default."""
    classes = (manifest.get("cache_options") or {}).get("classes")
    return manifest["policy"]["spec"] + (f" --kv-classes {classes}" if classes else "")


def run_bench(programs: list[Path], contexts: list[int], decode_steps: int = 16, threads: int | None = None,
              repeats: int = 1, rss: bool = False, unavailable: list[tuple[str, str]] = ()) -> dict:
    """Bench ``programs`` (the first is the baseline) at every context; ``unavailable``: peers that
    could not be built, as ``(name, reason)``, carried into the result as such."""
    if threads:
        set_threads(threads)
    runners = [open_runner(p) for p in programs]
    for r in runners:
        too_long = [c for c in contexts if c + decode_steps > r.max_context]
        if too_long:
            raise KvxError(
                f"context {too_long[0]} + {decode_steps} decode steps exceed {r.dir}'s context of {r.max_context}; "
                "bench shorter contexts or rebuild it with a larger --max-context"
            )
    calls = {r.dir: kernel_calls(r.path) if r.path.suffix == ".pte" else None for r in runners}
    sizes = {r.dir: program_bytes(r) for r in runners}
    ids = token_stream(max(contexts) + decode_steps)
    rows = []
    work = tqdm(total=len(contexts) * repeats * len(runners), desc="bench", unit="run", leave=False)
    for c in contexts:
        measured = {r.dir: ([], []) for r in runners}
        for _ in range(repeats):
            for r in runners:
                prefill_s, times = timed_round(r, c, decode_steps, ids)
                measured[r.dir][0].append(prefill_s)
                measured[r.dir][1].extend(times)
                work.update()
        base = None
        for r in runners:
            row = {"program": str(r.dir), "target": r.manifest["target"], "weights": r.manifest["weights"],
                   "policy": _policy_label(r.manifest), "ops_mode": r.manifest["ops_mode"],
                   "kernel_calls": calls[r.dir], "program_bytes": sizes[r.dir], **_row(r, c, *measured[r.dir])}
            base = base or row
            row["decode_ratio_vs_baseline"] = row["decode_ms_per_token"] / base["decode_ms_per_token"]
            rows.append(row)
    work.close()
    if rss:
        top = max(contexts)
        for r in tqdm(runners, desc="peak RSS", unit="program", leave=False):
            mem = peak_rss(r.dir, top, decode_steps, kvexport.threads.count())
            for row in rows:
                if row["program"] == str(r.dir) and row["context"] == top:
                    row.update(mem)
    return {
        "baseline": str(programs[0]),
        "threads": kvexport.threads.count(),
        "decode_steps": decode_steps,
        "repeats": repeats,
        "rows": rows,
        "unavailable": [{"program": name, "reason": why} for name, why in unavailable],
    }


def _label(row: dict) -> str:
    return Path(row["program"]).name


def format_table(result: dict) -> str:
    lines = [
        f"{'program':46} {'ctx':>5} {'prefill tok/s':>13} {'decode ms/tok':>13} {'p90':>6} {'x base':>6} "
        f"{'KV KiB used':>11} {'bits':>5} {'MB':>6} {'RSS MB':>6} {'ops out':>7}"
    ]
    for r in result["rows"]:
        calls = "-" if r.get("kernel_calls") is None else r["kernel_calls"]
        rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-"
        lines.append(
            f"{_label(r)[:46]:46} {r['context']:>5} {r['prefill_tok_s']:>13.1f} {r['decode_ms_per_token']:>13.2f} "
            f"{r['decode_ms_p90']:>6.1f} {r['decode_ratio_vs_baseline']:>6.2f} {r['kv_bytes_used'] / 1024:>11.0f} "
            f"{r['avg_bits']:>5.2f} {r['program_bytes'] / 1e6:>6.1f} {rss:>6} {calls:>7}"
        )
    for u in result.get("unavailable", []):
        lines.append(f"{u['program'][:46]:46} not run: {u['reason']}")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """One table: a row per program, decode ms/token (and x baseline) per context, then size and memory."""
    contexts = sorted({r["context"] for r in result["rows"]})
    top = max(contexts) if contexts else None
    by_program: dict[str, dict[int, dict]] = {}
    for r in result["rows"]:
        by_program.setdefault(r["program"], {})[r["context"]] = r
    head = ["program", "weights", "KV"] + [f"ms/tok @{c} (x base)" for c in contexts] + [
        f"prefill tok/s @{contexts[0]}" if contexts else "prefill", f"KV MiB @{top}", "bits", "program MB",
        f"peak RSS MB @{top}", "ops outside XNNPACK"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for program, rows in by_program.items():
        first, last = rows[contexts[0]], rows[top]
        cells = [f"`{Path(program).name}`", first["weights"], first["policy"]]
        cells += [f"{rows[c]['decode_ms_per_token']:.1f} ({rows[c]['decode_ratio_vs_baseline']:.2f})" for c in contexts]
        cells += [f"{first['prefill_tok_s']:.0f}", f"{last['kv_bytes_used'] / 2**20:.1f}", f"{last['avg_bits']:.2f}",
                  f"{first['program_bytes'] / 1e6:.1f}",
                  f"{last['peak_rss_mb']:.0f}" if "peak_rss_mb" in last else last.get("rss_error", "-"),
                  "-" if first.get("kernel_calls") is None else str(first["kernel_calls"])]
        lines.append("| " + " | ".join(cells) + " |")
    for u in result.get("unavailable", []):
        lines.append(f"| `{u['program']}` | not run: {u['reason']} |" + " |" * (len(head) - 2))
    note = (f"{result['threads']} threads, {result['decode_steps']} decode steps x {result['repeats']} rounds per "
            f"row (median); baseline `{Path(result['baseline']).name}`.")
    return "\n".join(lines) + f"\n\n{note}\n"


def plot(result: dict, path: Path) -> None:
    """Decode ms/token against context, one line per program (log-scaled context axis)."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    programs = dict.fromkeys(r["program"] for r in result["rows"])
    for program in programs:
        rows = sorted((r for r in result["rows"] if r["program"] == program), key=lambda r: r["context"])
        ax.plot([r["context"] for r in rows], [r["decode_ms_per_token"] for r in rows], marker="o",
                label=Path(program).name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode ms / token (median)")
    ax.set_title(f"decode speed, {result['threads']} threads")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    write_bytes_atomic(path, png_bytes(fig))


def write_report(result: dict, out_dir: Path) -> dict[str, Path]:
    """``bench.json``, ``bench.md`` and ``bench.png`` in ``out_dir`` (each written atomically)."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "bench.json", "markdown": out_dir / "bench.md", "png": out_dir / "bench.png"}
    write_text_atomic(paths["json"], json.dumps(result, indent=1) + "\n")
    write_text_atomic(paths["markdown"], markdown(result))
    plot(result, paths["png"])
    return paths
