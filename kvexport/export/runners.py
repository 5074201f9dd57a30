"""The runner registry: which :class:`~kvexport.export.runtime.StepRunner` runs a program, by the
manifest's ``target``. The runner modules import the base class; only this module knows them all."""

from __future__ import annotations

from pathlib import Path

from kvexport.errors import KvxError
from kvexport.export.manifest import read_manifest
from kvexport.export.runtime import StepRunner


def runner_class(target: str) -> type[StepRunner]:
    if target == "executorch":
        from kvexport.export.et_runtime import ExecuTorchRunner

        return ExecuTorchRunner
    if target in ("onnx", "ort"):
        from kvexport.export.ort_runtime import OrtRunner

        return OrtRunner
    if target == "executorch-llama":
        from kvexport.baselines.executorch_llama import ExecuTorchLlamaRunner

        return ExecuTorchLlamaRunner
    if target == "ort-genai":
        from kvexport.baselines.ortgenai import OrtGenaiRunner

        return OrtGenaiRunner
    if target == "llama.cpp":
        from kvexport.baselines.llamacpp import LlamaCppRunner

        return LlamaCppRunner
    raise KvxError(f"no runner for target '{target}'; rebuild the program with this kvexport")


def open_runner(program_dir: Path, manifest: dict | None = None) -> StepRunner:
    """The runner for a program directory, chosen by its manifest's target (``manifest``: read already)."""
    manifest = manifest or read_manifest(Path(program_dir))
    return runner_class(manifest["target"])(program_dir, manifest)
