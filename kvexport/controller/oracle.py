"""Headroom of per-token routing: an ORACLE that knows every token's measured cost, against random
routing at the oracle's own class shares and against static classes, all *measured* at equal bits.

Why: a controller can at best route as well as an oracle that sees each token's true cost. If the
oracle's KL is not clearly below random routing with the same class counts, no feature set can
earn the controller its place at that budget, and controller work should stop there.

Per window of ``T`` tokens (the model's FP16 cache as reference):

1. costs: the integrated-gradients attribution of the summed KL to each token at each quantized
   class (:func:`kvexport.controller.labels.attribute`), computed on the very window it is then
   scored on (that is what makes it an oracle);
2. pooled tokens: those some query sees after they left the FP16 window (``quantized_visibility``;
   sinks and the window's tail never are); their classes decide the bits;
3. assignments at a pooled-bits budget ``B`` (bits per element with metadata: 2.5 / 4.5 / 8.5 / 16
   at group 64): ``oracle`` = ``argmin_c cost_c + lambda * bits_c`` per token with ``lambda``
   bisected to meet ``B`` (:func:`kvexport.controller.train.oracle_choice`); ``random`` = the oracle's
   classes shuffled over the same tokens (one per seed); ``static-b`` = every pooled token at ``b``;
4. each assignment is measured: summed KL(fp16 || assignment) of a full-window forward in which
   each pooled token's K/V are its class's quantize-dequantize for exactly the queries that see it
   quantized (:func:`kvexport.controller.labels.gated_forward`; the cache's rule and quantizer).

Reported per assignment: KL per token (mean over the ``T`` positions), pooled bits, effective bits
of the whole cache at ``T`` tokens (sinks and window at 16), class shares. :func:`write_report`
writes JSON, a markdown table and a PNG (KL against pooled bits).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from kvexport.controller import labels as L
from kvexport.controller.train import avg_bits, multiplier_for, oracle_choice, shares
from kvexport.fsutil import write_bytes_atomic, write_text_atomic
from kvexport.kv import quant
from kvexport.kv.policy import CLASSES, class_bits
from kvexport.kv.schedule import quantized_visibility
from kvexport.plots import png_bytes, pyplot

FP_CLASS = len(CLASSES) - 1  # index of the 16-bit class


def assignments(cost: torch.Tensor, pooled: torch.Tensor, budgets: list[float], bits: torch.Tensor,
                seeds: list[int]) -> dict[str, torch.Tensor]:
    """Class index per token ``[T]`` (non-pooled tokens: 16-bit) for every compared assignment.

    cost ``[T, 4]`` attributed KL per class (16-bit: 0); pooled bool ``[T]``; ``bits`` ``[4]``."""
    T = cost.shape[0]
    idx = pooled.nonzero().flatten()
    out = {}

    def full(choice_pooled: torch.Tensor) -> torch.Tensor:
        choice = torch.full((T,), FP_CLASS, dtype=torch.long)
        choice[idx] = choice_pooled
        return choice

    for c in range(FP_CLASS):
        out[f"static-{CLASSES[c]}"] = full(torch.full((len(idx),), c, dtype=torch.long))
    pc = cost[idx]  # [n_pooled, 4]
    for b in budgets:
        oracle = oracle_choice(pc, bits, multiplier_for(pc, bits, b))  # [n_pooled]
        out[f"oracle@{b:g}"] = full(oracle)
        for s in seeds:
            g = torch.Generator().manual_seed(s)
            out[f"random@{b:g}/seed{s}"] = full(oracle[torch.randperm(len(idx), generator=g)])
    return out


def gates_of(choice: torch.Tensor) -> dict[int, torch.Tensor]:
    """``{bits: 0/1 gate [T]}`` of the quantized classes in a class-index assignment."""
    return {CLASSES[c]: (choice == c).float() for c in range(FP_CLASS) if (choice == c).any()}


def measure_window(model, ids: list[int], *, sinks: int, window: int, chunk: int, group: int,
                   budgets: list[float], seeds: list[int], steps: dict[int, int], rotate: int = 0,
                   clip=quant.NO_CLIP, progress: bool = True) -> dict:
    """Attribution, assignments and measured KL of one window (see the module docstring); ``rotate``: the
    cache's rotation mask (1 keys, 2 values: :attr:`kvexport.kv.cache.CacheLayout.rotation`); ``clip``: the classes'
    clip ratios (:func:`kvexport.kv.quant.parse_clip`)."""
    tokens = torch.tensor(ids)
    T = len(ids)
    out = L.attribute(model, tokens, sinks=sinks, window=window, chunk=chunk, group=group, steps=steps,
                      rotate=rotate, clip=clip)
    cost = L.class_costs(out["attr"])  # [T, 4]
    pooled = quantized_visibility(T, sinks, window, chunk).any(0)  # [T]
    bits = torch.tensor(class_bits(group), dtype=torch.float32)
    chosen = assignments(cost, pooled, budgets, bits, seeds)
    kw = dict(sinks=sinks, window=window, chunk=chunk, group=group, ref=out["ref"], rotate=rotate, clip=clip)
    rows = {}
    for name, choice in tqdm(chosen.items(), desc="measure", disable=not progress, leave=False):
        kl = L.measured_kl(model, tokens, gates_of(choice), **kw) if (choice != FP_CLASS).any() else 0.0
        pooled_choice = choice[pooled]
        rows[name] = {"kl_per_token": kl / T, "kl_sum": kl, "pooled_bits": avg_bits(pooled_choice, bits),
                      "effective_bits": float(bits[choice].mean()), "shares": shares(pooled_choice),
                      "attributed_kl_sum": float(cost.gather(1, choice[:, None]).sum())}
    return {"tokens": T, "pooled_tokens": int(pooled.sum()), "rows": rows}


def summarize(windows: list[dict]) -> dict:
    """Mean over windows of each row's numbers (KL weighted by tokens), and the oracle's and random's
    KL per budget side by side."""
    names = list(windows[0]["rows"])
    total = sum(w["tokens"] for w in windows)
    rows = {}
    for n in names:
        rs = [w["rows"][n] for w in windows]
        rows[n] = {"kl_per_token": sum(r["kl_sum"] for r in rs) / total,
                   "pooled_bits": sum(r["pooled_bits"] for r in rs) / len(rs),
                   "effective_bits": sum(r["effective_bits"] for r in rs) / len(rs),
                   "shares": [sum(r["shares"][i] for r in rs) / len(rs) for i in range(len(CLASSES))]}
    budgets = sorted({float(n.split("@")[1]) for n in names if n.startswith("oracle@")})
    per_budget = []
    for b in budgets:
        rand = [rows[n]["kl_per_token"] for n in names if n.startswith(f"random@{b:g}/")]
        o = rows[f"oracle@{b:g}"]["kl_per_token"]
        r = sum(rand) / len(rand)
        per_budget.append({"budget": b, "oracle": o, "random_mean": r, "random_min": min(rand),
                           "oracle_over_random": o / r if r > 0 else None})
    return {"rows": rows, "budgets": per_budget}


def markdown(result: dict) -> str:
    s, st = result["summary"], result["settings"]
    rotated = (", keys rotated (--kv-rotate)" if st.get("rotate") else "") + (f", --kv-clip {st['clip']}"
                                                                              if st.get("clip") else "")
    lines = [f"Oracle headroom: {result['model']}, {len(result['windows'])} held-out window(s) of {st['tokens']} "
             f"tokens, sinks {st['sinks']}, window {st['window']}, chunk {st['chunk']}, group {st['group']}{rotated}.",
             "", "| assignment | pooled bits | effective bits | KL / token | shares 2/4/8/16 |",
             "|---|---|---|---|---|"]
    for name, r in s["rows"].items():
        sh = "/".join(f"{x:.2f}" for x in r["shares"])
        lines.append(f"| {name} | {r['pooled_bits']:.2f} | {r['effective_bits']:.2f} | {r['kl_per_token']:.4f} "
                     f"| {sh} |")
    lines += ["", "| budget (pooled bits) | oracle KL | random KL (mean of seeds) | oracle / random |",
              "|---|---|---|---|"]
    for b in s["budgets"]:
        ratio = "-" if b["oracle_over_random"] is None else f"{b['oracle_over_random']:.2f}"
        lines.append(f"| {b['budget']:g} | {b['oracle']:.4f} | {b['random_mean']:.4f} | {ratio} |")
    return "\n".join(lines) + "\n"


def plot(result: dict) -> bytes:
    rows = result["summary"]["rows"]
    fig, ax = pyplot().subplots(figsize=(6.4, 4.2))
    for prefix, style, label in (("oracle@", "o-", "oracle"), ("random@", "x", "random, oracle's shares"),
                                 ("static-", "s--", "static")):
        pts = sorted((r["pooled_bits"], r["kl_per_token"]) for n, r in rows.items() if n.startswith(prefix))
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("pooled bits per element (metadata included)")
    ax.set_ylabel("KL(fp16 || assignment) per token")
    ax.set_title(f"routing headroom, {result['settings']['tokens']}-token windows")
    ax.grid(alpha=0.3)
    ax.legend()
    return png_bytes(fig)


def write_report(result: dict, out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "oracle.json", "md": out_dir / "oracle.md", "png": out_dir / "oracle.png"}
    write_text_atomic(paths["json"], json.dumps(result, indent=1))
    write_text_atomic(paths["md"], markdown(result))
    write_bytes_atomic(paths["png"], plot(result))
    return paths
