"""STAND-IN program builder (test fixture only).

Builds a *tiny, random-weight* ExecuTorch program that follows kvexport's
program contract (layout version 1) so that the Android checks can run before
the real exporter lands.  It is NOT a SmolLM model: the logits are those of a
toy network; only the interface (methods, dtypes, shapes, mutable KV state,
kv_stats layout, metadata methods, manifest + tokenizer files) is real.

Contract implemented:
  forward(tokens: int64[1, T], input_pos: int64[1]) -> (logits f32[1, V], kv_stats f32[8])
  get_max_context_len, get_max_seq_len, get_vocab_size, get_bos_id, get_n_layers,
  get_layout_version -> int64;  get_eos_ids -> list of int64
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

VOCAB = 49152          # SmolLM2 vocabulary size
DIM = 16
MAX_CTX = 64
MAX_SEQ = 8            # prefill chunk size (T in 1..MAX_SEQ)
N_LAYERS = 1
BOS_ID = 1             # <|im_start|>
EOS_IDS = [2, 0]       # <|im_end|>, <|endoftext|>


class StandInLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1234)
        self.emb = nn.Embedding(VOCAB, DIM)
        self.mix = nn.Linear(DIM, DIM)
        self.out = nn.Linear(DIM, VOCAB, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        # KV state lives inside the program as a mutable buffer.
        self.register_buffer("k_cache", torch.zeros(MAX_CTX, DIM))

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor):
        t = tokens.shape[1]
        x = self.emb(tokens[0])                                  # [T, D]
        pos = input_pos + torch.arange(t, dtype=torch.int64)     # [T]
        self.k_cache.index_copy_(0, pos, x)
        n = input_pos + t                                        # [1] tokens cached
        mask = torch.arange(MAX_CTX, dtype=torch.int64) < n      # rows written so far
        # torch.where (not a multiply): unwritten rows of the mutable buffer are
        # uninitialised memory in ExecuTorch and may hold NaN/inf.
        ctx = torch.where(mask[:, None], self.k_cache, 0.0).sum(0) / n.to(torch.float32)
        h = torch.tanh(self.mix(x[-1] + ctx))
        logits = self.out(h).unsqueeze(0)                         # [1, V]
        nf = n.to(torch.float32)
        bytes_per_tok = float(DIM * 2 * N_LAYERS * 2)               # K+V at 16 bit
        z = torch.zeros_like(nf)
        stats = torch.cat([
            torch.full_like(nf, MAX_CTX * bytes_per_tok),  # kv_bytes_allocated
            nf * bytes_per_tok,                            # kv_bytes_used
            torch.full_like(nf, 16.0),                     # avg_bits
            z, z, z,                                       # 2/4/8-bit tokens
            nf,                                            # 16-bit tokens
            nf,                                            # tokens cached
        ])
        return logits, stats


def build_standin(out_dir: Path, tokenizer_dir: Path, ops_mode: str = "portable",
                  tokens_dtype: torch.dtype = torch.int64) -> Path:
    """Export the stand-in to ``out_dir/model.pte`` + manifest + tokenizer files.

    ``tokens_dtype`` other than int64 builds a deliberately contract-breaking
    variant (used to test the bundler's dtype check).
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from torch.export import Dim, export

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = StandInLM().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    example = (torch.tensor([[BOS_ID, 5, 6]], dtype=tokens_dtype), torch.tensor([0], dtype=torch.int64))
    t_dim = Dim("T", min=1, max=MAX_SEQ)
    with torch.no_grad():
        ep = export(model, example, dynamic_shapes=({1: t_dim}, None), strict=False)
    edge = to_edge_transform_and_lower(
        ep,
        partitioner=[XnnpackPartitioner()],
        constant_methods={
            "get_max_context_len": MAX_CTX,
            "get_max_seq_len": MAX_SEQ,
            "get_vocab_size": VOCAB,
            "get_bos_id": BOS_ID,
            "get_n_layers": N_LAYERS,
            "get_layout_version": 1,
            "get_eos_ids": EOS_IDS,
        },
    )
    prog = edge.to_executorch(ExecutorchBackendConfig(
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False)))
    pte = out_dir / "model.pte"
    pte.write_bytes(prog.buffer)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Path(tokenizer_dir) / f, out_dir / f)
    manifest = {
        "model": "STAND-IN (tests/android/standin_program.py), not SmolLM",
        "program": "model.pte",
        "layout_version": 1,
        "ops_mode": ops_mode,
        "methods": ["forward", "get_max_context_len", "get_max_seq_len", "get_vocab_size",
                    "get_bos_id", "get_n_layers", "get_layout_version", "get_eos_ids"],
        "tokenizer": {"files": ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]},
        "metadata": {"get_max_context_len": MAX_CTX, "get_max_seq_len": MAX_SEQ,
                     "get_vocab_size": VOCAB, "get_bos_id": BOS_ID, "get_n_layers": N_LAYERS,
                     "get_layout_version": 1, "get_eos_ids": EOS_IDS},
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out_dir


if __name__ == "__main__":
    import sys
    print(build_standin(Path(sys.argv[1]), Path(sys.argv[2])))
