"""Where the 2-bit loss sits and what the quantizer options buy (issue #16 item 2), on held-out text.

    python calibration/kv_study.py [--model M] [--windows 2] [--tokens 2048] [--data-dir DIR]
                                   [--out results/kv-study] [--threads 2]

Every pooled token (outside sinks and window, the cache's visibility rule) is stored at one class, given
per side as (key bits, value bits) — 16 keeps a side at fp16 — with or without the Hadamard rotation of keys
and of values, and clip ratios (``--kv-clip``); the measured KL(fp16 || configuration) per token comes from
:func:`kvexport.controller.labels.measured_kl` (the gated forward: the cache's quantizer, bit for bit).
Windows are the held-out half of WikiText-2 test (as ``calibration/oracle.py``). Writes ``kv_study.json``
and ``kv_study.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from kvexport.controller import labels as L  # noqa: E402
from kvexport.controller.calibrate import tokenize_blocks  # noqa: E402
from kvexport.controller.token_counts import wikitext_halves  # noqa: E402
from kvexport.data import data_file  # noqa: E402
from kvexport.fsutil import write_text_atomic  # noqa: E402
from kvexport.kv import quant  # noqa: E402
from kvexport.models.loader import resolve  # noqa: E402

# name: ((key bits, value bits), rotation mask (1 keys: --kv-rotate, 2 values: --kv-rotate-values), --kv-clip spec)
CONFIGS = {
    "K2V2": ((2, 2), 0, "none"),
    "K2V16": ((2, 16), 0, "none"),
    "K16V2": ((16, 2), 0, "none"),
    "K2V2 rot": ((2, 2), 1, "none"),
    "K2V2 clip k2=0.7": ((2, 2), 0, "k2=0.7"),
    "K2V2 rot clip k2=0.7": ((2, 2), 1, "k2=0.7"),
    "K2V2 rot clip k2=0.65,v2=0.9": ((2, 2), 1, "k2=0.65,v2=0.9"),
    "K2V16 rot clip k2=0.7": ((2, 16), 1, "k2=0.7"),
    "K4V2": ((4, 2), 0, "none"),
    "K4V2 rot": ((4, 2), 1, "none"),
    "K4V4": ((4, 4), 0, "none"),
    "K4V4 rot": ((4, 4), 1, "none"),
    "K8V4": ((8, 4), 0, "none"),
    "K16V2 vrot": ((16, 2), 2, "none"),
    "K16V2 vrot clip v2=0.85": ((16, 2), 2, "v2=0.85"),
    "K4V2 rot vrot": ((4, 2), 3, "none"),
    "K4V2 rot vrot clip v2=0.85": ((4, 2), 3, "v2=0.85"),
    "K4V4 rot vrot": ((4, 4), 3, "none"),
    "K2V2 rot vrot clip k2=0.7,v2=0.85": ((2, 2), 3, "k2=0.7,v2=0.85"),
}


def bits_per_element(cls: tuple[int, int], group: int) -> float:
    return sum(quant.bits_per_element(b, group) for b in cls) / 2


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=str(HERE.parent / "results" / "kv-study"))
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    loaded = resolve(a.model)
    model = loaded.build()
    group, chunk = loaded.args.head_dim, a.window or 32
    _, held = wikitext_halves(data_file("wikitext", a.data_dir))
    ids = tokenize_blocks(loaded.tokenizer, held, a.windows * a.tokens)
    kl = {name: 0.0 for name in CONFIGS}
    for w in range(a.windows):
        tokens = torch.tensor(ids[w * a.tokens:(w + 1) * a.tokens])
        qvis = L.quantized_visibility(a.tokens, a.sinks, a.window, chunk)
        with torch.no_grad():
            ref = L.gated_forward(model, tokens, None, group, qvis)
        for name, (cls, rot, clip) in tqdm(CONFIGS.items(), desc=f"window {w}"):
            kl[name] += L.measured_kl(model, tokens, {cls: torch.ones(a.tokens)}, sinks=a.sinks, window=a.window,
                                      chunk=chunk, group=group, ref=ref, rotate=rot,
                                      clip=quant.parse_clip(clip)) / (a.tokens * a.windows)
    rows = [{"config": n, "key_bits": c[0], "value_bits": c[1], "rotate_keys": bool(r & 1),
             "rotate_values": bool(r & 2), "clip": s,
             "bits_per_element": bits_per_element(c, group), "kl_per_token": kl[n]} for n, (c, r, s) in CONFIGS.items()]
    result = {"model": loaded.name, "windows": a.windows, "tokens": a.tokens, "sinks": a.sinks, "window": a.window,
              "group": group, "rows": rows}
    lines = [f"# 2-bit study: {loaded.name}, {a.windows} held-out windows x {a.tokens} tokens, sinks {a.sinks}, "
             f"window {a.window}, group {group}", "",
             "| config | bits/element (pooled) | KL(fp16 ‖ config) nats/token |", "|---|---|---|"]
    lines += [f"| {r['config']} | {r['bits_per_element']:.2f} | {r['kl_per_token']:.4f} |" for r in rows]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "kv_study.json", json.dumps(result, indent=1))
    write_text_atomic(out / "kv_study.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
