"""Run policies x tasks, one record per item, resumable (see :mod:`kvexport.eval.records`).

Multiple-choice tasks loop task -> block of items -> policy -> item. WikiText loops window -> policy so the FP16
reference log-probabilities of a window are computed once and compared with every policy without
keeping ``[tokens, vocab]`` tensors of the whole file in memory.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from kvexport.data import data_file
from kvexport.errors import KvxError
from kvexport.eval import tasks as T
from kvexport.eval import wikitext as W
from kvexport.eval.records import RecordStore, config_key
from kvexport.eval.scoring import choice_metrics, encode_pair, make_scorer, score_each, with_policy
from kvexport.models.loader import LoadedModel
from kvexport.models.weights import quantize_weights
from kvexport.session import CacheOptions

REFERENCE_POLICY = "fp16"
BLOCK_ITEMS = 1000  # items of one task that all policies score before the next block


@dataclass
class EvalConfig:
    policies: list[str]
    tasks: list[str]
    opts: CacheOptions  # policy field ignored: each policy replaces it
    backend: str = "reference"
    prefill_chunk: int | None = None
    limit: int | None = None
    sample: int | None = None  # a fixed seeded sample of N items per task instead of the first ones
    sample_seed: int = 0
    ppl_window: int = 512
    data_dir: Path | None = None  # None: $KVEXPORT_DATA, the per-user cache, the hub (kvexport.data)
    progress: bool = True
    weights: str = "fp32"  # linear-layer format of the reference model (kvexport.models.weights)
    program: Path | None = None  # --backend executorch|onnx: the built program scored next to the reference
    batch_items: int = 1  # reference items per packed batch (kvexport.eval.batched); 1 = the cache path
    device: str = "cpu"  # where packed batches run


@dataclass
class PolicyRun:
    policy: str
    scorer: object
    key: str  # multiple-choice records
    ppl_key: str  # WikiText records
    describe: dict


def model_identity(loaded: LoadedModel) -> dict:
    return {"name": loaded.name, "identity": loaded.identity}


def prepare_policies(loaded: LoadedModel, cfg: EvalConfig, model) -> list[PolicyRun]:
    runs = []
    for policy in cfg.policies:
        scorer = make_scorer(
            "reference",
            loaded,
            with_policy(cfg.opts, policy),
            model=model,
            prefill_chunk=cfg.prefill_chunk,
            batch_items=cfg.batch_items,
            device=cfg.device,
        )
        runs.append(_policy_run(policy, scorer, loaded, cfg))
    if cfg.program is not None:  # the exported program of the (single) policy, scored on the same items
        from kvexport.eval.program_scorer import ProgramScorer

        scorer = ProgramScorer(cfg.program, cfg.backend, prefill_chunk=cfg.prefill_chunk)
        runs.append(_policy_run(f"{cfg.policies[0]}@{cfg.backend}", scorer, loaded, cfg))
    return runs


def _policy_run(label: str, scorer, loaded: LoadedModel, cfg: EvalConfig) -> PolicyRun:
    desc = scorer.describe()
    base = {"model": model_identity(loaded), "scorer": desc, "prompt": T.PROMPT_VERSION}
    if cfg.weights != "fp32":  # fp32 keys stay as they were before weight formats existed
        base["weights"] = cfg.weights
    ppl = {**base, "ppl_window": cfg.ppl_window, "reference": REFERENCE_POLICY, "text": "wikitext-heldout-half"}
    return PolicyRun(label, scorer, config_key(base), config_key(ppl), desc)


def tokenize_items(tokenizer, items: list[T.MCItem]) -> list[tuple[list[int], list[list[int]]]]:
    out = []
    for it in items:
        pairs = [encode_pair(tokenizer, it.context, c) for c in it.continuations()]
        ctx = pairs[0][0]
        out.append((ctx, [p[1] for p in pairs]))
    return out


def load_items(cfg: EvalConfig) -> tuple[dict[str, list[T.MCItem]], dict[str, int]]:
    """First ``limit`` items (or a seeded ``sample`` of N, in file order) of each multiple-choice task,
    and each task's full size."""
    items, totals = {}, {}
    for task in cfg.tasks:
        if task == "wikitext":
            continue
        try:
            all_items = T.load_task(task, cfg.data_dir)
        except (FileNotFoundError, ValueError) as err:
            raise KvxError(str(err)) from None
        totals[task] = len(all_items)
        if cfg.sample is not None and cfg.sample < len(all_items):
            pick = sorted(random.Random(cfg.sample_seed).sample(range(len(all_items)), cfg.sample))
            items[task] = [all_items[i] for i in pick]
        else:
            items[task] = all_items[: cfg.limit] if cfg.limit is not None else all_items
    return items, totals


