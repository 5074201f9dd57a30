"""The controller: a tiny MLP mapping a token's features to one of the precision classes.

File format (one ``.safetensors`` file; shapes, finite values and shares are checked at load):
tensors ``w1 [H, F]``, ``b1 [H]``, ``w2 [C, H]``, ``b2 [C]``, ``feat_mean [F]``, ``feat_std [F]``,
``class_bias [C]``; the header metadata key ``kvexport`` holds a JSON object with at least
``features`` (names, in order), ``classes`` (bit-widths, e.g. ``[2, 4, 8, 16]``) and ``fractions``
(the class shares measured on calibration text, used to size the cache pools), plus whatever
training recorded (budget, loss weights, data).
The decision is ``argmax(w2 @ tanh(w1 @ ((x - mean) / std) + b1) + b2 + class_bias)``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

TENSORS = ("w1", "b1", "w2", "b2", "feat_mean", "feat_std", "class_bias")


class Controller(nn.Module):
    """features float32 ``[N, F]`` -> class logits float32 ``[N, C]``."""

    def __init__(self, n_features: int, hidden: int, n_classes: int, meta: dict | None = None):
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(hidden, n_features))
        self.b1 = nn.Parameter(torch.zeros(hidden))
        self.w2 = nn.Parameter(torch.zeros(n_classes, hidden))
        self.b2 = nn.Parameter(torch.zeros(n_classes))
        self.register_buffer("feat_mean", torch.zeros(n_features))
        self.register_buffer("feat_std", torch.ones(n_features))
        self.register_buffer("class_bias", torch.zeros(n_classes))
        self.meta = dict(meta or {})

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        z = (feats - self.feat_mean) / self.feat_std
        return torch.tanh(z @ self.w1.T + self.b1) @ self.w2.T + self.b2 + self.class_bias

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Chosen class index int64 ``[N]``."""
        return self.logits(feats).argmax(dim=-1)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, path: Path) -> None:
        """Write the controller file (atomically: temp file, then rename)."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tensors = {name: getattr(self, name).detach().contiguous().clone() for name in TENSORS}
        save_file(tensors, str(tmp), metadata={"kvexport": json.dumps(self.meta, sort_keys=True)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "Controller":
        """Read a controller file; raises ``ValueError`` with a one-line reason when it is not one."""
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("kvexport", "{}"))
                tensors = {name: f.get_tensor(name) for name in TENSORS}
        except Exception as err:  # safetensors raises several types for corrupt or foreign files
            raise ValueError(f"{path} is not a kvexport controller file ({type(err).__name__}: {err})") from None
        for key in ("features", "classes", "fractions"):
            if not isinstance(meta, dict) or not isinstance(meta.get(key), list):
                raise ValueError(f"{path}: controller metadata lacks the list '{key}'")
        n_features, n_classes = len(meta["features"]), len(meta["classes"])
        hidden = tensors["w1"].shape[0] if tensors["w1"].dim() == 2 else 0
        shapes = {"w1": (hidden, n_features), "b1": (hidden,), "w2": (n_classes, hidden), "b2": (n_classes,),
                  "feat_mean": (n_features,), "feat_std": (n_features,), "class_bias": (n_classes,)}
        for name, shape in shapes.items():
            if tuple(tensors[name].shape) != shape or not tensors[name].is_floating_point():
                raise ValueError(f"{path}: controller tensor {name} is {tensors[name].dtype} "
                                 f"{list(tensors[name].shape)}, expected float {list(shape)}")
            if not torch.isfinite(tensors[name]).all():
                raise ValueError(f"{path}: controller tensor {name} has non-finite values")
        if not (tensors["feat_std"] > 0).all():
            raise ValueError(f"{path}: controller feat_std must be positive")
        fractions = meta["fractions"]
        # pool shares size the pools; they may over-provision (sum > 1) but must hold every pooled token
        if len(fractions) != n_classes or not all(isinstance(f, (int, float)) and 0 <= f <= 1 for f in fractions) \
                or sum(fractions) < 1 - 1e-3:
            raise ValueError(f"{path}: controller fractions {fractions} are not {n_classes} pool shares in [0, 1] "
                             "summing to at least 1")
        ctrl = cls(n_features, hidden, n_classes, meta)
        with torch.no_grad():
            for name in TENSORS:
                getattr(ctrl, name).copy_(tensors[name])
        return ctrl


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
