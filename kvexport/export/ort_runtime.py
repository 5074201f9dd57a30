"""Run ``onnx`` / ``ort`` programs on ONNX Runtime (CPU execution provider).

The cache state lives in two preallocated sets of CPU buffers (``OrtValue``\\ s over numpy arrays):
each step binds one set as the ``state.*`` inputs and the other as the ``new_state.*`` outputs,
then swaps them, so state never round-trips through Python. The parts a ``--ops fused`` program's kernel
writes in place (manifest ``state_in_place``) have one buffer, bound as the input of every step; those the graph
updates with a ``ScatterND`` after every reader (manifest ``state_aliased``: the pools) have one buffer, bound as
both input and output, so ONNX Runtime writes the new rows without copying the pool first. Such a
program needs our custom-op library (manifest ``custom_ops_library``), registered with the session.
``logits`` and ``kv_stats`` are written into preallocated torch tensors and returned as copies.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from kvexport.errors import KvxError
from kvexport.export import ort_tools
from kvexport.export.onnx import STATE_IN, STATE_OUT
from kvexport.export.runtime import StepRunner, one_torch_thread


class OrtRunner(StepRunner):
    targets = ("onnx", "ort")

    def __init__(self, program_dir: Path, manifest: dict | None = None):
        self.session = None
        super().__init__(program_dir, manifest)

    def _open(self) -> None:
        import onnxruntime as ort
        from safetensors.numpy import load_file

        ort_tools.check_installed(self.manifest)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
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
        state_file = self.dir / self.manifest["onnx"]["initial_state"]
        self.initial = load_file(str(state_file))
        self.names = list(self.initial)
        self.buffers = [{n: np.empty_like(a) for n, a in self.initial.items()} for _ in range(2)]
        self.values = [{n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in bufs.items()} for bufs in self.buffers]
        vocab = self.manifest["metadata"]["get_vocab_size"]
        self.logits = torch.empty(1, vocab, dtype=torch.float32)
        self.stats = torch.empty(8, dtype=torch.float32)
        # Two bindings prepared once: bindings[i] reads buffer set i and writes set 1 - i, so a step
        # only binds its tokens and position.
        self.bindings = []
        in_place = set(self.manifest["onnx"].get("state_in_place", ()))
        aliased = set(self.manifest["onnx"].get("state_aliased", ()))
        for src, dst in ((0, 1), (1, 0)):
            b = self.session.io_binding()
            b.bind_output("logits", "cpu", 0, np.float32, list(self.logits.shape), self.logits.data_ptr())
            b.bind_output("kv_stats", "cpu", 0, np.float32, list(self.stats.shape), self.stats.data_ptr())
            for name in self.names:
                if name in in_place or name in aliased:  # one buffer: written in place by the kernel / ScatterND
                    b.bind_ortvalue_input(STATE_IN + name, self.values[0][name])
                    if name in aliased:
                        b.bind_ortvalue_output(STATE_OUT + name, self.values[0][name])
                    continue
                b.bind_ortvalue_input(STATE_IN + name, self.values[src][name])
                b.bind_ortvalue_output(STATE_OUT + name, self.values[dst][name])
            self.bindings.append(b)

    def _load(self) -> None:
        """Fresh state: the initial values into buffer set 0, which the next step reads."""
        if self.session is None:
            self._open()
        for name, value in self.initial.items():
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
        b.bind_cpu_input("tokens", tokens.numpy())
        b.bind_cpu_input("input_pos", input_pos.numpy())
        with one_torch_thread():  # ONNX Runtime's workers spin between parallel sections: no OpenMP worker beside them
            self.session.run_with_iobinding(b)
            self.current = 1 - self.current
            return self.logits.clone(), self.stats.clone()
