"""``kvexport eval``: benchmark KV policies on HellaSwag, ARC, OpenBookQA and WikiText-2.

    kvexport eval --model smollm2-135m-instruct \\
        --tasks hellaswag,arc_challenge,arc_easy,openbookqa,wikitext \\
        --kv-policy 'fp16,static-8,static-4,static-2,random:4,rule,learned:FILE' \\
        [--limit N] [--seed S] [--kv-window W --kv-sinks S ...] [--backend reference] [--out results/eval]

``--kv-policy`` takes a list: separated by ``;`` when one is present, otherwise by ``,`` with the
numbers after a ``random:`` joined back to it (``fp16,random:0.5,0.5,0,0,static-4`` is three
policies). ``--limit N`` scores the first N items of each task (N windows for WikiText).

Results go to ``--out``: ``items.jsonl`` (one record per item; rerunning the same command skips
what is recorded, so Ctrl-C then rerun resumes), ``summary.json``, ``table.md``, ``acc_vs_bits.png``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from kvexport import validate
from kvexport.errors import KvxError
from kvexport.eval.tasks import ALL_TASKS, MC_TASKS
from kvexport.options import POLICY_GRAMMAR, add_cache_args, add_data_args, add_model_args

DEFAULT_POLICIES = "fp16,static-8,static-4,static-2"
DEFAULT_OUT = "results/eval"
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def split_policies(text: str) -> list[str]:
    """A ``--kv-policy`` list -> policy specs (validated, duplicates dropped, order kept)."""
    from kvexport.kv.policy import parse_policy

    if ";" in text:
        parts = [p.strip() for p in text.split(";")]
    else:
        parts = []
        for tok in (t.strip() for t in text.split(",")):
            if parts and parts[-1].startswith("random:") and _NUMBER.fullmatch(tok):
                parts[-1] += "," + tok
            else:
                parts.append(tok)
    out = []
    for p in parts:
        if not p:
            raise KvxError(f"empty policy in --kv-policy '{text}'")
        try:
            parse_policy(p)
        except ValueError as err:
            raise KvxError(str(err)) from None
        if p not in out:
            out.append(p)
    return out


def split_tasks(text: str) -> list[str]:
    tasks = []
    for t in (t.strip() for t in text.split(",")):
        names = ALL_TASKS if t == "all" else (t,)
        for n in names:
            if n not in ALL_TASKS:
                raise KvxError(f"unknown task '{n}'; use {', '.join(ALL_TASKS)} or all")
            if n not in tasks:
                tasks.append(n)
    if not tasks:
        raise KvxError("no task given; use --tasks " + ",".join(ALL_TASKS))
    return tasks


def add_arguments(p: argparse.ArgumentParser) -> None:
    from kvexport.eval.scoring import BACKENDS
    from kvexport.models.weights import TORCHAO_FORMATS

    add_model_args(p)
    # a list: split_policies parses each spec before the model loads
    add_cache_args(
        p,
        default_policy=DEFAULT_POLICIES,
        policy_type=None,
        policy_help="policies to compare, "
        f"comma-separated (or ';'-separated): {POLICY_GRAMMAR} (default {DEFAULT_POLICIES})",
    )
    p.add_argument("--tasks", default=",".join(MC_TASKS), help=f"comma-separated: {', '.join(ALL_TASKS)}, or all")
    p.add_argument(
        "--limit", type=validate.positive_int, default=None, help="first N items per task (N windows for wikitext)"
    )
    p.add_argument(
        "--sample",
        type=validate.positive_int,
        default=None,
        help="a fixed random sample of N items per multiple-choice task (drawn with --seed), instead of the first N",
    )
    p.add_argument(
        "--weights",
        default="fp32",
        choices=TORCHAO_FORMATS,
        help="linear-layer format of the reference model (as kvexport build --target executorch)",
    )
    p.add_argument(
        "--program",
        default=None,
        help="with --backend executorch|onnx: graphs/<name>; scored beside the reference with its policy",
    )
    p.add_argument(
        "--backend",
        default="reference",
        help=f"scorer backend: {', '.join(BACKENDS)} (executorch|onnx score --program beside the reference)",
    )
    p.add_argument(
        "--prefill-chunk",
        type=validate.positive_int,
        default=None,
        help="tokens per step when feeding contexts (default: the window; 1 when --kv-window 0)",
    )
    p.add_argument(
        "--ppl-window",
        type=validate.positive_int,
        default=512,
        help="WikiText window in tokens (each from an empty cache)",
    )
    p.add_argument(
        "--out",
        default=DEFAULT_OUT,
        type=validate.output_dir,
        help="results folder (items.jsonl, summary.json, table.md, acc_vs_bits.png)",
    )
    add_data_args(p)
    p.add_argument("--n-boot", type=validate.positive_int, default=10_000, help="bootstrap resamples for the CIs")
    p.add_argument("--threads", type=validate.positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--batch-items",
        type=validate.positive_int,
        default=16,
        help="reference backend: items per packed batch (same scores as the cache path, faster; 1 = cache path)",
    )
    p.add_argument("--device", default="cpu", help="reference backend: where packed batches run (cpu, cuda)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="score nothing: write summary/table/plot from the records already there",
    )
    p.add_argument(
        "--records",
        default=None,
        type=validate.output_file,
        help="records file (default: OUT/items.jsonl; a .gz is read, not appended to: use with --report-only)",
    )


def _settings(args, evaluation) -> dict:
    opts = evaluation.cfg.opts
    first = evaluation.runs[0].describe if evaluation.runs else {}
    return {
        "backend": args.backend,
        "weights": args.weights,
        "window": opts.window,
        "sinks": opts.sinks,
        "group": opts.group or evaluation.loaded.args.head_dim,
        "rotate_keys": opts.rotate_keys,
        "max_context": opts.max_context,
        "seed": opts.seed,
        "budget_bits": opts.budget_bits,
        "prefill_chunk": first.get("prefill_chunk"),
        "limit": args.limit,
        "sample": args.sample,
        "ppl_window": args.ppl_window,
        "random_weights": bool(evaluation.loaded.identity.get("random_weights")),
        "policies": evaluation.cfg.policies,
        "tasks": evaluation.cfg.tasks,
    }


def program_setup(program: str, backend: str):
    """(model, cache options, [policy], weights) of a built program, for the reference run beside it."""
    from kvexport.eval.scoring import BACKEND_TARGETS
    from kvexport.export.build import loaded_for_manifest, read_manifest
    from kvexport.session import CacheOptions

    manifest = read_manifest(Path(program))
    if manifest["target"] not in BACKEND_TARGETS[backend]:
        raise KvxError(
            f"{program} is a {manifest['target']} program; use --backend "
            f"{next(b for b, t in BACKEND_TARGETS.items() if manifest['target'] in t)}"
        )
    weights = manifest["weights"] if manifest["target"] == "executorch" else "fp32"
    opts = CacheOptions(**manifest["cache_options"])
    return loaded_for_manifest(manifest), opts, [opts.policy], weights


def run(args: argparse.Namespace) -> int:
    import torch

    from kvexport.data import data_file
    from kvexport.eval.records import RecordStore
    from kvexport.eval.report import summarize, write_reports
    from kvexport.eval.runner import EvalConfig, Evaluation
    from kvexport.eval.scoring import check_backend
    from kvexport.options import cache_options, load_model

    policies = split_policies(args.kv_policy)
    tasks = split_tasks(args.tasks)
    check_backend(args.backend, args.program)
    if args.sample is not None and args.limit is not None:
        raise KvxError("--sample takes a positive N and replaces --limit; give one of them")
    if args.device != "cpu" and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        raise KvxError(f"--device {args.device} is not available here; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
        if args.backend == "executorch":
            from kvexport.bench import set_threads

            set_threads(args.threads)  # ExecuTorch's own pool too
    if not args.report_only:  # missing data: one line now, not after the model has loaded
        for task in tasks:
            data_file(task, args.data_dir)
    opts, weights = cache_options(args), args.weights
    if args.program:  # the program fixes model, policy, cache and weights: the reference follows it
        loaded, opts, policies, weights = program_setup(args.program, args.backend)
    else:
        loaded = load_model(args)
    cfg = EvalConfig(
        policies=policies,
        tasks=tasks,
        opts=opts,
        backend=args.backend,
        prefill_chunk=args.prefill_chunk,
        limit=args.limit,
        sample=args.sample,
        sample_seed=args.seed,
        ppl_window=args.ppl_window,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        progress=not args.no_progress,
        weights=weights,
        program=Path(args.program) if args.program else None,
        batch_items=args.batch_items,
        device=args.device,
    )
    evaluation = Evaluation(loaded, cfg)
    out = Path(args.out)
    records = Path(args.records) if args.records else out / "items.jsonl"
    if records.suffix == ".gz" and not args.report_only:
        raise KvxError(f"--records {records} is compressed: it can only be read (--report-only)")
    store = RecordStore(records)
    pending = evaluation.pending(store)
    todo = ", ".join(f"{t} {n}" for t, n in pending.items())
    print(
        f"[eval {loaded.name}: {len(evaluation.runs)} runs (policies{' + program' if args.program else ''}) "
        f"x {len(tasks)} tasks; to score: {todo}; records in {store.path}]",
        file=sys.stderr,
    )
    if store.bad_lines:
        print(f"[skipped {store.bad_lines} unreadable line(s) in {store.path}]", file=sys.stderr)

    def report() -> dict:
        summary = summarize(evaluation, store, n_boot=args.n_boot, seed=args.seed, settings=_settings(args, evaluation))
        return write_reports(summary, out)

    try:
        if not args.report_only:
            evaluation.execute(store)
    except KeyboardInterrupt:
        store.close()
        report()
        print(
            f"\n[interrupted: {len(store.records)} records kept in {store.path}; rerun the same command to resume]",
            file=sys.stderr,
        )
        raise
    finally:
        store.close()
    paths = report()
    sys.stdout.write(paths["markdown"].read_text())
    print(f"[wrote {', '.join(str(p) for p in paths.values() if p.exists())}]", file=sys.stderr)
    return 0