def score_batch(scorer, pairs) -> list[tuple[list[float], dict, str]]:
    """(scores, kv_stats, path) per item: the scorer's batched ``score_many`` when it has one."""
    return scorer.score_many(pairs) if hasattr(scorer, "score_many") else score_each(scorer, pairs)


def run_mc(
    run: PolicyRun, task: str, items: list[T.MCItem], toks, store: RecordStore, cfg: EvalConfig, bar=None
) -> None:
    """Score the items of ``items`` that ``store`` lacks for ``run``; ``bar`` (tqdm) counts them."""
    max_ctx = cfg.opts.max_context
    todo = [(it, tk) for it, tk in zip(items, toks) if not store.has(run.key, task, it.idx)]
    for it, (ctx, conts) in todo:
        if len(ctx) + max(map(len, conts)) > max_ctx:
            raise KvxError(f"{task} item {it.idx} needs {len(ctx) + max(map(len, conts))} tokens; raise --max-context")
    size = max(getattr(run.scorer, "batch_items", 1), 1)
    if size > 1:  # similar lengths share a batch (less padding); records are keyed by item, order is free
        todo.sort(key=lambda x: len(x[1][0]) + sum(map(len, x[1][1])))
    if bar is not None and todo:
        bar.set_postfix_str(f"{task} {run.policy}")
    for b in range(0, len(todo), size):
        batch = todo[b : b + size]
        t0, c0 = time.perf_counter(), time.process_time()
        results = score_batch(run.scorer, [tk for _, tk in batch])
        dt, cpu = (time.perf_counter() - t0) / len(batch), (time.process_time() - c0) / len(batch)
        for (it, (ctx, conts)), (scores, stats, path) in zip(batch, results):
            m = choice_metrics(scores, it.choices, it.gold)
            store.append(
                {
                    "key": run.key,
                    "task": task,
                    "idx": it.idx,
                    "id": it.id,
                    "policy": run.policy,
                    "gold": it.gold,
                    "scores": [round(s, 6) for s in scores],
                    **m,
                    "n_ctx": len(ctx),
                    "n_cont": [len(c) for c in conts],
                    "avg_bits": stats["avg_bits"],
                    "kv_bytes_used": stats["kv_bytes_used"],
                    "kv_bytes_allocated": stats["kv_bytes_allocated"],
                    "tokens_cached": stats["tokens_cached"],
                    "class_histogram": stats["class_histogram"],
                    "path": path,
                    "device": cfg.device if path == "packed" else "cpu",
                    "seconds": round(dt, 4),
                    "cpu_seconds": round(cpu, 4),
                }
            )
        if bar is not None:
            bar.update(len(batch))


def wikitext_windows(cfg: EvalConfig, tokenizer) -> tuple[list[list[int]], int]:
    """The first ``limit`` windows of the held-out half, and how many windows the half has."""
    path = data_file("wikitext", cfg.data_dir)
    if cfg.ppl_window < 2 or cfg.ppl_window > cfg.opts.max_context:
        raise KvxError(f"--ppl-window {cfg.ppl_window} must lie in [2, --max-context {cfg.opts.max_context}]")
    all_windows = W.windows(W.heldout_ids(tokenizer, path), cfg.ppl_window)
    return (all_windows[: cfg.limit] if cfg.limit is not None else all_windows), len(all_windows)


