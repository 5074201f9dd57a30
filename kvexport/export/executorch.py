"""ExecuTorch pipeline, split as in ExecuTorch's ``extension/llm``: export -> lower -> serialize.

* export: ``torch.export`` of :class:`StepProgram` with a dynamic chunk length ``T in [1, max_chunk]``;
* lower: edge dialect, linear layers (fp32, or 8-bit-activation quantized) delegated to XNNPACK,
  everything else on ExecuTorch kernels (portable ATen, or our ``kvexport::`` kernels with
  ``--ops fused``); metadata methods in the style of ExecuTorch's own LLM exports;
* serialize: ``.pte`` bytes with the cache's bookkeeping initial values kept
  (``InitializedMutableBufferPass``: positions start at -1) and in-place buffer updates
  (``run_reinplace_pass``).
"""

from __future__ import annotations

import torch
from torch.export import Dim, ExportedProgram, export

from kvexport.export.program import LAYOUT_VERSION, StepProgram


# Substrings of the state buffers whose initial values the program must carry.
INITIALIZED_STATE = ("win_pos", "pool_pos", "fill", "n_seen", "win_feat")


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


def export_step(step: StepProgram) -> ExportedProgram:
    """Trace one step; the chunk length is dynamic up to the cache's ``max_chunk``."""
    chunk = step.cache.max_chunk
    example = (torch.zeros(1, min(2, chunk), dtype=torch.int64), torch.tensor([0], dtype=torch.int64))
    dynamic = ({1: Dim("T", min=1, max=chunk)}, None) if chunk > 1 else None
    with torch.no_grad():
        return export(step, example, dynamic_shapes=dynamic, strict=False)


def lower_to_pte(ep: ExportedProgram, metadata: dict) -> bytes:
    """Edge dialect + XNNPACK delegation + ExecuTorch program; returns the ``.pte`` bytes."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

    edge = to_edge_transform_and_lower(
        ep,
        partitioner=[XnnpackPartitioner()],
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
        constant_methods=metadata,
    )
    config = ExecutorchBackendConfig(
        # Bookkeeping state must start from its initial values (positions -1, counters and features
        # 0); the large K/V buffers need not (every read of them is masked), so they stay unserialized.
        passes=[InitializedMutableBufferPass(list(INITIALIZED_STATE))],
        run_reinplace_pass=True,
    )
    return edge.to_executorch(config).buffer

