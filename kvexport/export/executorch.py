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

import operator
import re
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.export import Dim, ExportedProgram, export

from kvexport.errors import KvxError
from kvexport.export.program import StepProgram
from kvexport.models.llama import RMSNorm, Transformer
from kvexport.models.weights import q4_manifest, quantize_weights

# Substrings of the state buffers whose initial values the program must carry.
INITIALIZED_STATE = ("win_pos", "pool_pos", "fill", "n_seen", "win_feat")


class LinearRMSNorm(RMSNorm):
    """Export form of :class:`RMSNorm`: the mean of squares as a ``[dim -> 1]`` linear with weights
    ``1/dim``, which XNNPACK runs in the layer's partition (its mean over the last dim of a 3-d tensor
    it does not take: two ops per layer outside it). Same weight; differs from the reference by the
    summation order only (float32 rounding)."""

    def __init__(self, norm: RMSNorm):
        super().__init__(norm.weight.shape[0], norm.eps)
        self.weight = norm.weight
        dim = norm.weight.shape[0]
        self.register_buffer("inv_dim", torch.full((1, dim), 1.0 / dim, dtype=norm.weight.dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(F.linear(x * x, self.inv_dim) + self.eps) * self.weight


def delegable_forms(model: Transformer) -> int:
    """ExecuTorch's forms of the reference, in place: every :class:`RMSNorm` becomes its
    :class:`LinearRMSNorm`. Returns how many norms were replaced. (RoPE needs no form of its own: a fused
    program applies it inside ``kvexport::layer_attention``.)"""
    found = [(fqn, mod) for fqn, mod in model.named_modules() if type(mod) is RMSNorm]
    for fqn, mod in found:
        parent, _, name = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, LinearRMSNorm(mod))
    return len(found)


def export_step(step: StepProgram) -> ExportedProgram:
    """Trace one step; the chunk length is dynamic up to the cache's ``max_chunk``."""
    chunk = step.cache.max_chunk
    example = (torch.zeros(1, min(2, chunk), dtype=torch.int64), torch.tensor([0], dtype=torch.int64))
    dynamic = ({1: Dim("T", min=1, max=chunk)}, None) if chunk > 1 else None
    with torch.no_grad():
        return export(step, example, dynamic_shapes=dynamic, strict=False)


def lower_to_pte(ep: ExportedProgram, metadata: dict) -> tuple[bytes, dict]:
    """Edge dialect + XNNPACK delegation + ExecuTorch program; returns the ``.pte`` bytes and the
    program's op summary (:func:`op_summary`)."""
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
    from kvexport.ops import kernel_calls

    summary = op_summary(edge.exported_program().graph_module)
    pte = edge.to_executorch(config).buffer
    summary["kernel_calls_per_step"] = kernel_calls(pte)  # operator calls outside XNNPACK per forward
    return pte, summary


def op_summary(graph_module: torch.fx.GraphModule) -> dict:
    """Ops of the lowered forward: how many XNNPACK partitions, which ops run inside them, and
    which run on ExecuTorch kernels (portable ATen or ``kvexport::``), with counts."""
    outside, inside, partitions = Counter(), Counter(), 0
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        if getattr(node.target, "__name__", "") == "executorch_call_delegate":
            partitions += 1
            lowered = getattr(graph_module, node.args[0].target)
            inside.update(_op_name(n.target) for n in lowered.original_module.graph.nodes if n.op == "call_function"
                          and n.target is not operator.getitem)
        else:
            outside[_op_name(node.target)] += 1
    return {"xnnpack_partitions": partitions, "xnnpack_ops": dict(inside.most_common()),
            "executorch_kernel_ops": dict(outside.most_common())}


def _op_name(target) -> str:
    name = getattr(target, "__name__", str(target))
    return name.removeprefix("aten.") if isinstance(name, str) else str(name)


def check_pte_header(path: Path) -> None:
    """:class:`KvxError` unless ``path`` starts like an ExecuTorch program: a flatbuffer with the
    ``ET<nn>`` identifier (bytes 4-8) and the ``eh00`` extended header (bytes 8-40: header length,
    program size, segment offset and size) whose sizes fit the file. The runtime aborts the whole
    process on some corrupt programs instead of raising, so nothing else reaches it."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(40)
    fields = [int.from_bytes(head[i:j], "little") for i, j in ((0, 4), (12, 16), (16, 24), (24, 32), (32, 40))]
    root, length, program_size, segment_offset, segment_size = fields if len(head) == 40 else [0] * 5
    segment_size = segment_size if length >= 32 else 0  # a 24-byte header has no segment size
    ok = (len(head) == 40 and re.fullmatch(rb"ET\d\d", head[4:8]) and head[8:12] == b"eh00" and length >= 24
          and 40 <= program_size <= size and 8 <= root < program_size
          and (segment_offset == 0 or program_size <= segment_offset and segment_offset + segment_size <= size))
    if not ok:
        raise KvxError(f"ExecuTorch cannot load {path}: not a program (bad or truncated header); rebuild it")


def write_program(step: StepProgram, out_dir: Path, *, target: str, ops: str, weights: str, metadata: dict,
                  log=print) -> dict:
    """export -> lower -> serialize ``model.pte`` into ``out_dir`` (the build's writer for executorch)."""
    t0 = time.perf_counter()
    log(f"[1/3] export: ops {ops}, weights {weights}")
    quantize_weights(step.model, weights)
    delegable_forms(step.model)
    ep = export_step(step)
    t1 = time.perf_counter()
    log(f"[2/3] lower to ExecuTorch (XNNPACK): {len(ep.graph.nodes)} nodes (export took {t1 - t0:.0f} s)")
    pte, ops = lower_to_pte(ep, metadata)
    t2 = time.perf_counter()
    log(f"[3/3] serialize: {len(pte) / 1e6:.1f} MB; {ops['xnnpack_partitions']} XNNPACK partitions "
        f"({sum(ops['xnnpack_ops'].values())} ops), "
        f"{ops['kernel_calls_per_step']} operator calls outside XNNPACK per step (lowering took {t2 - t1:.0f} s)")
    (out_dir / "model.pte").write_bytes(pte)
    seconds = {"export": round(t1 - t0, 1), "lower_and_serialize": round(t2 - t1, 1)}
    written = {"program": "model.pte", "files": ["model.pte"],
               "executorch": {"exported_nodes": len(ep.graph.nodes), "seconds": seconds, **ops}}
    if weights.startswith("q4"):  # where the codes came from: the GGUF's, or a re-quantization
        written["q4"] = q4_manifest(step.model, weights)
    return written