def run_wikitext(
    runs: list[PolicyRun], wins: list[list[int]], store: RecordStore, cfg: EvalConfig, make_reference
) -> None:
    """Per window: FP16 reference log-probs once (``make_reference()`` builds its scorer unless
    ``fp16`` is one of the policies), then NLL and KL(reference || policy) of each pending policy."""
    ref_run = next((r for r in runs if r.policy == REFERENCE_POLICY), None)
    ref_scorer = ref_run.scorer if ref_run else None
    todo = [w for w in range(len(wins)) if any(not store.has(r.ppl_key, "wikitext", w) for r in runs)]
    bar = tqdm(
        total=len(wins),
        initial=len(wins) - len(todo),
        desc="wikitext",
        unit="window",
        disable=not cfg.progress,
        dynamic_ncols=True,
    )
    try:
        for w in todo:
            chunk = wins[w]
            if ref_scorer is None:  # built lazily: only when some policy still needs a window
                ref_scorer = make_reference()
            t0, c0 = time.perf_counter(), time.process_time()
            ref = ref_scorer.token_logprobs(chunk)
            ref_stats, ref_dt, ref_cpu = ref_scorer.kv_stats(), time.perf_counter() - t0, time.process_time() - c0
            for r in runs:
                if store.has(r.ppl_key, "wikitext", w):
                    continue
                t0, c0 = time.perf_counter(), time.process_time()
                if r.policy == REFERENCE_POLICY:
                    lp, stats, dt, cpu = ref, ref_stats, ref_dt, ref_cpu
                else:
                    lp = r.scorer.token_logprobs(chunk)
                    stats, dt, cpu = r.scorer.kv_stats(), time.perf_counter() - t0, time.process_time() - c0
                s = W.window_scores(lp, chunk, ref)
                store.append(
                    {
                        "key": r.ppl_key,
                        "task": "wikitext",
                        "idx": w,
                        "policy": r.policy,
                        **s,
                        "avg_bits": stats["avg_bits"],
                        "kv_bytes_used": stats["kv_bytes_used"],
                        "kv_bytes_allocated": stats["kv_bytes_allocated"],
                        "seconds": round(dt, 4),
                        "cpu_seconds": round(cpu, 4),
                    }
                )
            bar.update(1)
    finally:
        bar.close()


class Evaluation:
    """Policies x tasks of one configuration: ``prepare`` (load data, build scorers, compute keys),
    then ``execute`` (score what ``store`` lacks). ``runs``/``sizes`` feed the report, also after
    an interrupted ``execute``."""

    def __init__(self, loaded: LoadedModel, cfg: EvalConfig, model=None):
        self.loaded, self.cfg = loaded, cfg
        self.items, totals = load_items(cfg)
        self.sizes = {t: {"n_total": totals[t], "n": len(self.items[t])} for t in self.items}
        self.wins: list[list[int]] = []
        if "wikitext" in cfg.tasks:
            self.wins, total = wikitext_windows(cfg, loaded.tokenizer)
            self.sizes["wikitext"] = {"n_total": total, "n": len(self.wins)}
        self.model = model or quantize_weights(loaded.build(), cfg.weights)
        self.runs = prepare_policies(loaded, cfg, self.model)
        self.toks = {task: tokenize_items(loaded.tokenizer, its) for task, its in self.items.items()}

    def pending(self, store: RecordStore) -> dict[str, int]:
        """Items (windows for WikiText) still to score, per task, over all policies."""
        out = {}
        for task, its in self.items.items():
            out[task] = sum(not store.has(r.key, task, it.idx) for r in self.runs for it in its)
        if self.wins:
            out["wikitext"] = sum(
                not store.has(r.ppl_key, "wikitext", w) for r in self.runs for w in range(len(self.wins))
            )
        return out

    def execute(self, store: RecordStore) -> None:
        """Task by task, in blocks of ``BLOCK_ITEMS`` items that every policy scores in turn (an
        interrupted run leaves the policies compared on the same items); one progress bar with ETA."""
        mc = {t: n for t, n in self.pending(store).items() if t != "wikitext"}
        with tqdm(
            total=sum(mc.values()),
            desc="eval",
            unit="item",
            disable=not self.cfg.progress or not any(mc.values()),
            dynamic_ncols=True,
        ) as bar:
            for task in mc:
                items, toks = self.items[task], self.toks[task]
                for start in range(0, len(items), BLOCK_ITEMS):
                    for run in self.runs:
                        run_mc(
                            run,
                            task,
                            items[start : start + BLOCK_ITEMS],
                            toks[start : start + BLOCK_ITEMS],
                            store,
                            self.cfg,
                            bar,
                        )
        if self.wins:
            cfg = self.cfg
            run_wikitext(
                self.runs,
                self.wins,
                store,
                cfg,
                lambda: make_scorer(
                    "reference",
                    self.loaded,
                    with_policy(cfg.opts, REFERENCE_POLICY),
                    model=self.model,
                    prefill_chunk=cfg.prefill_chunk,
                    batch_items=cfg.batch_items,
                    device=cfg.device,
                ),
            )
