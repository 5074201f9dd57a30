"""ONNX Runtime side of the onnx/ort targets: weight quantization, ORT-format conversion and the
oldest ONNX Runtime a program runs on.

Minimum version: the newest requirement among

* the ai.onnx opset and IR version, from ONNX Runtime's compatibility table
  (``docs/reference/compatibility.md`` in microsoft/onnxruntime, ``ORT_RELEASES`` below); newer
  opsets than the table knows need the installed ONNX Runtime's release;
* the com.microsoft contrib ops that weight quantization and the glue fusions introduce (``CONTRIB_OPS``);
* the ORT format version of ``.ort`` files (``ORT_FORMATS``): v5 from 1.13 (ORT's "ORT model
  format" page), v6 from 1.16, which older releases cannot read (microsoft/onnxruntime#20670).
  A reduced (required-operators) build must still come from an ONNX Runtime source tree that
  matches the converting release's op kernels; the manifest names the format version.

The ``.ort`` conversion uses ORT's "basic" optimization level (constant folding, redundant-node
elimination): higher levels fuse into contrib ops whose first release this table cannot know, and a
reduced build would then have to carry them. The fusions that pay on a decode step are done by the export
itself, into contrib ops this table lists (:mod:`kvexport.export.onnx_fuse`).

The runner (:mod:`kvexport.export.ort_runtime`) uses this module in a torch-free process: what imports torch is
imported inside the build-time functions that need it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from kvexport.errors import KvxError
from kvexport.models.formats import NBITS_BLOCK, NBITS_FORMATS
from kvexport.native_build import ORT_API_VERSION, ORT_LIB_NAME, BuildError, build_ort_library

# ONNX Runtime release -> (newest ai.onnx opset, newest ONNX IR version) it implements.
STATE_IN, STATE_OUT = "state.", "new_state."  # prefixes of a program's cache-state inputs and outputs
ORT_RELEASES = {
    "1.8": (14, 7),
    "1.9": (15, 8),
    "1.10": (15, 8),
    "1.11": (16, 8),
    "1.12": (17, 8),
    "1.13": (17, 8),
    "1.14": (18, 8),
    "1.15": (19, 8),
    "1.16": (19, 9),
    "1.17": (20, 9),
    "1.18": (21, 10),
    "1.19": (21, 10),
    "1.20": (21, 10),
}
# com.microsoft op -> first release with its CPU kernel. 8-bit MatMulNBits (int8 weights, the q4 format's lm_head)
# is its own entry (:func:`onnx_file_ops` lists it as ``MatMulNBits(bits=8)``): 1.17-1.21 refuse the node at load
# ("Only 4b quantization is supported"), 1.22 loads it and fails at run, 1.23 runs it (checked with PyPI wheels).
# The glue ops of kvexport.export.onnx_fuse: 1.17.3's wheel runs both, RotaryEmbedding on the 4-D input the rewrite
# gives it, equal to 1.32 within 6e-8 (older wheels not checked).
CONTRIB_OPS = {"MatMulNBits": "1.17", "MatMulNBits(bits=8)": "1.23", "SkipSimplifiedLayerNormalization": "1.17",
               "RotaryEmbedding": "1.17"}
ORT_FORMATS = {"5": "1.13", "6": "1.16"}  # ORT format version -> first release that reads it
ORT_LIBRARY_RELEASE = "1.18"  # our custom-op library asks the runtime for API ORT_API_VERSION (libkvexport_ort.so)
ORT_OPTIMIZATION = "basic"


def _v(version: str) -> tuple[int, ...]:
    """'1.16' / '1.16.3' / '1.20.0.dev1' -> (1, 16) for comparisons of releases."""
    try:
        return tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        raise KvxError(f"'{version}' is not an ONNX Runtime version; give it as MAJOR.MINOR, e.g. 1.16") from None


def installed_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _release_for(opset: int, ir_version: int) -> str | None:
    for release, (max_opset, max_ir) in ORT_RELEASES.items():
        if opset <= max_opset and ir_version <= max_ir:
            return release
    return None


@dataclass
class Compatibility:
    """What a program needs from ONNX Runtime: ``opsets`` per domain, ``ir_version``, the ai.onnx
    ops (with the opset that introduced their current version) and contrib ops, ORT format or not."""

    opsets: dict
    ir_version: int
    onnx_ops: dict = field(default_factory=dict)  # op type -> since_version at the model's opset
    contrib_ops: list = field(default_factory=list)
    ort_format: str | None = None  # ORT format version of an .ort program
    library_ops: list = field(default_factory=list)  # kvexport ops our custom-op library runs

    def requirements(self) -> list[tuple[str, str]]:
        """``(release, reason)`` for every requirement."""
        opset = self.opsets.get("ai.onnx", 1)
        out = [
            (
                _release_for(opset, self.ir_version) or _v_str(installed_version()),
                f"ai.onnx opset {opset}, IR version {self.ir_version}",
            )
        ]
        out += [(CONTRIB_OPS[op], f"com.microsoft {op}") for op in self.contrib_ops if op in CONTRIB_OPS]
        out += [
            (_v_str(installed_version()), f"com.microsoft {op}") for op in self.contrib_ops if op not in CONTRIB_OPS
        ]
        out += [(ORT_LIBRARY_RELEASE, f"kvexport::{op} ({ORT_LIB_NAME}, ONNX Runtime API {ORT_API_VERSION})")
                for op in self.library_ops]
        if self.ort_format:
            out.append(
                (ORT_FORMATS.get(self.ort_format, _v_str(installed_version())), f"ORT format v{self.ort_format}")
            )
        return out

    def min_version(self) -> str:
        return max((r for r, _ in self.requirements()), key=_v)

    def newer_than(self, version: str) -> str | None:
        """One line naming what ONNX Runtime ``version`` lacks, or None if it runs the program."""
        have = _v(version)
        too_new = [(r, why) for r, why in self.requirements() if _v(r) > have]
        if not too_new:
            return None
        supported = max((o for r, (o, _) in ORT_RELEASES.items() if _v(r) <= have), default=7)
        ops = sorted(op for op, since in self.onnx_ops.items() if since > supported)
        parts = [f"{why} (needs {r})" for r, why in too_new]
        if ops:
            parts.append(f"ops newer than opset {supported}: {', '.join(ops)}")
        return f"needs ONNX Runtime >= {self.min_version()}; " + "; ".join(parts)

    def to_manifest(self) -> dict:
        return {
            "opsets": self.opsets,
            "ir_version": self.ir_version,
            "min_ort_version": self.min_version(),
            "min_ort_version_reasons": [f"{why}: {r}" for r, why in self.requirements()],
        }


def _v_str(version: str) -> str:
    return ".".join(map(str, _v(version)))


def onnx_file_ops(path: Path) -> tuple[dict, int, dict]:
    """(opsets ``{domain: version}``, IR version, op types ``{domain: [..]}``) of an ONNX file; a MatMulNBits of
    other than 4 bits adds ``MatMulNBits(bits=N)`` (its own minimum release)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = {}
    for node in [*model.graph.node, *(n for f in model.functions for n in f.node)]:  # local functions' bodies too
        ops.setdefault(node.domain or "ai.onnx", set()).add(node.op_type)
        bits = [a.i for a in node.attribute if a.name == "bits"]
        if node.op_type == "MatMulNBits" and bits and bits[0] != 4:  # a later release than 4 bits (CONTRIB_OPS)
            ops[node.domain].add(f"MatMulNBits(bits={bits[0]})")
    return (
        {o.domain or "ai.onnx": o.version for o in model.opset_import},
        model.ir_version,
        {d: sorted(v) for d, v in ops.items()},
    )


