"""Summaries of the long-context records (:mod:`kvexport.eval.longctx`): ``long_summary.json``,
``long_table.md``, ``longppl.png`` (KL against effective bits, FP16 loss and ΔNLL by position) and
``passkey.png`` (probe accuracy and answer log-probability per depth).

``longppl``, per policy and context length, over the windows every policy scored:

* ppl ``exp(sum NLL / tokens)``; ΔNLL = mean per-token NLL(policy) - NLL(fp16) on the same tokens; KL = mean
  KL(fp16 || policy); top-1 = share of tokens where policy and FP16 rank the same next token first;
* effective bits: the cache's ``avg_bits`` and bytes after the window (sinks, window, scales and zero
  points counted), mean over windows;
* 95% intervals: percentile bootstrap over :data:`BLOCK`-token blocks of consecutive query positions (ratio of
  sums, :func:`kvexport.eval.stats.bootstrap_ratio_ci`); paired statistics resample blocks of per-token
  differences, i.e. the same tokens for both sides. Tokens of one document stay correlated beyond a block,
  so with few windows the intervals are optimistic;
* by position: the same over query positions in bins ``[0, 64), [64, 128), ...`` (powers of two and the
  context lengths; JSON and plot) and between consecutive context lengths (the table): does the loss grow
  with the distance the cache must carry?
* paired: every two non-reference policies, difference in NLL and in KL per token;
* context gain (does the model use long context?): for consecutive context lengths ``s < l``, the tokens at
  position ``>= s`` of their ``l``-window and in the upper half ``[s/2, s)`` of their ``s``-window: NLL with
  the ``l``-window minus NLL with the ``s``-window. They see at least ``1.5 s`` tokens in one and ``s/2`` to
  ``s`` in the other, so a difference below 0 means the model uses context beyond ``s/2`` tokens.

``passkey``, per policy, probe context and depth: accuracy (the answer ranked first of the 10 candidates)
with a bootstrap CI over trials, the answer's mean summed log-probability and margin over the best
distractor; each policy against fp16 on the same trials (paired bootstrap, McNemar).
"""

from __future__ import annotations

import json
import math
import time
from itertools import combinations
from pathlib import Path

import numpy as np

from kvexport.eval import stats as S
from kvexport.eval.report import short_label
from kvexport.eval.runner import REFERENCE_POLICY
from kvexport.fsutil import write_bytes_atomic, write_text_atomic
from kvexport.plots import png_bytes, pyplot

BLOCK = 64  # tokens per bootstrap unit
FILES = {"json": "long_summary.json", "markdown": "long_table.md", "longppl": "longppl.png", "passkey": "passkey.png"}


