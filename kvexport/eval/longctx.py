"""Long-context evaluation (``kvexport eval --tasks longppl,passkey``): KV policies against FP16 on long windows.

``longppl``. The document stream (the WikiText-2 test articles joined, held-out half: the first half
calibrates the controllers; or ``--text-file``) is cut into non-overlapping windows of each context length
``c`` of ``--long-contexts``; ``--limit N`` keeps the first ``N x max(contexts)`` tokens, so every context
length scores the same tokens. Each window goes through a fresh cache sized to it (``max_context = c``) as
decoding would (:meth:`~kvexport.eval.scoring.ReferenceScorer.token_logprobs`: chunks, window, eviction,
quantization), and query position ``i`` of the window (predicting token ``i + 1`` from the ``i + 1`` before
it) gets, against the FP16 run of the same window (computed once per window): the NLL of the target, the
KL(FP16 || policy) of the next-token distributions and top-1 agreement. Records keep these per token, so the
report (:mod:`kvexport.eval.long_report`) bins them by position and pairs them across policies and context
lengths. KV statistics (``avg_bits``, bytes; sinks, window and scales counted) are read after the window.

``passkey``. The items of :mod:`kvexport.eval.passkey` at each (``--probe-contexts`` length, depth, trial),
scored like a multiple-choice item (:meth:`~kvexport.eval.scoring.ReferenceScorer.score`: the context
through the cache, the 10 candidate keys teacher-forced over it).

``fp16`` is always scored: it is the reference. On the CPU the cache path runs; the batched engine
(:mod:`kvexport.eval.batched`) only with ``--device cuda``, since its ``[T, T]`` masks and scores cost more
than they save on a CPU beyond ~1k tokens (and ~10 GB at 8k). One record per (policy, context, window) or
(policy, context, depth, trial) in the store of :mod:`kvexport.eval.records`: Ctrl-C, then rerun, resumes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from kvexport.data import data_file
from kvexport.errors import KvxError
from kvexport.eval import passkey as P
from kvexport.eval import wikitext as W
from kvexport.eval.records import RecordStore, config_key
from kvexport.eval.runner import REFERENCE_POLICY, model_identity, score_batch
from kvexport.eval.scoring import make_scorer
from kvexport.fsutil import sha256_file
from kvexport.models.loader import LoadedModel
from kvexport.models.weights import quantize_weights
from kvexport.session import CacheOptions

LONG_VERSION = "longppl-v1"  # bump when the per-token metrics change (part of the resume key)
KL_ROWS = 1024  # rows per KL slice (bounds the [rows, vocab] temporaries)


@dataclass
class LongConfig:
    policies: list[str]  # fp16 is added first when missing
    tasks: list[str]  # of kvexport.eval.tasks.LONG_TASKS
    opts: CacheOptions  # policy and max_context replaced per run
    contexts: list[int] = field(default_factory=lambda: [512, 2048, 8192])  # longppl window lengths
    probe_contexts: list[int] | None = None  # passkey context lengths (None: contexts)
    depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    trials: int = 5
    filler: str = "repeat"  # passkey filler: P.FILLERS
    text_file: Path | None = None  # None: WikiText-2 held-out half
    limit: int | None = None  # windows of the longest context (None: the whole text)
    data_dir: Path | None = None
    prefill_chunk: int | None = None
    weights: str = "fp32"
    batch_items: int = 1  # used off the CPU only
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self):
        if REFERENCE_POLICY not in self.policies:
            self.policies = [REFERENCE_POLICY, *self.policies]
        if self.probe_contexts is None:
            self.probe_contexts = list(self.contexts)


@dataclass
class LongRun:
    """One policy at one context length: its scorer and record keys."""

    policy: str
    context: int
    scorer: object
    key: str  # longppl records (idx = window)
    probe_keys: dict[float, str]  # passkey records per depth (idx = trial)


def check_text_file(path) -> Path:
    """``path`` as a :class:`Path`; :class:`KvxError` when it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise KvxError(f"--text-file {path} not found; give an existing UTF-8 text file")
    return path


def text_source(cfg: LongConfig, tokenizer) -> tuple[list[int], dict]:
    """Token ids of the document stream and its identity (part of the resume keys)."""
    if cfg.text_file is None:
        return W.heldout_ids(tokenizer, data_file("wikitext", cfg.data_dir)), {"text": "wikitext-heldout-half"}
    path = check_text_file(cfg.text_file)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KvxError(f"--text-file {path} is not UTF-8 text; convert it (e.g. iconv -t utf-8)") from None
    return W.encode_text(tokenizer, text), {"text_file": path.name, "sha256": sha256_file(path)}