def compatibility(opsets: dict, ir_version: int, ops: dict, ort_format: str | None = None) -> Compatibility:
    """``opsets`` ``{domain: version}``, ``ops`` ``{domain: [op types]}``; ``ort_format``: the ORT
    format version of an ``.ort`` program (None for ``.onnx``)."""
    from onnx import defs

    from kvexport.ops.onnx import LIBRARY_OPS

    opset = opsets.get("ai.onnx", 1)
    onnx_ops = {op: defs.get_schema(op, opset).since_version for op in ops.get("ai.onnx", ())}
    library = [op for op in ops.get("kvexport", ()) if op in LIBRARY_OPS]
    return Compatibility(
        dict(sorted(opsets.items())), ir_version, onnx_ops, sorted(ops.get("com.microsoft", ())), ort_format, library
    )


def stamp_min_ir_version(model) -> None:
    """Set ``model.ir_version`` (ModelProto) to the oldest IR its opsets allow: the exporter stamps the
    newest, which needlessly rules out older runtimes. Left alone if a tensor type of IR 9+ (float8,
    4-bit) appears, or a local function uses IR 10's overloads (ours do not)."""
    from onnx import TensorProto, helper

    graph = model.graph
    types = {t.data_type for t in graph.initializer}
    types |= {v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    types |= {a.t.data_type for n in graph.node for a in n.attribute if a.type == a.TENSOR}
    if types & {t for t in TensorProto.DataType.values() if t > TensorProto.BFLOAT16} or any(
        f.overload for f in model.functions
    ):
        return
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)


