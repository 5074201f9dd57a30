"""KV precision policies: which class (2-, 4-, 8-bit or full precision) a token gets when it leaves
the recent window. One spec grammar everywhere (``--kv-policy``):

  ``fp32``                 every token full precision, stored as float32 (the parity baseline)
  ``fp16``                 every token float16
  ``static-2|4|8``         every token (outside sinks and window) at that bit-width
  ``static-k<b>v<c>``      every token in the class with ``b``-bit keys, its values at ``c <= b`` bits (e.g.
                           ``static-k4v2``; the class's value bits for the whole cache, as ``--kv-classes k4v2``)
  ``random:B``             seeded random classes whose shares give ``B`` average bits per element
                           over a full ``max_context`` cache (sinks and window counted at 16 bits)
  ``random:f2,f4,f8,f16``  seeded random classes with these shares
  ``rule``                 the documented heuristic of :class:`RulePolicy`
  ``learned[:FILE]``       a trained controller (default: the committed one for the model)

Every policy is an ``nn.Module`` mapping features ``[N, 5]`` (see ``FEATURES``) and positions
``[N]`` to a class index int64 ``[N]`` into ``CLASSES``, written with export-friendly ops only, and
carries the class ``fractions`` used to size the cache pools.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kvexport.controller.model import Controller
from kvexport.kv import quant

CLASSES = (2, 4, 8, 16)
FEATURES = ("rarity", "entropy", "max_prob", "attn_received", "attn_head_var")


@dataclass(frozen=True)
class PolicySpec:
    """A parsed ``--kv-policy`` value."""

    kind: str  # fp32 | fp16 | static | random | rule | learned
    text: str
    bits: int = 16
    budget_bits: float | None = None
    fractions: tuple[float, ...] | None = None
    path: str | None = None
    seed: int = 0
    classes: str | None = None  # static-k<b>v<c>: that class's --kv-classes entry


_SPEC_HELP = ("use fp32, fp16, static-2|4|8, static-k<b>v<c> (e.g. static-k4v2), random:B, random:f2,f4,f8,f16, rule "
              "or learned[:FILE]")


def parse_policy(text: str, seed: int = 0) -> PolicySpec:
    """Parse a policy spec; raises ``ValueError`` with a one-line message when it is invalid."""
    t = text.strip()
    if t in ("fp32", "fp16"):
        return PolicySpec(t, t, bits=16)
    if m := re.fullmatch(r"static-(\d+)", t):
        bits = int(m.group(1))
        if bits not in quant.SUPPORTED_BITS:
            raise ValueError(f"invalid policy '{t}': static bit-width must be 2, 4 or 8")
        return PolicySpec("static", t, bits=bits)
    if m := re.fullmatch(r"static-(k\d+v\d+)", t):
        try:
            quant.parse_classes(m.group(1))
        except ValueError:
            raise ValueError(f"invalid policy '{t}': keys at 2, 4 or 8 bits and values at no more bits than keys, "
                             "e.g. static-k4v2") from None
        return PolicySpec("static", t, bits=int(m.group(1)[1:].split("v")[0]), classes=m.group(1))
    if t.startswith("random:"):
        body = t.split(":", 1)[1]
        nums = body.split(",")
        try:
            vals = [float(x) for x in nums]
        except ValueError:
            raise ValueError(f"invalid policy '{t}': {_SPEC_HELP}") from None
        if len(vals) == 1:
            if not 2 <= vals[0] <= 16:
                raise ValueError(f"invalid policy '{t}': average bits must lie in [2, 16]")
            return PolicySpec("random", t, budget_bits=vals[0], seed=seed)
        if len(vals) != 4 or min(vals) < 0 or not math.isclose(sum(vals), 1.0, abs_tol=1e-6):
            raise ValueError(f"invalid policy '{t}': random shares need 4 non-negative values summing to 1")
        return PolicySpec("random", t, fractions=tuple(vals), seed=seed)
    if t == "rule":
        return PolicySpec("rule", t)
    if t == "learned" or t.startswith("learned:"):
        path = t.split(":", 1)[1] if ":" in t else None
        return PolicySpec("learned", t, path=path or None)
    raise ValueError(f"invalid policy '{t}': {_SPEC_HELP}")


def class_bits(group: int, value_bits: tuple[int, ...] = quant.EQUAL_VALUE_BITS) -> list[float]:
    """Bits per element of each class, metadata included, keys and values averaged (e.g. 2.5, 4.5, 8.5, 16
    for group 64; the 4-bit-key class with 2-bit values, ``--kv-classes k4v2``: 3.5)."""
    vb = [*value_bits, 16]  # CLASSES order
    return [(quant.bits_per_element(b, group) + quant.bits_per_element(v, group)) / 2 for b, v in zip(CLASSES, vb)]


def fractions_for_budget(budget_bits: float, group: int, pool_share: float,
                         value_bits: tuple[int, ...] = quant.EQUAL_VALUE_BITS) -> tuple[float, ...]:
    """Class shares of pooled tokens mixing the two classes that bracket the budget.

    ``budget_bits`` is the target average over a full cache, in which a share ``1 - pool_share`` of
    the tokens (sinks and window) is at 16 bits; the pooled tokens make up the rest.
    """
    target = 16.0 if pool_share <= 0 else (budget_bits - 16.0 * (1 - pool_share)) / pool_share
    bits = class_bits(group, value_bits)
    if target < bits[0] - 1e-9:
        floor = bits[0] * pool_share + 16.0 * (1 - pool_share)
        raise ValueError(f"budget {budget_bits} bits is below the minimum {floor:.2f} for this layout")
    fr = [0.0] * len(CLASSES)
    if target >= bits[-1]:
        fr[-1] = 1.0
        return tuple(fr)
    i = max(j for j in range(len(bits) - 1) if bits[j] <= target)
    hi = (target - bits[i]) / (bits[i + 1] - bits[i])
    fr[i], fr[i + 1] = 1.0 - hi, hi
    return tuple(fr)


class Policy(nn.Module):
    """Base: subclasses set ``fractions`` (pool sizing) and ``needs_features``."""

    needs_features = False
    fractions: tuple[float, ...] = (0.0, 0.0, 0.0, 1.0)

    def describe(self) -> dict:
        return {"fractions": list(self.fractions)}


class FixedClass(Policy):
    """Every token gets one class (fp16/fp32: class 16; static-b: class b)."""

    def __init__(self, bits: int):
        super().__init__()
        self.index = CLASSES.index(bits)
        self.fractions = tuple(1.0 if i == self.index else 0.0 for i in range(len(CLASSES)))

    def forward(self, feats: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return torch.full_like(pos, self.index)


class RandomPolicy(Policy):
    """Class drawn from a seeded hash of the token position, so every backend draws the same."""

    def __init__(self, fractions: tuple[float, ...], seed: int):
        super().__init__()
        self.fractions = tuple(fractions)
        self.seed = seed
        cum = torch.tensor(fractions, dtype=torch.float64).cumsum(0)[:-1].float()
        self.register_buffer("cum", cum, persistent=False)

    def uniform(self, pos: torch.Tensor) -> torch.Tensor:
        """pos int64 ``[N]`` -> float32 in [0, 1): two rounds of a multiplicative hash mod 2**32."""
        h = (pos * 2654435761 + (self.seed * 40503 + 12345)) % 4294967296
        h = (h * 1597334677 + 1013904223) % 4294967296
        return torch.div(h, 256, rounding_mode="floor").float() / 16777216.0

    def forward(self, feats: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return (self.uniform(pos).unsqueeze(-1) >= self.cum).sum(-1)

    def describe(self) -> dict:
        return {"fractions": list(self.fractions), "seed": self.seed}


class RulePolicy(Policy):
    """Documented heuristic (no training): keep what attention or rarity marks as important.

    * 8-bit when the token received at least 2x uniform attention while in the window, or is rare
      (smoothed frequency below 1e-5, rarity >= 11.5);
    * 2-bit when it received under 0.5x uniform attention and is common (frequency above 1e-3,
      rarity < 6.9);
    * 4-bit otherwise.
    """

    needs_features = True
    fractions = (0.45, 0.45, 0.10, 0.0)
    ATTN_HIGH, ATTN_LOW = 2.0, 0.5
    RARE, COMMON = math.log(1e5), math.log(1e3)

    def forward(self, feats: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        rarity, attn = feats[:, 0], feats[:, 3]
        high = (attn >= self.ATTN_HIGH) | (rarity >= self.RARE)
        low = (attn < self.ATTN_LOW) & (rarity < self.COMMON)
        four = torch.full_like(pos, CLASSES.index(4))
        return torch.where(high, CLASSES.index(8), torch.where(low, CLASSES.index(2), four))


class LearnedPolicy(Policy):
    """A trained :class:`Controller`; its class list is mapped onto ``CLASSES``."""

    needs_features = True

    def __init__(self, controller: Controller, source: str):
        super().__init__()
        meta = controller.meta
        if list(meta["features"]) != list(FEATURES):
            raise ValueError(f"{source}: controller features {meta['features']} differ from {list(FEATURES)}")
        if not set(meta["classes"]) <= set(CLASSES):
            raise ValueError(f"{source}: controller classes {meta['classes']} not within {CLASSES}")
        self.controller = controller
        self.source = source
        self.register_buffer("to_class", torch.tensor([CLASSES.index(c) for c in meta["classes"]]), persistent=False)
        fr = [0.0] * len(CLASSES)
        for c, f in zip(meta["classes"], meta["fractions"]):
            fr[CLASSES.index(c)] = float(f)
        self.fractions = tuple(fr)

    def forward(self, feats: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.to_class[self.controller(feats)]

    def describe(self) -> dict:
        return {"fractions": list(self.fractions), "controller": self.source, "meta": self.controller.meta}


def build_policy(spec: PolicySpec, group: int, pool_share: float, default_controller: Path | None,
                 value_bits: tuple[int, ...] = quant.EQUAL_VALUE_BITS) -> Policy:
    """Instantiate the policy of ``spec``. ``pool_share`` = pooled tokens / max_context; ``value_bits``: the
    classes' (``--kv-classes``), which set what ``random:B``'s budget buys."""
    if spec.kind in ("fp32", "fp16"):
        return FixedClass(16)
    if spec.kind == "static":
        return FixedClass(spec.bits)
    if spec.kind == "random":
        fr = spec.fractions or fractions_for_budget(spec.budget_bits, group, pool_share, value_bits)
        return RandomPolicy(fr, spec.seed)
    if spec.kind == "rule":
        return RulePolicy()
    path = Path(spec.path) if spec.path else default_controller
    if spec.path and not path.is_file():
        raise ValueError(f"controller file not found: {spec.path}; train one with 'kvexport calibrate' or pass "
                         "learned:FILE")
    if path is None or not path.is_file():
        budget = path.stem.removeprefix("controller-") if path else "?"
        found = sorted(p.stem.removeprefix("controller-") for p in path.parent.glob("controller-*.safetensors")) \
            if path else []
        raise ValueError(f"no committed controller for a budget of {budget} bits ({path}); committed budgets: "
                         f"{', '.join(found) or 'none'}; pass --kv-budget-bits one of them, train one with "
                         f"'kvexport calibrate --kv-budget-bits {budget}', or pass learned:FILE")
    return LearnedPolicy(Controller.load(path), str(path))
