"""Feature ablation + summary table for calibration/README.md.

    python calibration/ablation.py [--model M] [--budgets 3 4] [--table-only]

For each budget and each feature: ``kvexport calibrate --drop-feature F --out <model>/ablation``
(the controller is retrained with that feature's input weights held at zero; labels and held-out
baselines come from the calibrate cache, so only the new controller is evaluated). Then prints the
markdown tables from ``report-<B>.json`` and ``ablation/report-<B>-no-<F>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from kvexport.controller import calibrate  # noqa: E402
from kvexport.controller.cli import add_arguments  # noqa: E402
from kvexport.kv.policy import FEATURES  # noqa: E402


def table(model_dir: Path, budgets: list[float]) -> str:
    lines = []
    for b in budgets:
        rep = json.loads((model_dir / f"report-{b:g}.json").read_text())
        h = rep["heldout"]
        n = h["fp16"]["tokens"]
        lines += [f"\n**Budget {b:g} bits** (held-out: {h['fp16']['windows']} x {rep['heldout_setup']['tokens_per_window']}"
                  f"-token window(s), {n} scored tokens)\n",
                  "| policy | avg bits | ppl | KL vs fp16 (nats/token) | class histogram 2/4/8/16 |", "|---|---|---|---|---|"]
        rows = [("learned", "learned")] + [(k, k) for k in h if k.startswith("random:")] + \
               [(k, k) for k in ("static-2", "static-4", "rule", "fp16") if k in h]
        for label, k in rows:
            r = h[k]
            hist = "/".join(str(r["class_histogram"].get(c, 0)) for c in ("2", "4", "8", "16"))
            lines.append(f"| {label} | {r['avg_bits']:.3f} | {r['ppl']:.3f} | {r['kl']:.4f} | {hist} |")
        for f in FEATURES:
            p = model_dir / "ablation" / f"report-{b:g}-no-{f}.json"
            if p.is_file():
                r = json.loads(p.read_text())["heldout"]["learned"]
                hist = "/".join(str(r["class_histogram"].get(c, 0)) for c in ("2", "4", "8", "16"))
                lines.append(f"| learned without {f} | {r['avg_bits']:.3f} | {r['ppl']:.3f} | {r['kl']:.4f} | {hist} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--budgets", type=float, nargs="+", default=[3.0, 4.0])
    p.add_argument("--table-only", action="store_true")
    a = p.parse_args()
    model_dir = HERE / a.model
    if not a.table_only:
        for b in a.budgets:
            for f in FEATURES:
                if (model_dir / "ablation" / f"report-{b:g}-no-{f}.json").is_file():
                    continue
                cp = argparse.ArgumentParser()
                add_arguments(cp)
                args = cp.parse_args(["--model", a.model, "--kv-budget-bits", f"{b:g}", "--drop-feature", f,
                                      "--out", str(model_dir / "ablation")])
                calibrate.run(args)
    print(table(model_dir, a.budgets))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
