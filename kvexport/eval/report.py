"""Summaries of recorded items: ``summary.json``, ``table.md`` (paper layout: rows = policies,
columns = tasks, plus average bits and KV bytes) and ``acc_vs_bits.png``.

* accuracy: mean of per-item ``acc``/``acc_norm`` with a seeded 95% percentile-bootstrap CI;
* avg bits / KV bytes: ``Session.kv_stats()`` after each item's context (sinks and window at 16
  bits), averaged over items; the table's columns average over all multiple-choice items scored;
* paired comparisons: each policy against the baseline (``fp16`` when present, else the first) on
  the items both scored: difference, paired-bootstrap CI of the difference, McNemar counts;
* WikiText: perplexity ``exp(sum NLL / sum tokens)`` over held-out windows (CI resampling windows)
  and the mean per-token KL(fp16 || policy).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np

from kvexport.eval import stats as S
from kvexport.eval.tasks import ALL_TASKS, TASK_TITLES

METRICS = ("acc", "acc_norm")


def _mean(recs, field):
    return float(np.mean([r[field] for r in recs])) if recs else None


def summarize_mc(recs: list[dict], n_boot: int, seed: int) -> dict:
    out = {"n": len(recs)}
    for m in METRICS:
        vals = [r[m] for r in recs]
        out[m] = float(np.mean(vals))
        out[f"{m}_ci"] = list(S.bootstrap_ci(vals, n_boot, seed))
    secs = sum(r["seconds"] for r in recs)
    cpu = sum(r.get("cpu_seconds", 0.0) for r in recs)
    out.update(
        avg_bits=_mean(recs, "avg_bits"),
        kv_bytes_used=_mean(recs, "kv_bytes_used"),
        kv_bytes_allocated=_mean(recs, "kv_bytes_allocated"),
        n_ctx=_mean(recs, "n_ctx"),
        seconds=secs,
        cpu_seconds=cpu,
        items_per_s=len(recs) / secs if secs > 0 else None,
        engines=dict(Counter(f"{r.get('path', 'cache')}@{r.get('device', 'cpu')}" for r in recs)),
    )
    return out


def summarize_wikitext(recs: list[dict], n_boot: int, seed: int) -> dict:
    nll = [r["nll_sum"] for r in recs]
    tok = [r["tokens"] for r in recs]
    kl = [r["kl_sum"] for r in recs]
    total = sum(tok)
    secs = sum(r["seconds"] for r in recs)
    cpu = sum(r.get("cpu_seconds", 0.0) for r in recs)
    return {
        "n": len(recs),
        "tokens": total,
        "ppl": math.exp(sum(nll) / total),
        "ppl_ci": list(S.bootstrap_ratio_ci(nll, tok, np.exp, n_boot, seed)),
        "kl": sum(kl) / total,
        "kl_ci": list(S.bootstrap_ratio_ci(kl, tok, None, n_boot, seed)),
        "avg_bits": _mean(recs, "avg_bits"),
        "kv_bytes_used": _mean(recs, "kv_bytes_used"),
        "kv_bytes_allocated": _mean(recs, "kv_bytes_allocated"),
        "seconds": secs,
        "cpu_seconds": cpu,
        "windows_per_s": len(recs) / secs if secs > 0 else None,
    }


def summarize(evaluation, store, n_boot: int = S.N_BOOT, seed: int = 0, settings: dict | None = None) -> dict:
    """Everything the table and plot need, from the records of ``evaluation``'s configurations."""
    tasks = [t for t in ALL_TASKS if t in evaluation.cfg.tasks]
    results: dict[str, dict] = {}
    by_item: dict[str, dict] = {}
    for run in evaluation.runs:
        res = results.setdefault(run.policy, {})
        for task in tasks:
            if task == "wikitext":
                recs = [r for r in store.get(run.ppl_key, "wikitext") if r["idx"] < evaluation.sizes["wikitext"]["n"]]
                if recs:
                    res[task] = summarize_wikitext(recs, n_boot, seed)
                continue
            wanted = {it.idx for it in evaluation.items[task]}
            recs = [r for r in store.get(run.key, task) if r["idx"] in wanted]
            if recs:
                res[task] = summarize_mc(recs, n_boot, seed)
                by_item.setdefault(run.policy, {})[task] = {r["idx"]: r for r in recs}
        mc = [r for t in tasks if t != "wikitext" for r in by_item.get(run.policy, {}).get(t, {}).values()]
        res["overall"] = {
            "avg_bits": _mean(mc, "avg_bits"),
            "kv_bytes_used": _mean(mc, "kv_bytes_used"),
            "kv_bytes_allocated": _mean(mc, "kv_bytes_allocated"),
            "n": len(mc),
        }
    policies = [r.policy for r in evaluation.runs]
    baseline = "fp16" if "fp16" in policies else policies[0]

    def compare(pol: str, base: str, task: str) -> dict | None:
        a, b = by_item.get(pol, {}).get(task, {}), by_item.get(base, {}).get(task, {})
        common = sorted(set(a) & set(b))
        if not common:
            return None
        return {
            m: S.paired_comparison([a[i][m] for i in common], [b[i][m] for i in common], n_boot, seed) for m in METRICS
        }

    paired: dict[str, dict] = {}
    for pol in policies:
        if pol == baseline:
            continue
        for task in tasks:
            if (c := compare(pol, baseline, task)) is not None:
                paired.setdefault(pol, {})[task] = c
    matched: list[dict] = []  # feature policies vs the random / static policy nearest in average bits
    for pol in policies:
        if not pol.startswith(("learned", "rule")):
            continue
        bits = results[pol]["overall"]["avg_bits"]
        for family in ("random:", "static-"):
            rivals = [q for q in policies if q.startswith(family) and results[q]["overall"]["n"]]
            if not rivals or bits is None:
                continue
            rival = min(rivals, key=lambda q: abs(results[q]["overall"]["avg_bits"] - bits))
            for task in tasks:
                if task != "wikitext" and (c := compare(pol, rival, task)) is not None:
                    matched.append({"policy": pol, "baseline": rival, "task": task, **c})
    return {
        "model": evaluation.loaded.name,
        "identity": evaluation.loaded.identity,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": settings or {},
        "policies": [
            {"policy": r.policy, "key": r.key, "ppl_key": r.ppl_key, "scorer": r.describe} for r in evaluation.runs
        ],
        "tasks": {t: evaluation.sizes[t] for t in tasks},
        "sample": any(evaluation.sizes[t]["n"] < evaluation.sizes[t]["n_total"] for t in tasks),
        "bootstrap": {"n_boot": n_boot, "seed": seed, "level": 0.95},
        "baseline": baseline,
        "results": results,
        "paired": paired,
        "matched": matched,
    }


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def _cell(res: dict | None, metric: str) -> str:
    if not res:
        return "-"
    lo, hi = res[f"{metric}_ci"]
    return f"{_pct(res[metric])} [{_pct(lo)}, {_pct(hi)}]"


