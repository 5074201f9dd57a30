"""Run a built program through its runtime: the step interface the reference
:class:`kvexport.session.Session` also has, so parity, bench and generation share one loop.

:func:`kvexport.export.runners.open_runner` picks the runner from the manifest's target. A runner
subclass only loads the program (``_load``) and executes one chunk (``_execute``); positions,
chunking and the context limit live here. At load, the program's own metadata
(``get_max_context_len``, ``get_max_seq_len``, ``get_vocab_size``) must agree with the manifest, whose
numbers the loop trusts; an ExecuTorch program's file header is checked before its bytes reach the
runtime (a corrupt file aborts it).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from kvexport.errors import KvxError
from kvexport.export.build import read_manifest


class StepRunner:
    """Loads ``graphs/<name>``; ``step(ids)`` commits a chunk and returns its last logits ``[V]``
    (float32); ``last_stats`` holds the program's ``kv_stats`` float32 ``[8]`` after each step."""

    targets: tuple[str, ...] = ()

    def __init__(self, program_dir: Path, manifest: dict | None = None):
        self.dir = Path(program_dir)
        self.manifest = manifest or read_manifest(self.dir)
        self.path = self.dir / self.manifest["program"]
        if self.manifest["target"] not in self.targets:
            raise KvxError(
                f"{self.dir} is a {self.manifest['target']} program; this runner takes {', '.join(self.targets)}"
            )
        self.max_context = self.manifest["cache"]["max_context"]
        self.max_chunk = self.manifest["cache"]["max_chunk"]
        self.reset()
        self._check_metadata(self._metadata())

    CHECKED_METADATA = ("get_max_context_len", "get_max_seq_len", "get_vocab_size")

    def _check_metadata(self, program: dict) -> None:
        """``program``: the loaded program's own constant values; each must equal the manifest's."""
        for key in self.CHECKED_METADATA:
            want = self.manifest["metadata"].get(key)
            if program.get(key) != want:
                raise KvxError(
                    f"{self.dir / 'manifest.json'} says {key}={want} but the program says "
                    f"{program.get(key)}; the manifest was edited or belongs to another program; rebuild"
                )

    def reset(self) -> None:
        """Fresh state: the initial cache, position 0."""
        self._load()
        self.pos = 0
        self.last_stats = None

    def step(self, ids: list[int]) -> torch.Tensor:
        if len(ids) > self.max_chunk:
            raise ValueError(f"chunk of {len(ids)} > max_chunk {self.max_chunk}")
        if self.pos + len(ids) > self.max_context:
            raise KvxError(
                f"{self.pos + len(ids)} tokens exceed the program's context of {self.max_context}; "
                "rebuild with a larger --max-context"
            )
        logits, stats = self._execute(
            torch.tensor([ids], dtype=torch.int64), torch.tensor([self.pos], dtype=torch.int64)
        )
        self.pos += len(ids)
        self.last_stats = stats
        return logits[0]

    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Feed a prompt in chunks; returns the last token's logits ``[V]``."""
        logits = None
        for i in range(0, len(ids), self.max_chunk):
            logits = self.step(ids[i : i + self.max_chunk])
        return logits

    def _load(self) -> None:
        raise NotImplementedError

    def _metadata(self) -> dict:
        """The loaded program's constant methods (:data:`CHECKED_METADATA` at least) as ints."""
        raise NotImplementedError

    def _execute(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens int64 [1, T], input_pos int64 [1] -> (logits float32 [1, V], kv_stats float32 [8])."""
        raise NotImplementedError


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
        out = execute(self.method, [tokens, input_pos])
        return out[0], out[1]


@contextlib.contextmanager
def one_torch_thread():
    """One torch thread meanwhile, for every runner's step (ExecuTorch's and ONNX Runtime's programs have their own
    thread pools, sized by :func:`kvexport.bench.set_threads`). The runners hand back logits as torch copies, and torch
    copies a ``[1, V]`` tensor in an OpenMP loop: with more torch threads, libgomp's worker then spins on a core that
    the runtime's own pool needs for the next step (ExecuTorch, perf: a quarter of the samples of a 2-thread decode
    loop, 25 -> 19 ms/token for the default program at 128 tokens; ONNX Runtime: the reason its spinning workers
    lost to sleeping ones, README)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
