"""Run a built program through the ExecuTorch runtime (Python bindings): the step interface the
reference :class:`kvexport.session.Session` also has, so parity and generation share one loop."""

from __future__ import annotations

from pathlib import Path

import torch

from kvexport.errors import KvxError
from kvexport.export.build import read_manifest


class ProgramRunner:
    """Loads ``graphs/<name>``; ``step(ids)`` commits a chunk and returns its last logits ``[V]``."""

    def __init__(self, program_dir: Path):
        self.dir = Path(program_dir)
        self.manifest = read_manifest(self.dir)
        self.path = self.dir / self.manifest["program"]
        if self.manifest["target"] != "executorch":
            raise KvxError(f"{self.dir} is a {self.manifest['target']} program; this runner takes executorch")
        from kvexport import ops

        if self.manifest["ops_mode"] == "fused":
            try:
                ops.load_executorch_kernels()
            except Exception as err:  # BuildError / KernelLibraryError carry one-line messages
                raise KvxError(f"{err}; or rebuild the program with --ops portable") from None
        self.max_context = self.manifest["cache"]["max_context"]
        self.max_chunk = self.manifest["cache"]["max_chunk"]
        self.reset()

    def reset(self) -> None:
        """Fresh state: a newly loaded method starts from the initial cache."""
        from executorch.runtime import Runtime

        from kvexport import ops

        try:
            # Load from the path: a program loaded from a bytes object must outlive the method, and
            # the runtime does not keep it alive (a segfault on the next execute otherwise).
            self.program = Runtime.get().load_program(self.path)
            self.method = self.program.load_method("forward")
        except RuntimeError as err:
            try:
                ops.raise_if_missing_kernel(err, self.path)
            except ops.KernelLibraryError as missing:
                raise KvxError(str(missing)) from None
            raise KvxError(f"ExecuTorch cannot load {self.path} ({str(err).splitlines()[0]}); rebuild it") from None
        self.pos = 0
        self.last_stats = None

    def step(self, ids: list[int]) -> torch.Tensor:
        if len(ids) > self.max_chunk:
            raise ValueError(f"chunk of {len(ids)} > max_chunk {self.max_chunk}")
        if self.pos + len(ids) > self.max_context:
            raise KvxError(f"{self.pos + len(ids)} tokens exceed the program's context of {self.max_context}; "
                           "rebuild with a larger --max-context")
        out = self.method.execute([torch.tensor([ids], dtype=torch.int64), torch.tensor([self.pos], dtype=torch.int64)])
        self.pos += len(ids)
        self.last_stats = out[1]
        return out[0][0]

    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Feed a prompt in chunks; returns the last token's logits ``[V]``."""
        logits = None
        for i in range(0, len(ids), self.max_chunk):
            logits = self.step(ids[i : i + self.max_chunk])
        return logits
