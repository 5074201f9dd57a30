"""Quiet command-line output: a normal run prints our progress and results, not third-party noise.

:func:`configure` (``kvexport`` calls it before a command runs; ``--verbose`` skips it) silences:

* Python warnings of the FutureWarning / DeprecationWarning kind (torch pytree and torch.export
  notes), and UserWarnings raised inside torch, torchao, executorch, transformers and onnx;
* the log lines of the ``torch``, ``torchao``, ``executorch``, ``transformers`` and
  ``huggingface_hub`` loggers below ERROR (torchao's "Failed to load ..." lines at import, torch's
  pytree notes);
* Hugging Face progress bars (GGUF conversion, downloads): ``HF_HUB_DISABLE_PROGRESS_BARS=1``;
* native log lines written straight to file descriptor 2 inside :func:`native_stderr` blocks
  (ExecuTorch's ``[cpuinfo_utils.cpp:..]`` lines when a method loads and sets up its threadpool).

Errors still show: the loggers keep ERROR, and nothing of ours goes through them.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
import warnings
from contextlib import contextmanager

LOGGERS = ("torch", "torchao", "executorch", "transformers", "huggingface_hub")
NOISY_MODULES = r"(torch|torchao|executorch|transformers|onnx|onnxscript|huggingface_hub)(\.|$)"
_native_quiet = False  # set by configure()


def configure() -> None:
    """Silence third-party noise for the rest of the process (see the module docstring)."""
    global _native_quiet
    _native_quiet = True
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=NOISY_MODULES)
    _quiet_loggers()
    if "torch" not in sys.modules:  # importing torch resets the "torch" logger's level: again once it is imported
        sys.meta_path.insert(0, _AfterImport("torch", _quiet_loggers))


def _quiet_loggers() -> None:
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``then()`` right after module ``name`` is first imported (a torch-free command, ``kvexport run`` of an
    ONNX program, never imports it), then leaves ``sys.meta_path``."""

    def __init__(self, name: str, then):
        self.name, self.then = name, then

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        exec_module, then = spec.loader.exec_module, self.then

        def exec_then(module):
            exec_module(module)
            then()

        spec.loader.exec_module = exec_then
        return spec


@contextmanager
def native_stderr():
    """Drop what native code writes to file descriptor 2 inside the block, once :func:`configure`
    ran (a no-op otherwise, and so under ``--verbose``)."""
    if not _native_quiet:
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
