"""The exported computation: one decode/prefill step with the KV cache as module state.

``StepProgram.forward(tokens int64 [1, T], input_pos int64 [1]) -> (logits float32 [1, V],
kv_stats float32 [8])`` runs the chunk through the model, commits it into the cache (eviction,
controller, quantization, pool writes all inside the graph) and returns the last token's logits.
Only a policy that reads features (the controller: every token's next-token distribution) sends the
whole chunk through the LM head (the largest linear); every other policy sends the last row alone.
T is dynamic in ``[1, max_chunk]``. The same module is what both exporters trace.
"""

from __future__ import annotations

import torch
from torch import nn

from kvexport.export.manifest import LAYOUT_VERSION
from kvexport.kv.cache import MixedKVCache
from kvexport.models.llama import Transformer


class StepProgram(nn.Module):
    def __init__(self, model: Transformer, cache: MixedKVCache):
        super().__init__()
        self.model = model
        self.cache = cache

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor):
        hidden, step = self.model.hidden_step(tokens, input_pos, self.cache)  # [1, T, dim]
        if self.cache.policy.needs_features:  # the controller reads every token's next-token distribution
            logits = self.model.logits(hidden)  # [1, T, V]
            self.cache.commit(step, tokens, logits)
            return logits[:, -1, :], self.cache.stats()
        self.cache.commit(step, tokens, None)
        # only the last row meets the head; kept 3-d ([1, 1, dim]) so ONNX exports the head as a MatMul, the form
        # the weight quantizers rewrite (a 2-d input exports as Gemm)
        return self.model.logits(hidden[:, -1:, :])[:, 0, :], self.cache.stats()  # [1, V]



def metadata_methods(step: StepProgram, bos_id: int, eos_ids: list[int]) -> dict:
    """Constant methods an app reads before running (names as in ExecuTorch's llama exports)."""
    args, lay = step.model.args, step.cache.layout
    return {
        "get_max_context_len": lay.max_context,
        "get_max_seq_len": step.cache.max_chunk,
        "get_vocab_size": args.vocab_size,
        "get_bos_id": bos_id,
        "get_eos_ids": list(eos_ids),
        "get_n_layers": args.n_layers,
        "get_layout_version": LAYOUT_VERSION,
        "use_kv_cache": True,
    }
