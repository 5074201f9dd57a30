"""``kvexport parity``: the same token stream through the PyTorch reference and a built program.

The prompt is fed in the program's chunk size to both, then ``steps`` greedy steps follow the
reference's argmax (teacher forcing, so one early flip cannot derail the comparison). Per step:
max |delta logit|, KL(reference || program), top-1 agreement, and whether the cache state agrees:
the class histogram (each decode step evicts at most one token, so equal histograms at every step
mean the same class for every token), bytes used and average bits. Bit-identity of the packed
codes themselves is checked at the op level (``tests/ops``: the kernels reproduce the reference
quantizer bit for bit); the runtime does not expose the program's buffers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kvexport.export.build import loaded_for_manifest, read_manifest
from kvexport.export.runners import open_runner
from kvexport.kv import stats as kv_stats
from kvexport.models.weights import quantize_weights
from kvexport.session import CacheOptions, Session

# Documented tolerances. XNNPACK reorders float sums, so logits differ by ~1e-5..1e-2; and when a
# key/value element of a quantized token lies on a rounding boundary, that ~1e-6 difference can flip
# its code, which moves single logits by up to ~0.5 while the distribution barely changes (measured
# on the default model, learned policy: max |dlogit| 0.49 with KL 5.5e-4 at the same step). So the
# distribution (KL), the greedy token and the cache state are the strict checks; max |dlogit| only
# catches gross breakage (wrong positions or masks move logits by several units).
TOLERANCES = {"max_abs_logit": 1.0, "kl": 1e-3, "top1_agreement": 0.95}
# 8da8w / 8da4w programs quantize activations per token at run time: the same ~1e-6 float
# differences can flip an activation code, which moves every output of that linear layer by up to
# one activation step. The reference uses the same quantized weights and the same quantizer (bf16
# group scales for 4-bit, as XNNPACK), so most steps agree to ~1e-5 (measured on the tiny test
# model: 8da4w worst KL 2e-11 over 28 steps; 8da8w 7e-3 at the worst of 8 flipped steps).
DYNAMIC_ACTIVATION_TOLERANCES = {"max_abs_logit": 2.0, "kl": 2e-2, "top1_agreement": 0.95}


def tolerances_for(manifest: dict) -> dict:
    quantized = manifest["target"] == "executorch" and manifest["weights"] != "fp32"
    return DYNAMIC_ACTIVATION_TOLERANCES if quantized else TOLERANCES


DEFAULT_PROMPT = "The history of the printing press begins in the fifteenth century, when"


def _kl(ref: torch.Tensor, prog: torch.Tensor) -> float:
    lp, lq = torch.log_softmax(ref.double(), -1), torch.log_softmax(prog.double(), -1)
    return float((lp.exp() * (lp - lq)).sum())


def reference_model(loaded, manifest: dict):
    """The reference model for a program: its torchao weight format for ExecuTorch programs (the
    same quantized weights); fp32 otherwise."""
    model = loaded.build()
    if manifest["target"] == "executorch":
        quantize_weights(model, manifest["weights"])
    return model


def run_parity(program_dir: Path, prompt: str = DEFAULT_PROMPT, steps: int = 64, loaded=None) -> dict:
    """Compare ``program_dir`` with the reference built from its manifest (or from ``loaded``)."""
    manifest = read_manifest(program_dir)
    runner = open_runner(program_dir)
    loaded = loaded or loaded_for_manifest(manifest)
    session = Session(loaded, CacheOptions(**manifest["cache_options"]), model=reference_model(loaded, manifest))
    ids = loaded.tokenizer.encode(prompt)
    total = min(len(ids) + steps, manifest["cache"]["max_context"])
    rows = []

    def compare(kind: str, chunk: list[int]) -> int:
        ref = session.step(chunk)[-1]
        prog = runner.step(chunk)
        ref_stats, prog_stats = kv_stats.named(session.cache.stats()), kv_stats.named(runner.last_stats)
        rows.append(
            {
                "step": len(rows),
                "kind": kind,
                "tokens": len(chunk),
                "max_abs_logit": float((ref - prog).abs().max()),
                "kl": _kl(ref, prog),
                "top1_equal": int(ref.argmax()) == int(prog.argmax()),
                "classes_equal": all(ref_stats[f] == prog_stats[f] for f in kv_stats.TOKEN_COUNTS),
                "bytes_equal": ref_stats["kv_bytes_used"] == prog_stats["kv_bytes_used"],
                "avg_bits": prog_stats["avg_bits"],
            }
        )
        return int(ref.argmax())

    tok = None
    for i in range(0, len(ids), runner.max_chunk):
        tok = compare("prefill", ids[i : i + runner.max_chunk])
    while session.pos < total:
        tok = compare("decode", [tok])
    return summarize(rows, manifest)


def summarize(rows: list[dict], manifest: dict) -> dict:
    tol = tolerances_for(manifest)
    worst_abs = max(r["max_abs_logit"] for r in rows)
    worst_kl = max(r["kl"] for r in rows)
    top1 = sum(r["top1_equal"] for r in rows) / len(rows)
    classes = all(r["classes_equal"] and r["bytes_equal"] for r in rows)
    ok = worst_abs <= tol["max_abs_logit"] and worst_kl <= tol["kl"] and top1 >= tol["top1_agreement"] and classes
    return {
        "program": manifest["program"],
        "policy": manifest["policy"]["spec"],
        "ops_mode": manifest["ops_mode"],
        "steps": len(rows),
        "max_abs_logit": worst_abs,
        "max_kl": worst_kl,
        "top1_agreement": top1,
        "cache_state_equal": classes,
        "tolerances": tol,
        "weights": manifest["weights"],
        "passed": ok,
        "rows": rows,
    }


def format_table(result: dict) -> str:
    lines = [
        f"{'step':>4} {'kind':8} {'T':>3} {'max|dlogit|':>12} {'KL':>10} {'top1':>5} {'classes':>7} {'avg bits':>8}"
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['step']:>4} {r['kind']:8} {r['tokens']:>3} {r['max_abs_logit']:>12.2e} {r['kl']:>10.2e} "
            f"{'ok' if r['top1_equal'] else 'DIFF':>5} "
            f"{'ok' if r['classes_equal'] and r['bytes_equal'] else 'DIFF':>7} "
            f"{r['avg_bits']:>8.2f}"
        )
    verdict = "PASS" if result["passed"] else "FAIL"
    lines.append(
        f"{verdict}: {result['steps']} steps, worst max|dlogit| {result['max_abs_logit']:.2e}, "
        f"worst KL {result['max_kl']:.2e}, top-1 agreement {result['top1_agreement']:.3f}, "
        f"cache state equal: {result['cache_state_equal']} (tolerances {result['tolerances']})"
    )
    return "\n".join(lines)
