"""ONNX and ORT-format pipeline: explicit state -> ``torch.onnx`` -> weights -> check -> (ORT format).

* **explicit state**: :class:`ExplicitStateStep` runs :class:`StepProgram` with every cache buffer
  (``cache.state_buffers()``: packed codes, scales and zero points of every pool, sinks, window,
  positions, fill counters, feature state) as a graph input ``state.<name>`` and returns its
  updated value as ``new_state.<name>``, same shape and dtype. Cache writes are ``ScatterND``.
  One graph serves both steps: ``T = 1`` is the decode step, ``1 < T <= max_chunk`` the prefill step.
  The initial state (positions -1, the rest 0) is written to ``initial_state.safetensors``.
* **export**: ``torch.onnx`` (dynamo) at ai.onnx opset 18; each of our ops becomes one
  ``kvexport::<op>`` node (:func:`kvexport.ops.onnx.node_translation_table`) and their bodies
  (standard ONNX) are attached as model-local functions, so stock ONNX Runtime runs them with no
  extra library. (Translating the ops *to* functions does not work: ``torch.onnx.export`` always
  runs onnxscript's version-conversion pass, which inlines every function first.) The tied LM head's
  ``Transpose(embedding)`` is folded into its own initializer so it is not recomputed every step and
  weight quantizers see it.
* **weights**: fp32, or int8 / int4 MatMul weights (:mod:`kvexport.export.ort_tools`), or the GGUF's codes
  (:mod:`kvexport.export.onnx_q4`; in ``--ops fused`` programs each Q4_1 linear's offset term is one
  ``kvexport::block_offset`` node of our library); then the per-layer glue folds into ONNX Runtime's fused ops
  (:mod:`kvexport.export.onnx_fuse`). The manifest's ``custom_ops`` lists the library ops a program calls.
* **check**: ``onnx.checker.check_model(path, full_check=True)``; weights above 100 MB go to
  ``model.onnx.data`` (external data).
* **ort**: ``convert_onnx_models_to_ort`` -> ``model.ort`` + ``required_operators.config``.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from kvexport.errors import KvxError
from kvexport.export import onnx_fuse, ort_tools
from kvexport.export.onnx_graph import GraphIndex
from kvexport.export.ort_tools import STATE_IN, STATE_OUT
from kvexport.export.program import StepProgram
from kvexport.native_build import ORT_LIB_NAME as LIBRARY_NAME
from kvexport.ops.onnx import LIBRARY_OP, LIBRARY_OPS

OPSET = 18  # torch.onnx's own (TORCHLIB) opset: no conversion of op versions, oldest runtime needed
INITIAL_STATE = "initial_state.safetensors"
EXTERNAL_DATA_BYTES = 100 * 2**20


class ExplicitStateStep(nn.Module):
    """``forward(tokens int64 [1, T], input_pos int64 [1], *state) -> (logits float32 [1, V],
    kv_stats float32 [8], *new_state)``: one :class:`StepProgram` step with the cache state passed
    in and returned (``state`` in ``cache.state_buffers()`` order, shapes and dtypes unchanged), except the
    parts our ONNX Runtime kernel writes in place (:func:`in_place_state`): inputs only, read by no other node."""

    def __init__(self, step: StepProgram):
        super().__init__()
        self.step = step
        self.names = list(step.cache.state_buffers())
        self.in_place = in_place_state(step)
        self.outputs = [n for n in self.names if n not in self.in_place]

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, *state: torch.Tensor):
        bufs = {f"cache.{n}": s if n in self.in_place else s.clone() for n, s in zip(self.names, state)}
        logits, stats = torch.func.functional_call(self.step, bufs, (tokens, input_pos), strict=False)
        return (logits, stats, *(bufs[f"cache.{n}"] for n in self.outputs))


def in_place_state(step: StepProgram) -> list[str]:
    """State our ONNX Runtime kernel writes in place (``--ops fused``): the sinks, the window and the eviction
    staging rows. Each layer's kernel touches only its own layer's rows, and eviction reads the rows each kernel
    returns, so no other node reads them and no order between nodes matters."""
    from kvexport.kv.layer_attention import WRITTEN_PARTS

    return list(WRITTEN_PARTS) if step.cache.onnx_kernel else []


def export_onnx(step: StepProgram):
    """``torch.onnx.ONNXProgram`` of :class:`ExplicitStateStep`; ``T`` dynamic in ``[1, max_chunk]``."""
    from torch.export import Dim

    from kvexport.ops.onnx import node_translation_table

    wrapped = ExplicitStateStep(step).eval()
    state = [b.clone() for b in step.cache.state_buffers().values()]
    chunk = step.cache.max_chunk
    example = (torch.zeros(1, min(2, chunk), dtype=torch.int64), torch.tensor([0], dtype=torch.int64), *state)
    dynamic = ({1: Dim("T", min=1, max=chunk)}, None, (None,) * len(state)) if chunk > 1 else None
    with torch.no_grad(), warnings.catch_warnings(), ort_tools.quiet():
        warnings.simplefilter("ignore")  # torch.export and torch.onnx notes while tracing
        ep = torch.export.export(wrapped, example, dynamic_shapes=dynamic, strict=False)
        return torch.onnx.export(
            ep,
            opset_version=OPSET,
            custom_translation_table=node_translation_table(),
            optimize=True,
            verbose=False,
            input_names=["tokens", "input_pos", *(STATE_IN + n for n in wrapped.names)],
            output_names=["logits", "kv_stats", *(STATE_OUT + n for n in wrapped.outputs)],
        )


def attach_kvexport_functions(model) -> None:
    """Add the bodies of the ``kvexport`` ops the graph calls as local functions (``onnx_ir.Model``); the library
    op (``kvexport::layer_attention``) has none."""
    import onnx_ir as ir

    from kvexport.ops.onnx import DOMAIN, function_protos

    protos = {p.name: p for p in function_protos()}
    todo = {n.op_type for n in model.graph if n.domain == DOMAIN} - set(LIBRARY_OPS)
    while todo:  # the ops the graph calls, then the helpers their bodies call
        fn = ir.serde.deserialize_function(protos[todo.pop()])
        model.functions[fn.identifier()] = fn
        todo |= {n.op_type for n in fn if n.domain == DOMAIN} - {f.name for f in model.functions.values()}


def type_library_outputs(model) -> int:
    """Give the outputs of library nodes (no body, so no type inference) their types: ``kvexport::layer_attention``'s
    ``out`` / ``recv`` float32, the staged rows the cache's float type; ``kvexport::allocate``'s int64, shaped like
    ``desired`` (class, slot) and ``fill``. Returns how many nodes."""
    import onnx_ir as ir

    from kvexport.ops.onnx import ALLOCATE_OP, DOMAIN

    typed = 0
    for node in model.graph:
        if node.domain != DOMAIN or node.op_type not in (LIBRARY_OP, ALLOCATE_OP):
            continue
        outs, typed = node.outputs, typed + 1
        if node.op_type == ALLOCATE_OP:
            for out, like in zip(outs, (node.inputs[0], node.inputs[0], node.inputs[2])):
                out.type, out.shape = ir.TensorType(ir.DataType.INT64), like.shape
            continue
        outs[0].type, outs[0].shape = ir.TensorType(ir.DataType.FLOAT), node.inputs[0].shape
        outs[1].type = ir.TensorType(ir.DataType.FLOAT)
        for rows in outs[2:]:
            rows.type = node.inputs[6].type  # sink_k: the cache's float type
    return typed


def fold_weight_transposes(model) -> int:
    """Replace ``Transpose(initializer)`` (the tied LM head reads the embedding transposed) by a new
    initializer holding the transposed weight; returns how many were folded. ``model``: ``onnx_ir.Model``."""
    import onnx_ir as ir

    graph, folded = model.graph, 0
    for node in list(graph):
        src = node.inputs[0] if node.op_type == "Transpose" and node.domain == "" else None
        if src is None or src.const_value is None or src.name not in graph.initializers:
            continue
        perm = node.attributes["perm"].as_ints() if "perm" in node.attributes else None
        value = ir.Value(
            name=f"{src.name}.T",
            shape=None,
            type=src.type,
            const_value=ir.tensor(src.const_value.numpy().transpose(perm), name=f"{src.name}.T"),
        )
        value.shape = ir.Shape(value.const_value.shape)
        graph.register_initializer(value)
        node.outputs[0].replace_all_uses_with(value)
        graph.remove(node, safe=True)
        folded += 1
    return folded


def aliased_state(model, names: list[str]) -> list[str]:
    """State the runner may bind to ONE buffer as both ``state.<name>`` and ``new_state.<name>``: those whose new
    value is ``Identity(state.<name>)`` (unchanged), or ``ScatterND(state.<name>, ..)`` written straight to the
    output where every other node reading ``state.<name>`` is an ancestor of that writer (so it has read before
    the write, in any order the runtime picks). ONNX Runtime's ``ScatterND`` and ``Identity`` skip their copy when
    input and output share a buffer: without this, every step copied each pool whole (``model``:
    ``onnx.ModelProto``). A pool whose readers the write does not wait for (the fp32-KV program's: the rows it
    evicts come from the window, not from the attention) keeps its copy."""
    g = GraphIndex(model.graph)
    out = []
    for name in names:
        writer = g.producer.get(STATE_OUT + name)
        if writer is None or writer.op_type not in ("ScatterND", "Identity") or writer.domain:
            continue
        if writer.input[0] != STATE_IN + name or any(a.name == "reduction" for a in writer.attribute):
            continue
        others = [n for n in g.consumers.get(STATE_IN + name, []) if n is not writer]
        if writer.op_type == "Identity" or {id(n) for n in others} <= g.ancestors(writer):
            out.append(name)
    return out


def save_initial_state(step: StepProgram, path: Path) -> None:
    """The state the first step starts from (``cache.state_buffers()`` right after construction)."""
    from safetensors.torch import save_file

    save_file({n: b.contiguous() for n, b in step.cache.state_buffers().items()}, str(path))


def op_counts(path: Path) -> dict:
    """``{"domain::Op" or "Op": count}`` over the main graph of an ONNX file (external data not loaded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts = Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph.node)
    return dict(counts.most_common())


