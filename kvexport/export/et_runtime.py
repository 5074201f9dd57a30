"""Run ``.pte`` programs through the ExecuTorch Python runtime (:class:`ExecuTorchRunner`), and the helpers
``export_llama``'s runner shares: one torch thread around every step, the program's constant methods.

The pybindings take and return torch tensors (and import torch); the step interface is numpy
(:class:`kvexport.export.runtime.StepRunner`): tokens are wrapped with ``torch.from_numpy``, outputs
returned as ``.numpy()`` views of the clones the runtime hands back.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from kvexport import threads
from kvexport.errors import KvxError
from kvexport.export.manifest import read_manifest
from kvexport.export.runtime import StepRunner

_pool_threads: int | None = None  # the count ExecuTorch's pool was last sized to (size_pool)


def size_pool() -> None:
    """Size ExecuTorch's own thread pool (XNNPACK's, which ``torch.set_num_threads`` does not reach: it keeps one
    thread per core otherwise) to :func:`kvexport.threads.count`, before a program loads. An XNNPACK delegate keeps
    the pool it was initialised with, so the pool is reset only when the count changed since the last load."""
    global _pool_threads
    if threads.count() != _pool_threads:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        from kvexport import quiet

        with quiet.native_stderr():  # the reset's cpuinfo / threadpool log lines
            _unsafe_reset_threadpool(threads.count())
        _pool_threads = threads.count()


class ExecuTorchRunner(StepRunner):
    """``.pte`` programs through the ExecuTorch Python runtime (our kernels loaded for fused ones)."""

    targets = ("executorch",)

    def __init__(self, program_dir: Path, manifest: dict | None = None):
        from kvexport import ops

        manifest = manifest or read_manifest(Path(program_dir))
        if manifest["ops_mode"] == "fused" and manifest["target"] == "executorch":
            try:
                ops.load_executorch_kernels()
            except Exception as err:  # BuildError / KernelLibraryError carry one-line messages
                raise KvxError(f"{err}; or rebuild the program with --ops portable") from None
        super().__init__(program_dir, manifest)

    def _load(self) -> None:
        from executorch.runtime import Runtime

        from kvexport import ops, quiet
        from kvexport.export.executorch import check_pte_header

        check_pte_header(self.path)
        size_pool()
        try:
            # Load from the path: a program loaded from a bytes object must outlive the method, and
            # the runtime does not keep it alive (a segfault on the next execute otherwise).
            self.program = Runtime.get().load_program(self.path)
            with quiet.native_stderr():  # the threadpool set-up's cpuinfo lines
                self.method = self.program.load_method("forward")
        except RuntimeError as err:
            try:
                ops.raise_if_missing_kernel(err, self.path)
            except ops.KernelLibraryError as missing:
                raise KvxError(str(missing)) from None
            raise KvxError(f"ExecuTorch cannot load {self.path} ({str(err).splitlines()[0]}); rebuild it") from None

    def _metadata(self) -> dict:
        return program_constants(self.program)

    def _execute(self, tokens, input_pos):
        out = execute(self.method, [torch.from_numpy(tokens), torch.from_numpy(input_pos)])
        return out[0].numpy(), out[1].numpy()


@contextlib.contextmanager
def one_torch_thread():
    """One torch thread meanwhile, for every ExecuTorch step (the program has its own thread pool,
    :func:`size_pool`). The pybindings hand back outputs as torch clones, and torch copies a ``[1, V]`` tensor in an
    OpenMP loop: with more torch threads, libgomp's worker then spins on a core that the runtime's own pool needs for
    the next step (perf: a quarter of the samples of a 2-thread decode loop, 25 -> 19 ms/token for the default program
    at 128 tokens). The ONNX Runtime runner needs none of this: it copies its outputs with numpy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def execute(method, inputs: list) -> list:
    """``method.execute(inputs)`` for every ExecuTorch runner (ours and ``export_llama``'s), with
    :func:`one_torch_thread` (the pybindings return clones made by torch)."""
    with one_torch_thread():
        return method.execute(inputs)


def program_constants(program) -> dict:
    """An ExecuTorch program's constant methods (every method but ``forward``) as JSON values: one
    int each, a list for ``get_eos_ids``."""
    out = {}
    for name in sorted(program.method_names):
        if name == "forward":
            continue
        vals = []
        for v in program.load_method(name).execute([]):
            vals.extend(v.flatten().tolist() if isinstance(v, torch.Tensor) else [v])
        out[name] = vals if name == "get_eos_ids" or len(vals) != 1 else vals[0]
    return out