@contextlib.contextmanager
def quiet():
    """Silence the tools' progress chatter (stdout prints, INFO/WARNING log records) meanwhile;
    errors still raise."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


def describe_weights(weights: str) -> str:
    return {
        "fp32": "float32 weights",
        "int8": f"MatMul weights 8-bit, blocks of {NBITS_BLOCK}, symmetric (MatMulNBits), inputs int8 per block "
        "(accuracy level 4)",
        "int4": f"MatMul weights 4-bit, blocks of {NBITS_BLOCK}, symmetric (MatMulNBits), inputs int8 per block "
        "(accuracy level 4)",
        "q4": "the GGUF's Q4_1 / Q8_0 codes in MatMulNBits (4 / 8 bit, blocks of 32), exact, inputs int8 per "
        "block of 32 (accuracy level 4); the embedding reads the lm_head's 8-bit codes",
    }[weights]


def rotation_matmuls(model) -> list[str]:
    """Names of the MatMuls by the cache's Hadamard matrix (``--kv-rotate(-values)``; a ``[D, D]`` initializer of
    entries ``±1/sqrt(D)``, :func:`kvexport.kv.quant.hadamard`): weight quantizers must leave them alone (a
    quantized rotation would add its own error to every key or value). Unnamed ones are named here."""
    import numpy as np
    from onnx import numpy_helper

    square = {t.name: t for t in model.graph.initializer if len(t.dims) == 2 and t.dims[0] == t.dims[1]}
    hadamard = set()
    for name, t in square.items():
        w = numpy_helper.to_array(t)
        if np.allclose(np.abs(w), 1.0 / np.sqrt(w.shape[0]), rtol=1e-6, atol=0):
            hadamard.add(name)
    names = []
    for i, node in enumerate(model.graph.node):
        if node.op_type == "MatMul" and not node.domain and len(node.input) == 2 and node.input[1] in hadamard:
            node.name = node.name or f"kv_rotation_{i}"
            names.append(node.name)
    return names


def quantize_weights(src: Path, weights: str, library: bool = False):
    """Quantize the constant-weight MatMuls of the ONNX file ``src`` (all but :func:`rotation_matmuls`);
    returns the ModelProto. ``library``: the program runs with our custom-op library (``q4``'s block offsets
    become ``kvexport::block_offset`` nodes)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    keep = rotation_matmuls(model)
    if weights == "q4":
        from kvexport.export import onnx_q4

        if not onnx_q4.rewrite(model, keep, library=library)["q4_1"]:
            raise KvxError(
                "--weights q4 for onnx/ort needs a model whose linears hold Q4_1 codes (a Q4_1 GGUF); "
                "this one has none: use --weights int4 or fp32, or --target executorch (re-quantizes)"
            )
        return model
    # int8 / int4: 8- / 4-bit symmetric per block of 32 (MatMulNBits) at accuracy level 4, inputs int8 per block of
    # 32 as q4's (at level 0, fp32 inputs, ONNX Runtime has no fast 8-bit kernel: 166 against 12.5 ms/token for the
    # default model's int8 program at 128 tokens; both read the same codes). quantize_dynamic's
    # int8 MatMuls quantize each activation tensor with ONE scale, which the default model's outlier activations
    # (late down_proj inputs span -293..447) cannot take: its real-model program ran at median KL 0.15 per step.
    # The reference applies the same quantization (kvexport.models.weights.nbits_weights).
    with quiet():
        quantizer = MatMulNBitsQuantizer(
            model, bits=NBITS_FORMATS[weights], block_size=NBITS_BLOCK, is_symmetric=True, accuracy_level=4,
            op_types_to_quantize=("MatMul",), nodes_to_exclude=keep,
        )
        quantizer.process()
        return quantizer.model.model


