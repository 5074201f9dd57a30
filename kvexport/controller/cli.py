"""``kvexport calibrate``'s options, and the entry that imports the pipeline (:mod:`kvexport.controller.calibrate`,
which imports torch) only when the command runs: building the command line imports no torch (``kvexport run`` of an
ONNX program stays a torch-free process)."""

from __future__ import annotations

import argparse

from kvexport import validate
from kvexport.options import add_data_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model alias, HF directory or .gguf (default: the default model)")
    p.add_argument(
        "--kv-budget-bits", type=validate.positive_float, required=True, help="average bits per KV element to train for"
    )
    p.add_argument("--corpus", default=None, help="WikiText raw file (default: WikiText-2 test from the data folder)")
    add_data_args(p)
    p.add_argument(
        "--out", default=None, type=validate.output_dir, help="output folder (default: calibration/<model>/)"
    )
    p.add_argument("--windows", type=validate.positive_int, default=8, help="calibration windows (default 8)")
    p.add_argument(
        "--window-tokens", type=validate.positive_int, default=512, help="tokens per calibration window (default 512)"
    )
    p.add_argument(
        "--horizon",
        type=validate.non_negative_int,
        default=128,
        help="label only tokens with at least this many later positions in their window (default 128)",
    )
    p.add_argument("--eval-windows", type=validate.positive_int, default=1, help="held-out windows (default 1)")
    p.add_argument(
        "--eval-tokens",
        type=validate.positive_int,
        default=2048,
        help="tokens per held-out window = max context (default 2048)",
    )
    p.add_argument("--hidden", type=validate.positive_int, default=16, help="controller hidden units (default 16)")
    p.add_argument("--alpha", type=float, default=1.0, help="weight of the label cross-entropy (default 1)")
    p.add_argument("--gamma", type=float, default=1.0, help="weight of the attributed-KL penalty (default 1)")
    p.add_argument(
        "--beta",
        type=float,
        default=None,
        help="weight of expected bits (default: gamma x the oracle multiplier at the budget)",
    )
    p.add_argument("--drop-feature", default=None, help="ablation: train with this feature ignored")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    p.add_argument("--cache-dir", default=None, help="intermediate results (default ~/.cache/kvexport/calibrate)")
    p.add_argument("--seed", type=validate.non_negative_int, default=0)


def run(args: argparse.Namespace) -> int:
    from kvexport.controller import calibrate

    return calibrate.run(args)
