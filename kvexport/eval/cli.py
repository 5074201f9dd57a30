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

Long context (:mod:`kvexport.eval.longctx`, reference backend; fp16 is always scored, the cache is sized
to each context and ``--max-context`` is not used)::

    kvexport eval --tasks longppl,passkey --kv-policy fp16,static-4,static-2 \\
        [--long-contexts 512,2048,8192] [--limit N] [--text-file PATH] \\
        [--probe-contexts 2048] [--probe-depths 0.1,0.5,0.9] [--probe-trials 5] [--probe-filler repeat|text]

``longppl``: KL(fp16 || policy), perplexity, top-1 agreement, ΔNLL by query position and effective bits
per context length on WikiText-2's held-out half (or ``--text-file``); ``--limit N`` scores the first
``N`` windows of the longest context, the same tokens at every length. ``passkey``: the retrieval probe
of :mod:`kvexport.eval.passkey`. Both write ``long_summary.json``, ``long_table.md``, ``longppl.png``
and ``passkey.png`` (:mod:`kvexport.eval.long_report`).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from kvexport import validate
from kvexport.errors import KvxError
from kvexport.eval.passkey import FILLERS
from kvexport.eval.tasks import ALL_TASKS, LONG_TASKS, MC_TASKS
from kvexport.models.formats import REFERENCE_FORMATS
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
    """A ``--tasks`` list -> task names (``all``: the benchmarks of ``ALL_TASKS``, not the long tasks)."""
    known = ALL_TASKS + LONG_TASKS
    tasks = []
    for t in (t.strip() for t in text.split(",")):
        names = ALL_TASKS if t == "all" else (t,)
        for n in names:
            if n not in known:
                raise KvxError(f"unknown task '{n}'; use {', '.join(known)} or all")
            if n not in tasks:
                tasks.append(n)
    if not tasks:
        raise KvxError("no task given; use --tasks " + ",".join(ALL_TASKS))
    return tasks