def save_onnx(model, path: Path) -> bool:
    """Save a ModelProto at the oldest IR version its opsets allow; weights go to ``<name>.data``
    when they exceed 100 MB. Returns whether external data was written."""
    import onnx

    ort_tools.stamp_min_ir_version(model)
    external = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=f"{path.name}.data",
        size_threshold=1024,
    )
    return external


def write_program(
    step: StepProgram,
    out_dir: Path,
    *,
    target: str,
    ops: str,
    weights: str,
    metadata: dict,
    log=print,
    ort_version: str | None = None,
) -> dict:
    """The build's writer for ``onnx`` and ``ort``: see the module docstring for the steps."""
    import onnx

    # fused: kvexport::layer_attention nodes, which our ONNX Runtime library runs (built now: the ORT format
    # conversion loads the graph)
    library = ort_tools.custom_ops_library(LIBRARY_NAME) if ops == "fused" else None
    n_steps = 4 if target == "ort" else 3
    names, in_place = list(step.cache.state_buffers()), in_place_state(step)
    log(f"[1/{n_steps}] export: torch.onnx (dynamo), ai.onnx opset {OPSET}, cache state as {len(names)} inputs"
        + (f" ({len(in_place)} written in place by kvexport::{LIBRARY_OP})" if in_place else "/outputs"))
    program = export_onnx(step)
    attach_kvexport_functions(program.model)
    functions = sorted({n.op_type for n in program.model.graph if n.domain == "kvexport"} - set(LIBRARY_OPS))
    type_library_outputs(program.model)
    folded = fold_weight_transposes(program.model)
    program.model.metadata_props["kvexport.metadata"] = json.dumps(metadata)
    onnx_path = out_dir / "model.onnx"
    log(
        f"[2/{n_steps}] weights: {ort_tools.describe_weights(weights)}"
        + (f"; {folded} tied-weight transpose(s) folded" if folded else "")
    )
    with tempfile.TemporaryDirectory(dir=out_dir) as work:
        exported = Path(work) / "model.onnx"
        program.save(exported, external_data=True)
        del program
        model = (onnx.load(str(exported)) if weights == "fp32"
                 else ort_tools.quantize_weights(exported, weights, library=library is not None))
    fused = onnx_fuse.fuse(model, step.cache.layout.max_context)
    log(f"        glue: {fused['skip_rms_norm']} residual + RMSNorm chains -> SkipSimplifiedLayerNormalization, "
        + (f"RoPE in kvexport::{LIBRARY_OP}" if in_place else f"{fused['rotary']} rotary chains -> RotaryEmbedding"))
    aliased = aliased_state(model, [n for n in names if n not in in_place])
    external = save_onnx(model, onnx_path)
    del model
    log(
        f"[3/{n_steps}] check: onnx.checker full_check ({onnx_path.stat().st_size / 1e6:.1f} MB graph"
        + (f", {(out_dir / 'model.onnx.data').stat().st_size / 1e6:.1f} MB model.onnx.data)" if external else ")")
    )
    try:
        onnx.checker.check_model(str(onnx_path), full_check=True)
    except onnx.checker.ValidationError as err:
        raise KvxError(
            f"the exported ONNX graph fails onnx.checker ({str(err).splitlines()[0]}); this is a kvexport bug"
        ) from None
    save_initial_state(step, out_dir / INITIAL_STATE)
    counts = op_counts(onnx_path)
    info = {
        "graph": f"one graph for both steps: T=1 is the decode step, 1<T<={step.cache.max_chunk} the prefill step",
        "inputs": ["tokens", "input_pos", *(STATE_IN + n for n in names)],
        "outputs": ["logits", "kv_stats", *(STATE_OUT + n for n in names if n not in in_place)],
        "initial_state": INITIAL_STATE,
        "state_note": "feed new_state.<name> of one step as state.<name> of the next; start from initial_state"
        + ("; the state_in_place buffers have no new_state: the kernel updates the state.<name> buffer itself, "
           "so keep feeding the same buffer" if in_place else "")
        + "; each state_aliased name may be bound to one buffer as both state.<name> and new_state.<name>",
        "state_in_place": in_place,
        "state_aliased": aliased,
        "kvexport_functions": f"kvexport::{'/'.join(functions)} nodes; their standard-ONNX bodies are the model's "
        "local functions (runtimes inline them)",
        **({"custom_ops_library": LIBRARY_NAME,
            "custom_ops": [f"kvexport::{op}" for op in LIBRARY_OPS if f"kvexport::{op}" in counts]} if library else {}),
        "op_counts": counts,
    }
    files = ["model.onnx", *(["model.onnx.data"] if external else []), INITIAL_STATE]
    opsets, ir_version, file_ops = ort_tools.onnx_file_ops(onnx_path)
    if target == "onnx":
        compat = ort_tools.compatibility(opsets, ir_version, file_ops)
    else:
        log(f"[4/{n_steps}] convert to ORT format (+ required operators for a reduced build)")
        ort_path, config = ort_tools.convert_to_ort(onnx_path, out_dir, library)
        for f in files[:-1]:
            (out_dir / f).unlink()
        files = [ort_path.name, config.name, INITIAL_STATE]
        info["required_operators"] = ort_tools.read_required_operators(config)
        info["ort_format_version"], opsets, ir_version = ort_tools.ort_file_info(ort_path)
        opsets = {d: v for d, v in opsets.items() if d in info["required_operators"]}  # ORT lists all it registers
        contrib = sorted({*info["required_operators"].get("com.microsoft", ()), *file_ops.get("com.microsoft", ())})
        ops = {**info["required_operators"], **({"com.microsoft": contrib} if contrib else {})}  # + bit-width tags
        compat = ort_tools.compatibility(opsets, ir_version, ops, info["ort_format_version"])
    info.update(compat.to_manifest())
    if ort_version:
        problem = compat.newer_than(ort_version)
        if problem:
            log(f"warning: ONNX Runtime {ort_version} cannot run this program: {problem}")
    return {"program": files[0], "files": files, "onnx": info}
