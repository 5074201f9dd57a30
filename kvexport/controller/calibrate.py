"""``kvexport calibrate``: measure labels on calibration text, train the controller for a bit budget,
evaluate it on held-out text against static / random / rule at equal bits.

Pipeline (all intermediate results cached, so an interrupted run resumes):

1. calibration half of the corpus (first half of WikiText-2 raw test by lines), ``--windows``
   windows of ``--window-tokens`` tokens;
2. per window: the features the cache computes at eviction (a recording wrapper around the fp16
   policy) and the attributed KL per token and class (:mod:`kvexport.controller.labels`);
3. train + bias-calibrate the controller for ``--kv-budget-bits`` (:mod:`kvexport.controller.train`);
   write ``controller-<B>.safetensors`` (atomically);
4. held-out half: perplexity and KL vs fp16 over ``--eval-windows`` windows of ``--eval-tokens``
   tokens, for learned, ``random:B``, ``static-2``, ``static-4``, ``rule``; write ``report-<B>.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from kvexport.data import data_file
from kvexport.errors import KvxError
from kvexport.kv import quant

CACHE_VERSION = 1
BASELINES = ("static-2", "static-4", "rule")
_REFERENCE: dict[str, tuple[list, dict]] = {}  # fp16 reference log-probs per evaluation key (in-process memo)


def tokenize_blocks(tokenizer, text: str, n_tokens: int, block_lines: int = 200) -> list[int]:
    """The first ``n_tokens`` tokens of ``text``, tokenized in blocks of lines (as the eval does)."""
    lines = text.splitlines(keepends=True)
    ids: list[int] = []
    for start in range(0, len(lines), block_lines):
        ids += tokenizer.encode("".join(lines[start : start + block_lines]))
        if len(ids) >= n_tokens:
            break
    return ids[:n_tokens]


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    tmp.replace(path)


def _atomic_json(doc: dict, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Calibrator:
    """Holds the model, data and caches of one calibrate run (also used by the ablation script)."""

    def __init__(
        self,
        loaded,
        *,
        corpus: Path,
        cache_dir: Path,
        windows: int,
        window_tokens: int,
        horizon: int,
        sinks: int = 4,
        window: int = 32,
        max_context: int = 2048,
        group: int | None = None,
        steps: dict | None = None,
        progress: bool = True,
    ):
        from kvexport.controller.token_counts import wikitext_halves
        from kvexport.session import CacheOptions

        self.loaded = loaded
        self.model = loaded.build()
        self.sinks, self.window, self.max_context = sinks, window, max_context
        self.group = group or loaded.args.head_dim
        self.windows, self.window_tokens, self.horizon = windows, window_tokens, horizon
        self.steps = steps or {2: 2, 4: 1, 8: 1}
        default = CacheOptions()  # labels measure the quantizer the cache runs by default
        self.clip = quant.parse_clip(default.clip)
        self.rotate = quant.rotation_mask(default.rotate_keys, default.rotate_values)
        self.progress = progress
        if not corpus.is_file():
            raise KvxError(f"corpus not found: {corpus}; pass --corpus PATH to a WikiText raw file")
        self.corpus = corpus
        self.cal_text, self.held_text = wikitext_halves(corpus)
        corpus_id = hashlib.sha256(corpus.read_bytes()).hexdigest()[:16]
        self.data_key = _key(
            CACHE_VERSION, loaded.name, corpus_id, window_tokens, sinks, window, self.group, self.steps, self.clip,
            self.rotate,
        )
        self.cache_dir = cache_dir / loaded.name / self.data_key
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.corpus_id = corpus_id

    # ------------------------------------------------------------------ calibration data
    def calibration_ids(self) -> list[list[int]]:
        need = self.windows * self.window_tokens
        ids = tokenize_blocks(self.loaded.tokenizer, self.cal_text, need)
        if len(ids) < need:
            raise KvxError(
                f"the calibration half has {len(ids)} tokens, fewer than {self.windows} x {self.window_tokens}"
            )
        return [ids[i * self.window_tokens : (i + 1) * self.window_tokens] for i in range(self.windows)]

    def window_data(self, k: int, ids: list[int]) -> dict:
        """Features + attributions of calibration window ``k`` (cached on disk)."""
        from kvexport.controller import labels as L
        from kvexport.controller.features import record_features
        from kvexport.session import CacheOptions, Session

        path = self.cache_dir / f"window{k:03d}.pt"
        if path.is_file():
            d = torch.load(path)
            if d.get("ids") == ids:
                return d
        sess = Session(
            self.loaded,
            CacheOptions(
                policy="fp16",
                max_context=max(self.max_context, len(ids)),
                sinks=self.sinks,
                window=self.window,
                group=self.group,
            ),
            model=self.model,
        )
        pos, feats, _ = record_features(sess, ids)
        tokens = torch.tensor(ids)
        out = L.attribute(
            self.model,
            tokens,
            sinks=self.sinks,
            window=self.window,
            chunk=sess.max_chunk,
            group=self.group,
            steps=self.steps,
            rotate=self.rotate,
            clip=self.clip,
        )
        d = {"ids": ids, "pos": pos, "feats": feats, "attr": out["attr"], "chunk": sess.max_chunk}
        if k == 0:  # validation against directly measured KL (class 2), once
            d["validation"] = self._validate(tokens, out, sess.max_chunk)
        _atomic_save(d, path)
        return d

    def _validate(self, tokens: torch.Tensor, out: dict, chunk: int) -> dict:
        """Measured summed KL when quantizing (at 2 bits) only the half of the tokens the attribution
        calls cheapest, a random half, the dearest half, and all tokens; vs the attribution's sums."""
        from kvexport.controller import labels as L

        kw = dict(sinks=self.sinks, window=self.window, chunk=chunk, group=self.group, ref=out["ref"],
                  rotate=self.rotate, clip=self.clip)
        T = tokens.shape[0]
        a2 = out["attr"][:, 0]
        cand = torch.arange(self.sinks, T)
        order = cand[torch.argsort(a2[cand])]
        half = len(order) // 2
        g = torch.Generator().manual_seed(0)
        subsets = {
            "cheapest_half": order[:half],
            "random_half": cand[torch.randperm(len(cand), generator=g)[:half]],
            "dearest_half": order[half:],
            "all": cand,
        }
        res = {}
        for name, idx in subsets.items():
            gate = torch.zeros(T)
            gate[idx] = 1.0
            res[name] = {
                "measured_kl_sum": L.measured_kl(self.model, tokens, {2: gate}, **kw),
                "attributed_kl_sum": float(a2[idx].sum()),
                "tokens": int(len(idx)),
            }
        res["positions"] = T
        return res

    def dataset(self) -> dict:
        """Stacked training set: features ``x``, costs ``cost [N, 4]``, window index, validation."""
        from kvexport.controller.labels import class_costs

        xs, cs, ws = [], [], []
        validation = None
        for k, ids in enumerate(tqdm(self.calibration_ids(), desc="labels", disable=not self.progress)):
            d = self.window_data(k, ids)
            validation = d.get("validation", validation)
            keep = d["pos"] < len(ids) - self.horizon
            pos = d["pos"][keep]
            xs.append(d["feats"][keep])
            cs.append(class_costs(d["attr"][pos]))
            ws.append(torch.full((len(pos),), k))
        return {"x": torch.cat(xs), "cost": torch.cat(cs), "window": torch.cat(ws), "validation": validation}

    # ------------------------------------------------------------------ held-out evaluation
    def heldout_ids(self, n_windows: int, n_tokens: int) -> list[list[int]]:
        ids = tokenize_blocks(self.loaded.tokenizer, self.held_text, n_windows * n_tokens)
        if len(ids) < n_windows * n_tokens:
            raise KvxError(f"the held-out half has {len(ids)} tokens, fewer than {n_windows} x {n_tokens}")
        return [ids[i * n_tokens : (i + 1) * n_tokens] for i in range(n_windows)]

    def evaluate(self, policies: dict[str, str], n_windows: int, n_tokens: int, budget_bits: float | None) -> dict:
        """Held-out perplexity / KL vs fp16 for each ``{name: policy spec}`` (results cached by spec
        and, for learned controllers, file hash)."""
        from kvexport.controller.model import file_sha256
        from kvexport.eval.wikitext import perplexity
        from kvexport.session import CacheOptions, Session

        windows = self.heldout_ids(n_windows, n_tokens)
        ekey = _key(self.data_key, n_windows, n_tokens, [len(w) for w in windows], windows[0][:16])
        path = self.cache_dir / f"eval-{ekey}.json"
        done = json.loads(path.read_text()) if path.is_file() else {}
        results, ref = {}, None
        for name, spec in policies.items():
            ident = spec
            if spec.startswith("learned:"):
                ident = "learned:" + file_sha256(Path(spec.split(":", 1)[1]))
            if ident in done:
                results[name] = done[ident]
                continue
            opts = dict(max_context=n_tokens, sinks=self.sinks, window=self.window, group=self.group)
            if ref is None and ekey in _REFERENCE:
                ref, done["fp16"] = _REFERENCE[ekey]
                results.setdefault("fp16", done["fp16"])
            if ref is None:
                ref_sess = Session(self.loaded, CacheOptions(policy="fp16", **opts), model=self.model)
                ref_res = [perplexity(ref_sess, w, n_tokens, progress=self.progress) for w in windows]
                ref = [r["logprobs"][0] for r in ref_res]
                fp = _merge([{k: v for k, v in r.items() if k != "logprobs"} for r in ref_res])
                fp["kl"] = 0.0
                done["fp16"] = results["fp16"] = fp
                _REFERENCE.clear()
                _REFERENCE[ekey] = (ref, fp)
            if name == "fp16":
                continue
            sess = Session(self.loaded, CacheOptions(policy=spec, budget_bits=budget_bits, **opts), model=self.model)
            t0 = time.perf_counter()
            rs = []
            for w, r in zip(windows, ref):
                res = perplexity(sess, w, n_tokens, reference=[r], progress=self.progress)
                res.pop("logprobs")
                rs.append(res)
            m = _merge(rs)
            m["seconds"] = round(time.perf_counter() - t0, 1)
            m["policy"] = spec
            done[ident] = results[name] = m
            _atomic_json(done, path)
        if "fp16" in policies and "fp16" not in results:
            results["fp16"] = done["fp16"]
        return results