def _kib(x):
    return "-" if x is None else f"{x / 1024:.1f} KiB"


def markdown(summary: dict) -> str:
    tasks = list(summary["tasks"])
    mc = [t for t in tasks if t != "wikitext"]
    s = summary["settings"]
    lines = [f"# KV-policy evaluation: {summary['model']}", ""]
    if summary["sample"]:
        sizes = ", ".join(f"{TASK_TITLES[t]} {v['n']:,} of {v['n_total']:,}" for t, v in summary["tasks"].items())
        unit = " (WikiText: windows)" if "wikitext" in tasks else ""
        which = f"a fixed random sample drawn with seed {s.get('seed')}" if s.get("sample") else "first items only"
        lines += [
            f"> **Subset, not the full benchmarks**: {which} ({sizes}{unit}). "
            "Intervals are wider than on the full sets; quote them with the subset named.",
            "",
        ]
    lines += [
        f"Settings: backend {s.get('backend')}, weights {s.get('weights', 'fp32')}, "
        f"window {s.get('window')}, sinks {s.get('sinks')}, "
        f"group {s.get('group')}, prefill chunk {s.get('prefill_chunk')}, max context {s.get('max_context')}, "
        f"seed {s.get('seed')}; zero-shot lm-eval prompts; "
        f"95% percentile bootstrap CIs ({summary['bootstrap']['n_boot']:,} resamples, "
        f"seed {summary['bootstrap']['seed']}).",
        "avg bits and KV bytes: `Session.kv_stats()` after each context (sinks and window at 16 bits), "
        "mean over the multiple-choice items scored.",
        "",
    ]

    def table(metric: str, title: str):
        head = ["Policy", "avg bits", "KV bytes"] + [f"{TASK_TITLES[t]} {metric}" for t in mc]
        if "wikitext" in tasks:
            head += ["WikiText-2 ppl", "KL vs fp16", "WikiText bits"]
        out = [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for pol, res in summary["results"].items():
            ov = res.get("overall", {})
            row = [
                f"`{pol}`",
                "-" if ov.get("avg_bits") is None else f"{ov['avg_bits']:.2f}",
                _kib(ov.get("kv_bytes_used")),
            ]
            row += [_cell(res.get(t), metric) for t in mc]
            if "wikitext" in tasks:
                w = res.get("wikitext")
                if w:
                    row += [
                        f"{w['ppl']:.2f} [{w['ppl_ci'][0]:.2f}, {w['ppl_ci'][1]:.2f}]",
                        f"{w['kl']:.4f}",
                        f"{w['avg_bits']:.2f}",
                    ]
                else:
                    row += ["-", "-", "-"]
            out.append("| " + " | ".join(row) + " |")
        return out + [""]

    if mc:
        lines += table("acc_norm", "Accuracy, length-normalised (acc_norm, %)")
        lines += table("acc", "Accuracy (acc, %)")
    elif "wikitext" in tasks:
        lines += table("acc", "WikiText-2 held-out half")
    if summary["paired"]:
        lines += [
            f"## Paired comparisons against `{summary['baseline']}` (same items)",
            "",
            "diff = policy - baseline in points, paired-bootstrap 95% CI; McNemar: items only the policy / "
            "only the baseline got right, exact two-sided p.",
            "",
            "| Policy | Task | metric | diff | 95% CI | policy only | baseline only | p |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for pol, per_task in summary["paired"].items():
            for task, per_m in per_task.items():
                for m, c in per_m.items():
                    mc_ = c["mcnemar"]
                    lines.append(
                        f"| `{pol}` | {TASK_TITLES[task]} | {m} | {100 * c['diff']:+.1f} | "
                        f"[{100 * c['ci'][0]:+.1f}, {100 * c['ci'][1]:+.1f}] | {mc_['a_only']} | {mc_['b_only']} | "
                        f"{mc_['p_exact']:.3g} |"
                    )
        lines.append("")
    if summary.get("matched"):
        lines += [
            "## Feature policies against random and static at the nearest average bits (same items)",
            "",
            "Each `learned`/`rule` policy against the `random:*` and the `static-*` policy of this run whose mean "
            "average bits is closest; columns as above (baseline = the rival).",
            "",
            "| Policy | Rival | Task | metric | diff | 95% CI | policy only | rival only | p |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in summary["matched"]:
            for m in METRICS:
                c = row[m]
                mc_ = c["mcnemar"]
                lines.append(
                    f"| `{row['policy']}` | `{row['baseline']}` | {TASK_TITLES[row['task']]} | {m} | "
                    f"{100 * c['diff']:+.1f} | "
                    f"[{100 * c['ci'][0]:+.1f}, {100 * c['ci'][1]:+.1f}] | {mc_['a_only']} | {mc_['b_only']} | "
                    f"{mc_['p_exact']:.3g} |"
                )
        lines.append("")
    lines += [
        "## Throughput (the machine that scored; each row its own backend)",
        "",
        "Wall-clock seconds per item (WikiText: per window) and CPU seconds of this process per item; "
        "engines: `packed` = batched engine (kvexport.eval.batched), `cache` = the cache path, @ the device.",
        "",
        "| Policy | Task | items | s/item | items/s | CPU s/item | engines |",
        "|---|---|---|---|---|---|---|",
    ]
    for pol, res in summary["results"].items():
        for task in tasks:
            r = res.get(task)
            if r:
                rate = r.get("items_per_s") or r.get("windows_per_s")
                engines = ", ".join(f"{k} {v}" for k, v in r.get("engines", {}).items()) or "-"
                lines.append(
                    f"| `{pol}` | {TASK_TITLES[task]} | {r['n']} | {r['seconds'] / max(r['n'], 1):.4f} | "
                    f"{'-' if rate is None else f'{rate:.2f}'} | {r['cpu_seconds'] / max(r['n'], 1):.4f} | {engines} |"
                )
    return "\n".join(lines) + "\n"


def short_label(policy: str) -> str:
    """``learned:some/dir/controller-4.safetensors`` -> ``learned:controller-4`` (plot labels)."""
    if policy.startswith("learned:"):
        return "learned:" + Path(policy.split(":", 1)[1]).stem
    return policy


def plot(summary: dict, path: Path, metric: str = "acc_norm") -> None:
    """Accuracy (with CIs) vs average bits, one panel per task (WikiText: perplexity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for pol, res in summary["results"].items():
            r = res.get(task)
            if not r or r.get("avg_bits") is None:
                continue
            if task == "wikitext":
                y, (lo, hi) = r["ppl"], r["ppl_ci"]
            else:
                y, (lo, hi) = 100 * r[metric], (100 * r[f"{metric}_ci"][0], 100 * r[f"{metric}_ci"][1])
            ax.errorbar([r["avg_bits"]], [y], yerr=[[y - lo], [hi - y]], fmt="o", capsize=3)
            ax.annotate(short_label(pol), (r["avg_bits"], y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        n = summary["tasks"][task]
        ax.set_title(f"{TASK_TITLES[task]} (n={n['n']:,}{' sample' if n['n'] < n['n_total'] else ''})")
        ax.set_xlabel("average bits / KV element")
        ax.set_ylabel("perplexity" if task == "wikitext" else f"{metric} (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{summary['model']}: accuracy vs KV bits" + (" (SMALL SAMPLE)" if summary["sample"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(summary: dict, out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "summary.json", "markdown": out_dir / "table.md", "png": out_dir / "acc_vs_bits.png"}
    paths["json"].write_text(json.dumps(summary, indent=1) + "\n")
    paths["markdown"].write_text(markdown(summary))
    if any(
        summary["results"].get(p) and any(k in summary["tasks"] for k in summary["results"][p])
        for p in summary["results"]
    ):
        plot(summary, paths["png"])
    return paths
