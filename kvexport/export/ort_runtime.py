"""Run ``onnx`` / ``ort`` programs on ONNX Runtime (CPU execution provider), in a process without torch.

The cache state lives in preallocated CPU buffers (``OrtValue``\\ s over numpy arrays), bound once. The parts a
``--ops fused`` program's kernel writes in place (manifest ``state_in_place``) have one buffer, bound as the input of
every step; those the graph updates with a ``ScatterND`` after every reader (manifest ``state_aliased``: the pools)
have one buffer, bound as both input and output, so ONNX Runtime writes the new rows without copying the pool first.
Any other part has two: each step binds one as the ``state.*`` input and the other as the ``new_state.*`` output, then
swaps them, so state never round-trips through Python. The initial state is read from its file at each reset, not
kept. Such a program needs our custom-op library (manifest ``custom_ops_library``), registered with the session.
``logits`` and ``kv_stats`` are written into preallocated numpy arrays and returned as copies.

Nothing here imports torch (nor does anything it imports): ``kvexport run`` of an ONNX program is the session, numpy
and the tokenizer (README, "Where the ``run`` RSS goes").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kvexport import threads
from kvexport.errors import KvxError
from kvexport.export import ort_tools
from kvexport.export.ort_tools import STATE_IN, STATE_OUT
from kvexport.export.runtime import StepRunner


class OrtRunner(StepRunner):
    targets = ("onnx", "ort")

    def __init__(self, program_dir: Path, manifest: dict | None = None):
        self.session = None
        super().__init__(program_dir, manifest)

    def _open(self, initial: dict[str, np.ndarray]) -> None:
        """The session, the state buffers shaped like ``initial`` and the two bindings."""
        import onnxruntime as ort

        ort_tools.check_installed(self.manifest)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads.count()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        library = self.manifest["onnx"].get("custom_ops_library")
        if library:
            opts.register_custom_ops_library(str(ort_tools.custom_ops_library(library)))
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise KvxError(
                f"ONNX Runtime cannot load {self.path} ({str(err).splitlines()[0][:200]}); rebuild it"
            ) from None
        self.names = list(initial)
        aliased = set(self.manifest["onnx"].get("state_aliased", ()))
        single = set(self.manifest["onnx"].get("state_in_place", ())) | aliased
        first = {n: np.empty_like(a) for n, a in initial.items()}
        self.buffers = [first, {n: first[n] if n in single else np.empty_like(a) for n, a in initial.items()}]
        vocab = self.manifest["metadata"]["get_vocab_size"]
        self.logits = np.empty((1, vocab), dtype=np.float32)
        self.stats = np.empty(8, dtype=np.float32)
        # Two bindings prepared once: bindings[i] reads buffer set i and writes set 1 - i (one buffer for the parts
        # in ``single``: the kernel's in-place parts have no output), so a step only binds its tokens and position.
        values = [{n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in bufs.items()} for bufs in self.buffers]
        self.bindings = []
        for src, dst in ((0, 1), (1, 0)):
            b = self.session.io_binding()
            b.bind_output("logits", "cpu", 0, np.float32, list(self.logits.shape), self.logits.ctypes.data)
            b.bind_output("kv_stats", "cpu", 0, np.float32, list(self.stats.shape), self.stats.ctypes.data)
            for name in self.names:
                b.bind_ortvalue_input(STATE_IN + name, values[src][name])
                if name not in single or name in aliased:
                    b.bind_ortvalue_output(STATE_OUT + name, values[dst][name])
            self.bindings.append(b)

    def _load(self) -> None:
        """Fresh state: the initial values (read from their file) into buffer set 0, which the next step reads."""
        from safetensors.numpy import load_file

        initial = load_file(str(self.dir / self.manifest["onnx"]["initial_state"]))
        if self.session is None:
            self._open(initial)
        for name, value in initial.items():
            np.copyto(self.buffers[0][name], value)
        self.current = 0

    def _metadata(self) -> dict:
        """The constants ``write_program`` stored in the model's ``kvexport.metadata`` property."""
        stored = self.session.get_modelmeta().custom_metadata_map.get("kvexport.metadata")
        try:
            return json.loads(stored) if stored else {}
        except json.JSONDecodeError:
            return {}

    def _execute(self, tokens, input_pos):
        b = self.bindings[self.current]
        b.bind_cpu_input("tokens", tokens)
        b.bind_cpu_input("input_pos", input_pos)
        self.session.run_with_iobinding(b)
        self.current = 1 - self.current
        return self.logits.copy(), self.stats.copy()