def depth_list(text: str) -> list[float]:
    """``"0.1,0.5,0.9"`` -> fractions in [0, 1] (``--probe-depths``)."""
    try:
        depths = [float(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of numbers") from None
    if not depths or not all(0 <= d <= 1 for d in depths) or len(set(depths)) != len(depths):
        raise argparse.ArgumentTypeError(f"'{text}': give distinct depths between 0 and 1, e.g. 0.1,0.5,0.9")
    return depths


BACKENDS = ("reference", "executorch", "onnx")
# Which program targets each program backend runs.
BACKEND_TARGETS = {"executorch": ("executorch",), "onnx": ("onnx", "ort")}


def check_backend(backend: str, program: str | None = None) -> None:
    """:class:`KvxError` (one line) unless ``backend`` (with ``program`` where it needs one) can run."""
    if backend not in BACKENDS:
        raise KvxError(f"unknown --backend '{backend}'; use one of {', '.join(BACKENDS)}")
    if backend == "reference" and program:
        raise KvxError("--program needs --backend executorch or onnx (the program's runtime)")
    if backend != "reference" and not program:
        raise KvxError(f"--backend {backend} needs --program graphs/<name> (a program built with kvexport build)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    # a list: split_policies parses each spec before the model loads
    add_cache_args(
        p,
        default_policy=DEFAULT_POLICIES,
        policy_type=None,
        policy_help="policies to compare, "
        f"comma-separated (or ';'-separated): {POLICY_GRAMMAR} (default {DEFAULT_POLICIES})",
    )
    p.add_argument(
        "--tasks",
        default=",".join(MC_TASKS),
        help=f"comma-separated: {', '.join(ALL_TASKS + LONG_TASKS)}, or all (the first {len(ALL_TASKS)})",
    )
    p.add_argument(
        "--limit",
        type=validate.positive_int,
        default=None,
        help="first N items per task (N windows for wikitext; N windows of the longest context for longppl)",
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
        choices=REFERENCE_FORMATS,
        help="linear-layer format of the reference model (as kvexport build: the executorch formats, and "
        "int8 / int4 as the onnx/ort targets quantize them)",
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
    long = p.add_argument_group("long context (--tasks longppl,passkey)")
    long.add_argument(
        "--long-contexts",
        type=validate.int_list,
        default="512,2048,8192",
        help="longppl window lengths in tokens, each scored from an empty cache of that size (default 512,2048,8192)",
    )
    long.add_argument(
        "--text-file", default=None, help="longppl text: this UTF-8 file instead of WikiText-2's held-out half"
    )
    long.add_argument(
        "--probe-contexts",
        type=validate.int_list,
        default=None,
        help="passkey context lengths in tokens (default: --long-contexts)",
    )
    long.add_argument(
        "--probe-depths", type=depth_list, default="0.1,0.5,0.9", help="where the key sits (0 = start, 1 = end)"
    )
    long.add_argument(
        "--probe-trials", type=validate.positive_int, default=5, help="passkey items (keys) per context and depth"
    )
    long.add_argument(
        "--probe-filler",
        default="repeat",
        choices=FILLERS,
        help="passkey filler: a repeated neutral paragraph, or the longppl text",
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
        "weights": evaluation.cfg.weights,
        "window": opts.window,
        "sinks": opts.sinks,
        "group": opts.group or evaluation.loaded.args.head_dim,
        "rotate_keys": opts.rotate_keys,
        "rotate_values": opts.rotate_values,
        "clip": opts.clip,
        "classes": opts.classes,
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


def program_setup(program: str, backend: str, loaded=None):
    """(loaded model, cache options, [policy], weights label, reference model) of a built program, for the reference
    run beside it: the reference has the program's weights as ``kvexport parity`` builds them
    (:func:`kvexport.parity.reference_model`; ONNX ``int8`` / ``int4`` / ``q4`` with ONNX Runtime's arithmetic,
    labelled ``onnx:<weights>``). ``loaded``: the program's model, where it is already loaded."""
    from kvexport.export.build import loaded_for_manifest
    from kvexport.export.manifest import read_manifest
    from kvexport.parity import reference_model
    from kvexport.session import CacheOptions

    manifest = read_manifest(Path(program))
    if manifest["target"] not in BACKEND_TARGETS[backend]:
        raise KvxError(
            f"{program} is a {manifest['target']} program; use --backend "
            f"{next(b for b, t in BACKEND_TARGETS.items() if manifest['target'] in t)}"
        )
    weights = manifest["weights"]
    if manifest["target"] != "executorch" and weights != "fp32":
        weights = f"onnx:{weights}"
    opts, loaded = CacheOptions.from_manifest(manifest["cache_options"]), loaded or loaded_for_manifest(manifest)
    return loaded, opts, [opts.policy], weights, reference_model(loaded, manifest)


def _long_settings(args, ev) -> dict:
    opts = ev.cfg.opts
    first = next(iter(ev.runs.values())).scorer.describe()
    return {
        "backend": "reference",
        "weights": ev.cfg.weights,
        "window": opts.window,
        "sinks": opts.sinks,
        "group": opts.group or ev.loaded.args.head_dim,
        "rotate_keys": opts.rotate_keys,
        "rotate_values": opts.rotate_values,
        "clip": opts.clip,
        "classes": opts.classes,
        "seed": opts.seed,
        "budget_bits": opts.budget_bits,
        "prefill_chunk": first["prefill_chunk"],
        "limit": args.limit,
        "contexts": ev.cfg.contexts,
        "probe_contexts": ev.cfg.probe_contexts,
        "probe_depths": ev.cfg.depths,
        "probe_trials": ev.cfg.trials,
        "probe_filler": ev.cfg.filler,
        "text_file": args.text_file,
        "random_weights": bool(ev.loaded.identity.get("random_weights")),
        "policies": ev.cfg.policies,
        "tasks": ev.cfg.tasks,
    }


def run(args: argparse.Namespace) -> int:
    import torch

    from kvexport.data import data_file
    from kvexport.eval import long_report
    from kvexport.eval.longctx import LongConfig, LongEvaluation, check_text_file
    from kvexport.eval.records import RecordStore
    from kvexport.eval.report import summarize, write_reports
    from kvexport.eval.runner import EvalConfig, Evaluation
    from kvexport.options import cache_options, load_model

    policies = split_policies(args.kv_policy)
    tasks = split_tasks(args.tasks)
    long_tasks = [t for t in tasks if t in LONG_TASKS]
    std_tasks = [t for t in tasks if t not in LONG_TASKS]
    check_backend(args.backend, args.program)
    if long_tasks and args.backend != "reference":
        raise KvxError(f"{','.join(long_tasks)} run on the reference backend only; drop --backend and --program")
    if long_tasks and min(args.long_contexts + (args.probe_contexts or [])) < 2:
        raise KvxError("--long-contexts and --probe-contexts need at least 2 tokens per context")
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
        for task in std_tasks:
            data_file(task, args.data_dir)
    if args.text_file:
        check_text_file(args.text_file)
    opts, weights, model = cache_options(args), args.weights, None
    if args.program:  # the program fixes model, policy, cache and weights: the reference follows it
        loaded, opts, policies, weights, model = program_setup(args.program, args.backend)
    else:
        loaded = load_model(args)
    data_dir = Path(args.data_dir) if args.data_dir else None
    evaluation = long_ev = None
    if std_tasks:
        cfg = EvalConfig(
            policies=policies,
            tasks=std_tasks,
            opts=opts,
            backend=args.backend,
            prefill_chunk=args.prefill_chunk,
            limit=args.limit,
            sample=args.sample,
            sample_seed=args.seed,
            ppl_window=args.ppl_window,
            data_dir=data_dir,
            progress=not args.no_progress,
            weights=weights,
            program=Path(args.program) if args.program else None,
            batch_items=args.batch_items,
            device=args.device,
        )
        evaluation = Evaluation(loaded, cfg, model=model)
    if long_tasks:
        long_cfg = LongConfig(
            policies=policies,
            tasks=long_tasks,
            opts=opts,
            contexts=args.long_contexts,
            probe_contexts=args.probe_contexts,
            depths=args.probe_depths,
            trials=args.probe_trials,
            filler=args.probe_filler,
            text_file=Path(args.text_file) if args.text_file else None,
            limit=args.limit,
            data_dir=data_dir,
            prefill_chunk=args.prefill_chunk,
            weights=weights,
            batch_items=args.batch_items,
            device=args.device,
            progress=not args.no_progress,
        )
        long_ev = LongEvaluation(loaded, long_cfg, model=evaluation.model if evaluation else None)
    out = Path(args.out)
    records = Path(args.records) if args.records else out / "items.jsonl"
    if records.suffix == ".gz" and not args.report_only:
        raise KvxError(f"--records {records} is compressed: it can only be read (--report-only)")
    store = RecordStore(records)
    pending = {**(evaluation.pending(store) if evaluation else {}), **(long_ev.pending(store) if long_ev else {})}
    todo = ", ".join(f"{t} {n}" for t, n in pending.items())
    n_runs = len(evaluation.runs) if evaluation else len(long_ev.cfg.policies)
    print(
        f"[eval {loaded.name}: {n_runs} runs (policies{' + program' if args.program else ''}) "
        f"x {len(tasks)} tasks; to score: {todo}; records in {store.path}]",
        file=sys.stderr,
    )
    if store.bad_lines:
        print(f"[skipped {store.bad_lines} unreadable line(s) in {store.path}]", file=sys.stderr)

    def report() -> dict:
        paths = {}
        if evaluation is not None:
            settings = _settings(args, evaluation)
            paths.update(write_reports(summarize(evaluation, store, args.n_boot, args.seed, settings), out))
        if long_ev is not None:
            summary = long_report.summarize(long_ev, store, args.n_boot, args.seed, _long_settings(args, long_ev))
            paths.update({f"long_{k}": p for k, p in long_report.write_reports(summary, out).items()})
        return paths

    try:
        if not args.report_only:
            for ev in (evaluation, long_ev):
                if ev is not None:
                    ev.execute(store)
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
    for name in ("markdown", "long_markdown"):
        if name in paths:
            sys.stdout.write(paths[name].read_text())
    print(f"[wrote {', '.join(str(p) for p in paths.values() if p.exists())}]", file=sys.stderr)
    return 0
