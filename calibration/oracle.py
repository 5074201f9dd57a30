"""Routing headroom on held-out text: the ORACLE against random routing and static classes
(:mod:`kvexport.controller.oracle` is the method).

    python calibration/oracle.py [--model M] [--windows 2] [--tokens 2048] [--budgets 2.75 3 3.5 4]
                                 [--seeds 0 1] [--kv-rotate] [--kv-rotate-values]
                                 [--data-dir DIR] [--out results/oracle] [--threads 2]

Windows come from the held-out half of WikiText-2 test (the half ``kvexport calibrate`` evaluates
on). Each finished window is kept as ``<out>/window<k>.json``, so an interrupted run resumes; the
report (``oracle.json``, ``oracle.md``, ``oracle.png``) is rewritten from all windows at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from kvexport.controller import oracle  # noqa: E402
from kvexport.controller.calibrate import tokenize_blocks  # noqa: E402
from kvexport.controller.token_counts import wikitext_halves  # noqa: E402
from kvexport.data import data_file  # noqa: E402
from kvexport.fsutil import write_text_atomic  # noqa: E402
from kvexport.kv import quant  # noqa: E402
from kvexport.models.loader import resolve  # noqa: E402
from kvexport.session import CacheOptions, Session  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per window (= context)")
    p.add_argument("--budgets", type=float, nargs="+", default=[2.75, 3.0, 3.5, 4.0], help="pooled bits")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="random routings per budget")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--kv-rotate", action="store_true", help="keys quantized after the Hadamard rotation")
    p.add_argument("--kv-rotate-values", action="store_true", help="values quantized after the Hadamard rotation")
    p.add_argument("--kv-clip", default="none", help="clip ratios per class (kvexport --kv-clip), default none")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=str(HERE.parent / "results" / "oracle"))
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    loaded = resolve(a.model)
    model = loaded.build()
    group = loaded.args.head_dim
    sess = Session(loaded, CacheOptions(policy="fp16", max_context=a.tokens, sinks=a.sinks, window=a.window,
                                        group=group), model=model)
    settings = {"tokens": a.tokens, "sinks": a.sinks, "window": a.window, "chunk": sess.max_chunk, "group": group,
                "budgets": a.budgets, "seeds": a.seeds, "ig_steps": {2: 2, 4: 1, 8: 1}, "rotate": a.kv_rotate,
                **({"rotate_values": True} if a.kv_rotate_values else {}),
                **({} if a.kv_clip == "none" else {"clip": a.kv_clip})}
    _, held = wikitext_halves(data_file("wikitext", a.data_dir))
    ids = tokenize_blocks(loaded.tokenizer, held, a.windows * a.tokens)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    windows = []
    for k in range(a.windows):
        path = out / f"window{k}.json"
        w_ids = ids[k * a.tokens:(k + 1) * a.tokens]
        done = json.loads(path.read_text()) if path.is_file() else None
        if done is None or done.get("settings") != json.loads(json.dumps(settings)) or done.get("ids") != w_ids:
            print(f"window {k}: attribution + {len(a.budgets) * (1 + len(a.seeds)) + 3} measured forwards",
                  file=sys.stderr)
            res = oracle.measure_window(model, w_ids, sinks=a.sinks, window=a.window, chunk=sess.max_chunk,
                                        group=group, budgets=a.budgets, seeds=a.seeds, steps=settings["ig_steps"],
                                        rotate=quant.rotation_mask(a.kv_rotate, a.kv_rotate_values),
                                        clip=quant.parse_clip(a.kv_clip))
            done = {"settings": settings, "ids": w_ids, **res}
            write_text_atomic(path, json.dumps(done))
        windows.append({k2: v for k2, v in done.items() if k2 != "ids"})
    result = {"model": loaded.name, "settings": settings, "windows": windows, "summary": oracle.summarize(windows)}
    paths = oracle.write_report(result, out)
    print(oracle.markdown(result))
    print(f"wrote {', '.join(str(x) for x in paths.values())}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