def _merge(rs: list[dict]) -> dict:
    """Token-weighted means over windows; KV stats as the mean over windows (each at full context)."""
    n = sum(r["tokens"] for r in rs)
    nll = sum(r["nll"] * r["tokens"] for r in rs) / n
    out = {
        "tokens": n,
        "nll": nll,
        "ppl": math.exp(nll),
        "windows": len(rs),
        "avg_bits": sum(r["avg_bits"] for r in rs) / len(rs),
        "avg_bits_per_window": [r["avg_bits"] for r in rs],
        "kv_bytes_used": rs[-1]["kv_bytes_used"],
        "kv_bytes_allocated": rs[-1]["kv_bytes_allocated"],
    }
    hist = {}
    for r in rs:
        for c, v in r["class_histogram"].items():
            hist[c] = hist.get(c, 0) + v
    out["class_histogram"] = hist
    if rs[0].get("kl") is not None:
        out["kl"] = sum(r["kl"] * r["tokens"] for r in rs) / n
    return out


def run(args: argparse.Namespace) -> int:
    from kvexport.controller.train import TrainConfig, pooled_target, train_controller
    from kvexport.kv.policy import FEATURES
    from kvexport.models.loader import resolve
    from kvexport.models.registry import DEFAULT_MODEL
    from kvexport.session import calibration_dir, rarity_table

    torch.set_num_threads(max(1, min(int(os.environ.get("KVEXPORT_THREADS", "1")), os.cpu_count() or 1)))
    t_start = time.perf_counter()
    budget = float(args.kv_budget_bits)
    loaded = resolve(args.model or DEFAULT_MODEL)
    sinks, window, max_context = 4, 32, args.eval_tokens
    pool_share = (max_context - sinks - window) / max_context
    lo = 2.5 * pool_share + 16 * (1 - pool_share)
    if not lo <= budget <= 16:
        raise KvxError(f"--kv-budget-bits {budget:g} is outside [{lo:.2f}, 16] for a {max_context}-token cache")
    if args.windows < 1 or args.window_tokens <= args.horizon + window or args.eval_windows < 1:
        raise KvxError("need --windows >= 1, --window-tokens > --horizon + 32 and --eval-windows >= 1")
    if rarity_table(loaded.name, loaded.args.vocab_size) is None:
        raise KvxError(
            f"no token-count table for {loaded.name}; run 'kvexport count-tokens --model {loaded.name}' first"
        )
    drop = None
    if args.drop_feature is not None:
        if args.drop_feature not in FEATURES:
            raise KvxError(f"--drop-feature must be one of {', '.join(FEATURES)}")
        drop = FEATURES.index(args.drop_feature)
    out_dir = Path(args.out) if args.out else calibration_dir() / loaded.name.removesuffix("-random")
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir) if args.cache_dir else Path.home() / ".cache" / "kvexport" / "calibrate"
    corpus = Path(args.corpus) if args.corpus else data_file("wikitext", args.data_dir)

    cal = Calibrator(
        loaded,
        corpus=corpus,
        cache_dir=cache_dir,
        windows=args.windows,
        window_tokens=args.window_tokens,
        horizon=args.horizon,
        sinks=sinks,
        window=window,
        max_context=max_context,
    )
    data = cal.dataset()
    t_labels = time.perf_counter() - t_start
    target = pooled_target(budget, max_context, sinks, window)
    cfg = TrainConfig(
        hidden=args.hidden, alpha=args.alpha, gamma=args.gamma, beta=args.beta, seed=args.seed, drop_feature=drop
    )
    meta = {
        "model": loaded.name,
        "budget_bits": budget,
        "group": cal.group,
        "sinks": sinks,
        "window": window,
        "max_context": max_context,
        "data": {
            "corpus": corpus.name,
            "corpus_sha256_16": cal.corpus_id,
            "half": "first (calibration)",
            "windows": args.windows,
            "window_tokens": args.window_tokens,
            "horizon": args.horizon,
            "label_tokens": int(data["x"].shape[0]),
        },
        "labels": {
            "method": "integrated-gradients attribution of measured KL(fp16 || gated quantized) summed "
            "over positions; label = cheapest class with attributed KL <= threshold",
            "ig_steps": {str(k): v for k, v in cal.steps.items()},
        },
    }
    ctrl, summary = train_controller(data["x"], data["cost"], target_bits=target, group=cal.group, cfg=cfg, meta=meta)
    suffix = f"-no-{args.drop_feature}" if drop is not None else ""
    ctrl_path = out_dir / f"controller-{budget:g}{suffix}.safetensors"
    ctrl.save(ctrl_path)
    t_train = time.perf_counter() - t_start - t_labels
    print(
        f"wrote {ctrl_path} ({ctrl.n_params()} parameters; calibration shares "
        f"{', '.join(f'{c}b {f:.3f}' for c, f in zip(ctrl.meta['classes'], ctrl.meta['fractions']))})"
    )

    report = {
        "model": loaded.name,
        "budget_bits": budget,
        "controller": ctrl_path.name,
        "parameters": ctrl.n_params(),
        "hidden": args.hidden,
        "loss_weights": ctrl.meta["loss"],
        "calibration": summary,
        "label_validation": data["validation"],
        "class_histogram_calibration": dict(zip(map(str, ctrl.meta["classes"]), summary["fractions"])),
    }
    if not args.no_eval:
        policies = {"fp16": "fp16", "learned": f"learned:{ctrl_path}", f"random:{budget:g}": f"random:{budget:g}"}
        if drop is None:
            policies.update({b: b for b in BASELINES})
        report["heldout"] = cal.evaluate(policies, args.eval_windows, args.eval_tokens, budget)
        report["heldout_setup"] = {
            "windows": args.eval_windows,
            "tokens_per_window": args.eval_tokens,
            "text": "second half of the corpus (held out)",
            "kl": "KL(fp16 || policy), nats/token",
        }
        got = report["heldout"]["learned"]["avg_bits"]
        report["budget_check"] = {"target": budget, "learned_avg_bits": got, "within_0.15": abs(got - budget) <= 0.15}
        for name, r in report["heldout"].items():
            print(f"  {name:>10}: ppl {r['ppl']:.3f}  KL {r.get('kl', 0):.4f}  avg bits {r['avg_bits']:.3f}")
    report["runtime_s"] = {
        "labels": round(t_labels, 1),
        "train": round(t_train, 1),
        "total": round(time.perf_counter() - t_start, 1),
    }
    rep_path = out_dir / f"report-{budget:g}{suffix}.json"
    _atomic_json(report, rep_path)
    print(f"wrote {rep_path} ({report['runtime_s']['total']:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from kvexport.controller.cli import add_arguments

    p = argparse.ArgumentParser(prog="kvexport calibrate")
    add_arguments(p)
    try:
        return run(p.parse_args(argv))
    except KvxError as err:
        print(f"error: {err}")
        return err.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