def _blocks(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(sum, count) per :data:`BLOCK`-position block of each ``(values [T], selected [T] bool)`` window,
    empty blocks dropped."""
    sums, counts = [np.zeros(0)], [np.zeros(0)]
    for values, sel in parts:
        block = np.flatnonzero(sel) // BLOCK
        sums.append(np.bincount(block, weights=values[sel]))
        counts.append(np.bincount(block).astype(np.float64))
    s, c = np.concatenate(sums), np.concatenate(counts)
    return s[c > 0], c[c > 0]


def estimate(parts, n_boot: int, seed: int, transform=None) -> dict | None:
    """Token mean of the selected values (``transform`` applied) and its block-bootstrap 95% interval."""
    s, c = _blocks(parts)
    if not len(c):
        return None
    mean = s.sum() / c.sum()
    lo, hi = S.bootstrap_ratio_ci(s, c, transform, n_boot, seed)
    return {"value": float(transform(mean) if transform else mean), "ci": [lo, hi], "tokens": int(c.sum())}


def position_bins(context: int, contexts: list[int], fine: bool) -> list[tuple[int, int]]:
    """Query-position bins of a ``context``-token window (positions ``0 .. context - 2``): fine (powers of two
    from 64, and the shorter context lengths) or coarse (the shorter context lengths only)."""
    edges = {0, context - 1} | {c for c in contexts if c < context}
    if fine:
        edges |= {2**k for k in range(6, 32) if 2**k < context - 1}
    e = sorted(edges)
    return list(zip(e[:-1], e[1:]))


def _array(rec: dict, field: str) -> np.ndarray:
    return np.asarray(rec[field], dtype=np.float64)


def _select(n: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
    pos = np.arange(n)
    return (pos >= lo) & (pos < (n if hi is None else hi))


def _metrics(recs: list[dict], refs: list[dict], n_boot: int, seed: int, lo: int = 0, hi: int | None = None):
    """ppl, ΔNLL, KL, top-1 of windows ``recs`` (reference windows ``refs``) over positions ``[lo, hi)``."""
    sel = [_select(len(r["nll"]), lo, hi) for r in recs]

    def est(values, transform=None):
        return estimate(list(zip(values, sel)), n_boot, seed, transform)

    nll = est([_array(r, "nll") for r in recs], np.exp)
    out = {"tokens": nll["tokens"] if nll else 0}
    for name, e in (
        ("ppl", nll),
        ("nll", est([_array(r, "nll") for r in recs])),
        ("dnll", est([_array(r, "nll") - _array(f, "nll") for r, f in zip(recs, refs)])),
        ("kl", est([_array(r, "kl") for r in recs])),
        ("top1", est([_array(r, "top1") for r in recs])),
    ):
        out[name], out[f"{name}_ci"] = (e["value"], e["ci"]) if e else (None, None)
    return out


def _records(store, key: str, task: str, n: int) -> dict[int, dict]:
    return {r["idx"]: r for r in store.get(key, task) if r["idx"] < n}


def context_gain(small: dict[int, dict], large: dict[int, dict], s: int, n_boot: int, seed: int) -> dict | None:
    """NLL(l-window) - NLL(s-window) of the tokens described in the module docstring, paired."""
    parts = []
    for rec in large.values():
        nll = _array(rec, "nll")
        i = np.arange(len(nll))
        target = rec["start"] + i + 1  # absolute index of the predicted token
        k, j = target // s, target % s - 1  # its s-window and query position there
        sel = (i >= s) & (j >= s // 2) & np.isin(k, list(small))
        other = np.zeros_like(nll)
        for kk in np.unique(k[sel]):
            at = sel & (k == kk)
            other[at] = _array(small[int(kk)], "nll")[j[at]]
        parts.append((nll - other, sel))
    e = estimate(parts, n_boot, seed)
    return None if e is None else {"diff": e["value"], "ci": e["ci"], "tokens": e["tokens"]}


def summarize_longppl(ev, store, n_boot: int, seed: int) -> dict:
    cfg = ev.cfg
    results: dict[str, dict] = {p: {} for p in cfg.policies}
    paired, gains = [], []
    recorded: dict[tuple[str, int], dict[int, dict]] = {}
    for c, wins in ev.windows.items():
        runs = ev.context_runs(c)
        per = {r.policy: _records(store, r.key, "longppl", len(wins)) for r in runs}
        common = sorted(set.intersection(*(set(v) for v in per.values())))
        if not common:
            continue
        refs = [per[REFERENCE_POLICY][w] for w in common]
        for r in runs:
            recs = [per[r.policy][w] for w in common]
            res = _metrics(recs, refs, n_boot, seed)
            res.update(
                windows=len(common),
                avg_bits=float(np.mean([x["avg_bits"] for x in recs])),
                kv_bytes_used=float(np.mean([x["kv_bytes_used"] for x in recs])),
                kv_bytes_allocated=float(np.mean([x["kv_bytes_allocated"] for x in recs])),
                seconds_per_window=float(np.mean([x["seconds"] for x in recs])),
                by_position=[{"lo": lo, "hi": hi, **_metrics(recs, refs, n_boot, seed, lo, hi)}
                             for lo, hi in position_bins(c, cfg.contexts, fine=True)],
                by_range=[{"lo": lo, "hi": hi, **_metrics(recs, refs, n_boot, seed, lo, hi)}
                          for lo, hi in position_bins(c, cfg.contexts, fine=False)],
            )
            results[r.policy][str(c)] = res
            recorded[(r.policy, c)] = {w: per[r.policy][w] for w in common}
        others = [r.policy for r in runs if r.policy != REFERENCE_POLICY]
        for a, b in combinations(others, 2):
            ra, rb = [per[a][w] for w in common], [per[b][w] for w in common]
            sel = [np.ones(len(x["nll"]), dtype=bool) for x in ra]
            row = {"a": a, "b": b, "context": c}
            for field in ("nll", "kl"):
                e = estimate([(_array(x, field) - _array(y, field), m) for x, y, m in zip(ra, rb, sel)], n_boot, seed)
                row.update({f"{field}_diff": e["value"], f"{field}_ci": e["ci"], "tokens": e["tokens"]})
            paired.append(row)
    lengths = sorted(ev.windows)
    for p in cfg.policies:
        for s, ll in zip(lengths, lengths[1:]):
            if (p, s) in recorded and (p, ll) in recorded:
                g = context_gain(recorded[(p, s)], recorded[(p, ll)], s, n_boot, seed)
                if g is not None:
                    gains.append({"policy": p, "small": s, "large": ll, **g})
    return {
        "contexts": lengths,
        "windows": {str(c): len(w) for c, w in ev.windows.items()},
        "tokens_per_context": {str(c): len(w) * c for c, w in ev.windows.items()},
        "text": ev.text,
        "text_tokens": len(ev.ids),
        "results": {p: r for p, r in results.items() if r},
        "paired": paired,
        "context_gain": gains,
    }


def summarize_passkey(ev, store, n_boot: int, seed: int) -> dict:
    cfg = ev.cfg
    results: dict[str, dict] = {}
    paired = []
    for n in ev.items:
        for d in cfg.depths:
            per = {r.policy: _records(store, r.probe_keys[d], "passkey", cfg.trials) for r in ev.context_runs(n)}
            for p, recs in per.items():
                if not recs:
                    continue
                acc = [x["acc"] for x in recs.values()]
                lp = [x["answer_logprob"] for x in recs.values()]
                results.setdefault(p, {}).setdefault(str(n), {})[f"{d:g}"] = {
                    "trials": len(recs),
                    "acc": float(np.mean(acc)),
                    "acc_ci": list(S.bootstrap_ci(acc, n_boot, seed)),
                    "answer_logprob": float(np.mean(lp)),
                    "answer_logprob_ci": list(S.bootstrap_ci(lp, n_boot, seed)),
                    "margin": float(np.mean([x["margin"] for x in recs.values()])),
                    "avg_bits": float(np.mean([x["avg_bits"] for x in recs.values()])),
                    "seconds_per_item": float(np.mean([x["seconds"] for x in recs.values()])),
                }
            ref = per.get(REFERENCE_POLICY, {})
            for p, recs in per.items():
                common = sorted(set(recs) & set(ref))
                if p == REFERENCE_POLICY or not common:
                    continue
                c = S.paired_comparison([recs[t]["acc"] for t in common], [ref[t]["acc"] for t in common],
                                        n_boot, seed)
                dl = [recs[t]["answer_logprob"] - ref[t]["answer_logprob"] for t in common]
                paired.append({"policy": p, "context": n, "depth": d, **c, "logprob_diff": float(np.mean(dl)),
                               "logprob_ci": list(S.bootstrap_ci(dl, n_boot, seed))})
    return {
        "contexts": sorted(ev.items),
        "depths": cfg.depths,
        "trials": cfg.trials,
        "filler": cfg.filler,
        "candidates": len(next(iter(ev.items.values()))[0].continuations) if ev.items else None,
        "results": results,
        "paired": paired,
    }


def summarize(ev, store, n_boot: int = S.N_BOOT, seed: int = 0, settings: dict | None = None) -> dict:
    out = {
        "model": ev.loaded.name,
        "identity": ev.loaded.identity,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": settings or {},
        "policies": ev.cfg.policies,
        "reference": REFERENCE_POLICY,
        "bootstrap": {"n_boot": n_boot, "seed": seed, "level": 0.95, "block_tokens": BLOCK},
    }
    if ev.windows:
        out["longppl"] = summarize_longppl(ev, store, n_boot, seed)
    if ev.items:
        out["passkey"] = summarize_passkey(ev, store, n_boot, seed)
    return out


# ---------------------------------------------------------------------------------------------- markdown
def _f(x, digits: int = 4, sign: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _ci(value, ci, digits: int = 4, sign: bool = False, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    v, lo, hi = value * scale, ci[0] * scale, ci[1] * scale
    return f"{_f(v, digits, sign)} [{_f(lo, digits, sign)}, {_f(hi, digits, sign)}]"


def _span(lo: int, hi: int) -> str:
    return f"{lo}-{hi - 1}"  # positions lo .. hi - 1


def markdown_longppl(lp: dict, s: dict) -> list[str]:
    text = (f"`{lp['text']['text_file']}` (sha256 {lp['text']['sha256'][:12]})" if "text_file" in lp["text"]
            else "WikiText-2 test articles joined (held-out half)")
    scored = ", ".join(f"{int(c):,}: {n} window{'s' * (n != 1)}" for c, n in lp["windows"].items())
    lines = [
        f"Text: {text}, {lp['text_tokens']:,} tokens; the same first tokens scored at every context length "
        f"({scored}).",
        "",
        "## Per context length (policy against FP16 on the same windows)",
        "",
        "eff. bits: the cache's average bits per element after the window (sinks, window, scales counted). "
        "ΔNLL: policy minus FP16, nats per token. KL: mean KL(FP16 || policy) per token. top-1: tokens where "
        "both rank the same next token first (%).",
        "",
        "| Policy | context | windows | eff. bits | KV KiB | ppl [95% CI] | ΔNLL [CI] | KL [CI] | top-1 % [CI] "
        "| s/window |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p, per_c in lp["results"].items():
        for c, r in per_c.items():
            lines.append(
                f"| `{p}` | {int(c):,} | {r['windows']} | {r['avg_bits']:.2f} | {r['kv_bytes_used'] / 1024:,.0f} | "
                f"{_ci(r['ppl'], r['ppl_ci'], 2)} | {_ci(r['dnll'], r['dnll_ci'], 4, True)} | "
                f"{_ci(r['kl'], r['kl_ci'])} | {_ci(r['top1'], r['top1_ci'], 1, scale=100)} | "
                f"{r['seconds_per_window']:.1f} |"
            )
    ref = lp["results"].get(REFERENCE_POLICY, {})
    lines += [
        "",
        "## FP16 loss by query position (does the model use long context?)",
        "",
        "Mean FP16 NLL of the tokens whose query position in the window falls in the bin; a loss that keeps "
        "falling in later bins means the model draws on the longer context (text differs between bins: "
        "read it with the context gain below).",
        "",
        "| context | positions | tokens | FP16 NLL [95% CI] |",
        "|---|---|---|---|",
    ]
    for c, r in ref.items():
        for b in r["by_position"]:
            lines.append(f"| {int(c):,} | {_span(b['lo'], b['hi'])} | {b['tokens']:,} | {_ci(b['nll'], b['nll_ci'])} |")
    if lp["context_gain"]:
        lines += [
            "",
            "Context gain: tokens at position >= s of an l-token window and in the upper half [s/2, s) of their "
            "s-token window; NLL with the l-window minus NLL with the s-window (same tokens; >= 1.5 s tokens "
            "of context against s/2 to s). Below 0: the model uses context beyond s/2 tokens.",
            "",
            "| Policy | s | l | tokens | NLL(l) - NLL(s) [95% CI] |",
            "|---|---|---|---|---|",
        ]
        for g in lp["context_gain"]:
            lines.append(f"| `{g['policy']}` | {g['small']:,} | {g['large']:,} | {g['tokens']:,} | "
                         f"{_ci(g['diff'], g['ci'], 4, True)} |")
    lines += [
        "",
        "## ΔNLL and KL by query position",
        "",
        "| Policy | context | positions | tokens | ΔNLL [95% CI] | KL [95% CI] | top-1 % |",
        "|---|---|---|---|---|---|---|",
    ]
    for p, per_c in lp["results"].items():
        if p == REFERENCE_POLICY:
            continue
        for c, r in per_c.items():
            for b in r["by_range"]:
                lines.append(
                    f"| `{p}` | {int(c):,} | {_span(b['lo'], b['hi'])} | {b['tokens']:,} | "
                    f"{_ci(b['dnll'], b['dnll_ci'], 4, True)} | {_ci(b['kl'], b['kl_ci'])} | "
                    f"{_f(100 * b['top1'], 1)} |"
                )
    if lp["paired"]:
        lines += [
            "",
            "## Paired comparisons (same tokens)",
            "",
            "| A | B | context | tokens | NLL A - B [95% CI] | KL A - B [95% CI] |",
            "|---|---|---|---|---|---|",
        ]
        for row in lp["paired"]:
            lines.append(
                f"| `{row['a']}` | `{row['b']}` | {row['context']:,} | {row['tokens']:,} | "
                f"{_ci(row['nll_diff'], row['nll_ci'], 4, True)} | {_ci(row['kl_diff'], row['kl_ci'], 4, True)} |"
            )
    return lines + [""]


def markdown_passkey(pk: dict) -> list[str]:
    lines = [
        "## Passkey retrieval probe",
        "",
        f"A 5-digit key planted at each depth of a context of N tokens ({pk['filler']} filler), asked for at the "
        f"end; acc: the key has the highest log-probability of {pk['candidates']} candidates (chance "
        f"{100 / pk['candidates']:.0f}%), CIs over {pk['trials']} trials per cell. Depth 0.1: the key sits near the "
        "start, farthest from the question.",
        "",
        "| Policy | N | depth | trials | acc % [95% CI] | answer log-prob [CI] | margin | eff. bits | s/item |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p, per_n in pk["results"].items():
        for n, per_d in per_n.items():
            for d, r in per_d.items():
                lines.append(
                    f"| `{p}` | {int(n):,} | {d} | {r['trials']} | {_ci(r['acc'], r['acc_ci'], 0, scale=100)} | "
                    f"{_ci(r['answer_logprob'], r['answer_logprob_ci'], 2)} | {r['margin']:+.2f} | "
                    f"{r['avg_bits']:.2f} | {r['seconds_per_item']:.1f} |"
                )
    if pk["paired"]:
        lines += [
            "",
            f"Against `{REFERENCE_POLICY}` on the same trials: accuracy difference (points, paired bootstrap), "
            "McNemar counts, answer log-probability difference.",
            "",
            "| Policy | N | depth | acc diff [95% CI] | policy only | fp16 only | p | log-prob diff [95% CI] |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in pk["paired"]:
            m = row["mcnemar"]
            lines.append(
                f"| `{row['policy']}` | {row['context']:,} | {row['depth']:g} | "
                f"{_ci(row['diff'], row['ci'], 0, True, 100)} | {m['a_only']} | {m['b_only']} | {m['p_exact']:.3g} | "
                f"{_ci(row['logprob_diff'], row['logprob_ci'], 2, True)} |"
            )
    return lines + [""]


def markdown(summary: dict) -> str:
    s = summary["settings"]
    lines = [
        f"# Long-context KV evaluation: {summary['model']}",
        "",
        f"Settings: weights {s.get('weights')}, window {s.get('window')}, sinks {s.get('sinks')}, group "
        f"{s.get('group')}, rotate keys {s.get('rotate_keys')} / values {s.get('rotate_values', False)}, clip "
        f"{s.get('clip', 'none')}, prefill chunk "
        f"{s.get('prefill_chunk')}, "
        f"seed {s.get('seed')}; the cache sized to each context; reference `{summary['reference']}`. "
        f"95% percentile bootstrap CIs ({summary['bootstrap']['n_boot']:,} resamples, seed "
        f"{summary['bootstrap']['seed']}; longppl over {summary['bootstrap']['block_tokens']}-token blocks).",
        "",
    ]
    if "longppl" in summary:
        lines += markdown_longppl(summary["longppl"], s)
    if "passkey" in summary:
        lines += markdown_passkey(summary["passkey"])
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plots
def plot_longppl(summary: dict) -> bytes:
    """KL against effective bits (one point per policy and context), FP16 NLL and ΔNLL by query position."""
    plt = pyplot()

    lp = summary["longppl"]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    markers = dict(zip(lp["contexts"], "osD^v<>p*"))
    for p, per_c in lp["results"].items():
        for ctx, r in per_c.items():
            a.errorbar([r["avg_bits"]], [r["kl"]], yerr=[[r["kl"] - r["kl_ci"][0]], [r["kl_ci"][1] - r["kl"]]],
                       fmt=markers[int(ctx)], capsize=3, color=f"C{list(lp['results']).index(p)}",
                       label=f"{short_label(p)} @ {int(ctx):,}")
    a.set_yscale("symlog", linthresh=1e-4)
    a.set(xlabel="effective bits / KV element (window, sinks, scales counted)", ylabel="KL(fp16 || policy) / token",
          title="KL against effective bits")
    a.legend(fontsize=7)
    for ctx, r in lp["results"].get(REFERENCE_POLICY, {}).items():
        bins = r["by_position"]
        x = [math.sqrt(max(q["lo"], 1) * q["hi"]) for q in bins]
        b.errorbar(x, [q["nll"] for q in bins], yerr=[[q["nll"] - q["nll_ci"][0] for q in bins],
                                                      [q["nll_ci"][1] - q["nll"] for q in bins]],
                   marker=markers[int(ctx)], capsize=2, label=f"window {int(ctx):,}")
    b.set_xscale("log")
    b.set(xlabel="query position in the window", ylabel="FP16 NLL (nats)", title="FP16 loss by position")
    b.legend(fontsize=7)
    longest = str(max(lp["contexts"]))
    for i, (p, per_c) in enumerate(lp["results"].items()):
        if p == REFERENCE_POLICY or longest not in per_c:
            continue
        bins = per_c[longest]["by_position"]
        x = [math.sqrt(max(q["lo"], 1) * q["hi"]) for q in bins]
        c.plot(x, [q["dnll"] for q in bins], marker="o", color=f"C{i}", label=short_label(p))
    c.axhline(0, color="grey", lw=0.8)
    c.set_xscale("log")
    c.set(xlabel="query position in the window", ylabel="ΔNLL vs fp16 (nats)",
          title=f"ΔNLL by position, {int(longest):,}-token windows")
    c.legend(fontsize=7)
    for ax in (a, b, c):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{summary['model']}: long-context KV fidelity")
    return png_bytes(fig)


def plot_passkey(summary: dict) -> bytes:
    """Accuracy and answer log-probability against depth, one panel column per probe context."""
    plt = pyplot()

    pk = summary["passkey"]
    ns = [str(n) for n in pk["contexts"]]
    fig, axes = plt.subplots(2, len(ns), figsize=(max(6.0, 4.5 * len(ns)), 6.4), squeeze=False)
    for col, n in enumerate(ns):
        for i, (p, per_n) in enumerate(pk["results"].items()):
            if n not in per_n:
                continue
            depths = sorted(per_n[n], key=float)
            axes[0][col].plot([float(d) for d in depths], [100 * per_n[n][d]["acc"] for d in depths], marker="o",
                              color=f"C{i}", label=short_label(p))
            axes[1][col].plot([float(d) for d in depths], [per_n[n][d]["answer_logprob"] for d in depths],
                              marker="o", color=f"C{i}", label=short_label(p))
        axes[0][col].axhline(100 / pk["candidates"], color="grey", lw=0.8, ls="--")
        axes[0][col].set(title=f"passkey, N = {int(n):,}", ylabel="accuracy (%)", ylim=(-5, 105))
        axes[1][col].set(xlabel="depth of the key (0 = start)", ylabel="answer log-prob (nats)")
        for ax in axes[:, col]:
            ax.set_xticks(pk["depths"])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"{summary['model']}: passkey ({pk['trials']} trials per point)")
    return png_bytes(fig)


def write_reports(summary: dict, out_dir: Path) -> dict[str, Path]:
    """Write the files of :data:`FILES` that ``summary`` has data for (each atomically); returns their paths."""
    out_dir = Path(out_dir)
    paths = {k: out_dir / name for k, name in FILES.items()}
    write_text_atomic(paths["json"], json.dumps(summary, indent=1) + "\n")
    write_text_atomic(paths["markdown"], markdown(summary))
    if summary.get("longppl", {}).get("results"):
        write_bytes_atomic(paths["longppl"], plot_longppl(summary))
    if summary.get("passkey", {}).get("results"):
        write_bytes_atomic(paths["passkey"], plot_passkey(summary))
    return {k: p for k, p in paths.items() if p.exists()}