def convert_to_ort(onnx_path: Path, out_dir: Path, custom_op_library: Path | None = None) -> tuple[Path, Path]:
    """``model.onnx`` -> ``model.ort`` and ``required_operators.config`` (for a reduced build) in ``out_dir``;
    ``custom_op_library``: the library a fused program's ``kvexport::`` ops need (ORT loads the graph to convert
    it)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    level = os.environ.get("ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL")
    os.environ["ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"] = ORT_OPTIMIZATION
    try:
        with quiet():
            convert_onnx_models_to_ort(
                onnx_path, output_dir=out_dir, optimization_styles=[OptimizationStyle.Fixed], target_platform="arm",
                custom_op_library_path=custom_op_library,
            )
    except Exception as err:  # the converter raises whatever ORT raised while loading the graph
        raise KvxError(
            f"ONNX Runtime could not convert {onnx_path.name} to ORT format ({str(err).splitlines()[0]})"
        ) from None
    finally:
        if level is None:
            del os.environ["ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"]
        else:
            os.environ["ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"] = level
    suffix = "" if ORT_OPTIMIZATION == "all" else f".{ORT_OPTIMIZATION}"
    ort_path = out_dir / f"{onnx_path.stem}{suffix}.ort"
    config = out_dir / f"{onnx_path.stem}.required_operators{suffix}.config"
    return ort_path.rename(out_dir / "model.ort"), config.rename(out_dir / "required_operators.config")


def read_required_operators(config: Path) -> dict:
    """``{domain: [op types]}`` from a ``required_operators.config`` (lines ``domain;since_version;Op1,Op2``)."""
    out = {}
    for line in config.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            domain, _, ops = line.strip().split(";")
            out.setdefault(domain, set()).update(ops.split(","))
    return {d: sorted(v) for d, v in sorted(out.items())}


def ort_file_info(path: Path) -> tuple[str, dict, int]:
    """(ORT format version, opsets ``{domain: version}``, IR version) recorded in an ``.ort`` file."""
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.InferenceSession import InferenceSession

    session = InferenceSession.GetRootAs(path.read_bytes(), 0)
    model = session.Model()
    opsets = {}
    for i in range(model.OpsetImportLength()):
        o = model.OpsetImport(i)
        opsets[(o.Domain() or b"").decode() or "ai.onnx"] = o.Version()
    return session.OrtVersion().decode(), opsets, model.IrVersion()


def custom_ops_library(name: str) -> Path:
    """The kvexport ONNX Runtime library a program's manifest names, built on first use; one-line
    :class:`KvxError` if it cannot be had."""
    if name != ORT_LIB_NAME:
        raise KvxError(f"this program needs the custom-op library {name}, which this kvexport does not provide; "
                       f"rebuild it with this kvexport")
    try:
        return build_ort_library()
    except BuildError as err:
        raise KvxError(f"this program runs kvexport ops (layer_attention, ...) from {name}: {err}") from None


def check_installed(manifest: dict) -> None:
    """:class:`KvxError` if the installed onnxruntime is older than the program needs."""
    need = manifest["onnx"]["min_ort_version"]
    have = installed_version()
    if _v(have) < _v(need):
        raise KvxError(
            f"this program needs ONNX Runtime >= {need} (installed {have}); upgrade onnxruntime "
            "or rebuild the program with this one"
        )