@torch.no_grad()
def token_metrics(lp: torch.Tensor, ref: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per query position ``[T-1]``: NLL of ``targets [T-1]`` under ``lp [T-1, V]``, KL(ref || lp) of the
    next-token distributions, and whether both put the same token first (``lp is ref``: KL exactly 0)."""
    nll = -lp.gather(1, targets[:, None])[:, 0]
    kl = torch.cat([(r.exp() * (r - p)).sum(-1) for r, p in zip(ref.split(KL_ROWS), lp.split(KL_ROWS))])
    return {"nll": nll, "kl": kl, "top1": lp.argmax(-1) == ref.argmax(-1)}


def _logprobs(run: LongRun, ids: list[int]) -> tuple[torch.Tensor, tuple[float, float]]:
    """(log-probs ``[T-1, V]`` of ``ids`` through a fresh cache of ``run``, (wall, CPU) seconds)."""
    t0, c0 = time.perf_counter(), time.process_time()
    lp = run.scorer.token_logprobs(ids)
    return lp, (time.perf_counter() - t0, time.process_time() - c0)


def _stats_fields(stats: dict) -> dict:
    keep = ("avg_bits", "kv_bytes_used", "kv_bytes_allocated", "class_histogram", "tokens_cached")
    return {k: stats[k] for k in keep}


class LongEvaluation:
    """Policies x context lengths of one configuration: data, scorers and keys at construction (also for
    ``--report-only``), ``execute(store)`` scores what the store lacks."""

    def __init__(self, loaded: LoadedModel, cfg: LongConfig, model=None):
        self.loaded, self.cfg = loaded, cfg
        limit = loaded.args.max_position
        for task, option, lengths in (("longppl", "--long-contexts", cfg.contexts),
                                      ("passkey", "--probe-contexts", cfg.probe_contexts)):
            if task in cfg.tasks and max(lengths) > limit:
                raise KvxError(f"{option} {max(lengths)} exceeds the model's {limit} positions; use at most {limit}")
        self.ids, self.text = [], {}
        if "longppl" in cfg.tasks or ("passkey" in cfg.tasks and cfg.filler == "text"):
            self.ids, self.text = text_source(cfg, loaded.tokenizer)
        self.windows: dict[int, list[list[int]]] = {}
        if "longppl" in cfg.tasks:
            longest = max(cfg.contexts)
            if len(self.ids) < longest:
                raise KvxError(f"the text has {len(self.ids):,} tokens, fewer than the {longest:,}-token context; "
                               "give a longer --text-file or shorter --long-contexts")
            stretch = self.ids[: cfg.limit * longest] if cfg.limit is not None else self.ids
            self.windows = {c: W.windows(stretch, c) for c in cfg.contexts}
        self.items: dict[int, list[P.ProbeItem]] = {}  # per probe context: trial-major, then depth
        if "passkey" in cfg.tasks:
            for n in cfg.probe_contexts:
                try:
                    self.items[n] = [P.probe_item(loaded.tokenizer, n, d, t, cfg.opts.seed, cfg.filler, self.ids)
                                     for t in range(cfg.trials) for d in cfg.depths]
                except ValueError as err:
                    raise KvxError(f"--probe-contexts {n}: {err}") from None
        self.model = model or quantize_weights(loaded.build(), cfg.weights)
        self.runs = {(p, c): self._run(p, c) for c in sorted({*self.windows, *self.items}) for p in cfg.policies}

    def _run(self, policy: str, context: int) -> LongRun:
        cfg = self.cfg
        on_cpu = cfg.device == "cpu"
        scorer = make_scorer(
            "reference",
            self.loaded,
            replace(cfg.opts, policy=policy, max_context=context),
            model=self.model,
            prefill_chunk=cfg.prefill_chunk,
            batch_items=1 if on_cpu else cfg.batch_items,
            device=cfg.device,
        )
        base = {"model": model_identity(self.loaded), "scorer": scorer.describe()}
        if cfg.weights != "fp32":
            base["weights"] = cfg.weights
        key = config_key({**base, "task": "longppl", "version": LONG_VERSION, "reference": REFERENCE_POLICY,
                          "text": self.text})
        probe = {**base, "task": "passkey", "probe": P.PROBE_VERSION, "filler": cfg.filler, "seed": cfg.opts.seed}
        if cfg.filler == "text":
            probe["text"] = self.text
        return LongRun(policy, context, scorer, key, {d: config_key({**probe, "depth": d}) for d in cfg.depths})

    def context_runs(self, context: int) -> list[LongRun]:
        """The runs of one context length, the reference first."""
        runs = [self.runs[(p, context)] for p in self.cfg.policies]
        return sorted(runs, key=lambda r: r.policy != REFERENCE_POLICY)

    def pending(self, store: RecordStore) -> dict[str, int]:
        """Records still to write, per task, over all policies."""
        out = {}
        if self.windows:
            out["longppl"] = sum(not store.has(r.key, "longppl", w) for c, wins in self.windows.items()
                                 for r in self.context_runs(c) for w in range(len(wins)))
        if self.items:
            out["passkey"] = sum(not store.has(r.probe_keys[it.depth], "passkey", it.trial)
                                 for n, its in self.items.items() for r in self.context_runs(n) for it in its)
        return out

    def execute(self, store: RecordStore) -> None:
        if self.windows:
            self._longppl(store)
        if self.items:
            self._passkey(store)

    def _bar(self, desc: str, unit: str, total: int, done: int):
        return tqdm(total=total, initial=done, desc=desc, unit=unit, disable=not self.cfg.progress,
                    dynamic_ncols=True)

    def _longppl(self, store: RecordStore) -> None:
        """Per context, per window: the FP16 log-probs once, then every pending policy against them."""
        todo = [(c, w) for c, wins in self.windows.items() for w in range(len(wins))
                if any(not store.has(r.key, "longppl", w) for r in self.context_runs(c))]
        total = sum(map(len, self.windows.values()))
        with self._bar("longppl", "window", total, total - len(todo)) as bar:
            for c, w in todo:
                chunk = self.windows[c][w]
                targets = torch.tensor(chunk[1:])
                ref_run, *others = self.context_runs(c)
                bar.set_postfix_str(f"{c} {ref_run.policy}")
                ref, ref_time = _logprobs(ref_run, chunk)  # needed for the KL of every policy
                for r in (ref_run, *others):
                    if store.has(r.key, "longppl", w):
                        continue
                    bar.set_postfix_str(f"{c} {r.policy}")
                    lp, (dt, cpu) = (ref, ref_time) if r is ref_run else _logprobs(r, chunk)
                    m = token_metrics(lp, ref, targets)
                    del lp
                    store.append({
                        "key": r.key,
                        "task": "longppl",
                        "idx": w,
                        "policy": r.policy,
                        "context": c,
                        "start": w * c,
                        "nll": [round(x, 5) for x in m["nll"].tolist()],
                        "kl": [float(f"{x:.4g}") for x in m["kl"].tolist()],
                        "top1": [int(x) for x in m["top1"].tolist()],
                        **_stats_fields(r.scorer.kv_stats()),
                        "seconds": round(dt, 3),
                        "cpu_seconds": round(cpu, 3),
                    })
                bar.update(1)

    def _passkey(self, store: RecordStore) -> None:
        """Per context, trial and depth: every pending policy scores the item's 10 candidates."""
        todo = [(n, it) for n, its in self.items.items() for it in its
                if any(not store.has(r.probe_keys[it.depth], "passkey", it.trial) for r in self.context_runs(n))]
        total = sum(map(len, self.items.values()))
        with self._bar("passkey", "item", total, total - len(todo)) as bar:
            for n, it in todo:
                for r in self.context_runs(n):
                    key = r.probe_keys[it.depth]
                    if store.has(key, "passkey", it.trial):
                        continue
                    bar.set_postfix_str(f"{n} depth {it.depth:g} {r.policy}")
                    t0, c0 = time.perf_counter(), time.process_time()
                    [(scores, stats, path)] = score_batch(r.scorer, [(it.context, it.continuations)])
                    store.append({
                        "key": key,
                        "task": "passkey",
                        "idx": it.trial,
                        "policy": r.policy,
                        "context": n,
                        "depth": it.depth,
                        "passkey": it.key,
                        "distractors": list(it.distractors),
                        "needle_at": it.needle_at,
                        "n_ctx": len(it.context),
                        "scores": [round(s, 5) for s in scores],
                        **P.item_scores(scores),
                        **_stats_fields(stats),
                        "path": path,
                        "seconds": round(time.perf_counter() - t0, 3),
                        "cpu_seconds": round(time.process_time() - c0, 3),
                    })
                bar.update(1)
