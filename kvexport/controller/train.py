"""Training the controller from measured per-token costs, and calibrating it to a bit budget.

Inputs per token: features ``x [N, 5]`` (as the cache computes them) and costs ``cost [N, 4]``: the
KL (nats, summed over later positions) attributed to the token at each class of ``CLASSES``
(16-bit costs 0), see :mod:`kvexport.controller.labels`.

Loss (per token, averaged), with ``p = softmax(logits)``:

    alpha * CE(logits, y_tau) + beta * sum_c p_c * bits_c + gamma * sum_c p_c * cost_c / cost_scale

``y_tau`` are the threshold labels (cheapest class with attributed KL <= ``tau``), ``bits_c`` the
class storage cost with metadata (2.5/4.5/8.5/16 at group 64), ``cost_scale`` the mean 2-bit cost.
``tau`` and ``beta / gamma`` come from the budget: ``tau`` is set so the labels' average pooled bits
equal the budget, ``beta / gamma`` is the Lagrange multiplier at which the per-token oracle
``argmin_c cost_c / cost_scale + lambda * bits_c`` meets it. After training, ``class_bias = -mu * bits``
with ``mu`` found by bisection makes the argmax decisions on calibration features meet the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvexport.controller.labels import labels_at
from kvexport.controller.model import Controller
from kvexport.kv.policy import CLASSES, FEATURES, class_bits


def pooled_target(budget_bits: float, max_context: int, sinks: int, window: int) -> float:
    """Average bits the pooled tokens must have so a full ``max_context`` cache averages ``budget_bits``
    (sinks and window at 16 bits)."""
    n_fp = min(sinks + window, max_context)
    n_pool = max_context - n_fp
    if n_pool <= 0:
        return 16.0
    return (budget_bits * max_context - 16.0 * n_fp) / n_pool


def avg_bits(choice: torch.Tensor, bits: torch.Tensor) -> float:
    return float(bits[choice].mean()) if choice.numel() else 0.0


def shares(choice: torch.Tensor) -> list[float]:
    n = max(choice.numel(), 1)
    return [float((choice == i).sum()) / n for i in range(len(CLASSES))]


def _bisect(fn, lo: float, hi: float, target: float, decreasing: bool, iters: int = 60) -> float:
    """x in [lo, hi] with fn(x) ~= target for a monotone fn (returns the closest end when out of range)."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        v = fn(mid)
        if (v > target) == decreasing:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def threshold_for(cost: torch.Tensor, bits: torch.Tensor, target: float) -> float:
    """Label threshold ``tau`` (nats) whose labels average ``target`` bits (larger tau: cheaper labels)."""
    lo, hi = -12.0, 8.0  # log10 tau
    lt = _bisect(lambda t: avg_bits(labels_at(cost[:, :3], 10**t), bits), lo, hi, target, decreasing=True)
    return 10**lt


def oracle_choice(cost: torch.Tensor, bits: torch.Tensor, lam: float) -> torch.Tensor:
    return (cost + lam * bits).argmin(dim=1)


def multiplier_for(cost_n: torch.Tensor, bits: torch.Tensor, target: float) -> float:
    """Lagrange multiplier ``lambda`` at which the per-token oracle meets ``target`` bits."""
    ll = _bisect(lambda t: avg_bits(oracle_choice(cost_n, bits, 10**t), bits), -8.0, 6.0, target, decreasing=True)
    return 10**ll


@dataclass
class TrainConfig:
    hidden: int = 16
    alpha: float = 1.0
    gamma: float = 1.0
    beta: float | None = None  # None: the oracle multiplier at the budget (times gamma)
    steps: int = 1500
    lr: float = 0.03
    weight_decay: float = 1e-4
    seed: int = 0
    drop_feature: int | None = None  # ablation: index of a feature the controller must ignore


def calibrate_bias(ctrl: Controller, x: torch.Tensor, bits: torch.Tensor, target: float) -> float:
    """Set ``class_bias = -mu * bits`` so argmax decisions on ``x`` average ``target`` bits; returns mu."""
    base = ctrl.class_bias.clone()

    def bits_at(mu: float) -> float:
        ctrl.class_bias.copy_(base - mu * bits)
        return avg_bits(ctrl(x), bits)

    with torch.no_grad():
        mu = _bisect(bits_at, -20.0, 20.0, target, decreasing=True)
        # the decision is a step function of mu: pick, among the bracket ends, the one closest to target
        cands = [mu - 1e-6, mu, mu + 1e-6]
        mu = min(cands, key=lambda m: abs(bits_at(m) - target))
        ctrl.class_bias.copy_(base - mu * bits)
    return mu


def train_controller(x: torch.Tensor, cost: torch.Tensor, *, target_bits: float, group: int,
                     cfg: TrainConfig, meta: dict | None = None) -> tuple[Controller, dict]:
    """Train + budget-calibrate a controller on features ``x [N, 5]`` and costs ``cost [N, 4]``.

    Returns the controller (metadata filled: features, classes, fractions, loss weights, budget) and
    a summary dict of the training set decisions.
    """
    torch.manual_seed(cfg.seed)
    bits = torch.tensor(class_bits(group), dtype=torch.float32)
    x = x.float()
    scale = float(cost[:, 0].clamp(min=0).mean()) or 1.0
    cost_n = cost / scale
    tau = threshold_for(cost, bits, target_bits)
    y = labels_at(cost[:, :3], tau)
    lam = multiplier_for(cost_n, bits, target_bits)
    beta = cfg.beta if cfg.beta is not None else lam * cfg.gamma

    ctrl = Controller(len(FEATURES), cfg.hidden, len(CLASSES))
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    keep = torch.ones(len(FEATURES))
    if cfg.drop_feature is not None:
        keep[cfg.drop_feature] = 0.0
    with torch.no_grad():
        ctrl.feat_mean.copy_(mean)
        ctrl.feat_std.copy_(std)
        ctrl.w1.normal_(0, 0.5)
        ctrl.w1.mul_(keep)
        ctrl.w2.normal_(0, 0.1)
    opt = torch.optim.Adam([ctrl.w1, ctrl.b1, ctrl.w2, ctrl.b2], lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in range(cfg.steps):
        logits = ctrl.logits(x)
        p = logits.softmax(-1)
        loss = (cfg.alpha * F.cross_entropy(logits, y) + beta * (p * bits).sum(-1).mean()
                + cfg.gamma * (p * cost_n).sum(-1).mean())
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():
            ctrl.w1.grad.mul_(keep)
        opt.step()
    with torch.no_grad():
        ctrl.w1.mul_(keep)  # exactly zero: the dropped feature cannot influence the decision
    mu = calibrate_bias(ctrl, x, bits, target_bits)
    with torch.no_grad():
        choice = ctrl(x)
        oracle = oracle_choice(cost_n, bits, lam)
        label_sh = shares(y)
    fr = shares(choice)
    summary = {
        "tokens": int(x.shape[0]),
        "target_pooled_bits": target_bits,
        "pooled_bits": avg_bits(choice, bits),
        "fractions": fr,
        "label_threshold_nats": tau,
        "label_shares": label_sh,
        "oracle_multiplier": lam,
        "bias_mu": mu,
        "final_loss": float(loss.detach()),
        # attributed KL (nats per token) of the decisions on calibration tokens: a cheap proxy
        "attributed_kl": {
            "learned": float(cost.gather(1, choice[:, None]).mean()),
            "oracle": float(cost.gather(1, oracle[:, None]).mean()),
            "oracle_pooled_bits": avg_bits(oracle, bits),
        },
        "label_accuracy": float((choice == y).float().mean()),
    }
    ctrl.meta = {
        **(meta or {}),
        "features": list(FEATURES),
        "classes": list(CLASSES),
        "fractions": fr,
        "loss": {"alpha": cfg.alpha, "beta": beta, "gamma": cfg.gamma,
                 "form": "alpha*CE(y_tau) + beta*E_p[bits] + gamma*E_p[attributed_KL]/cost_scale",
                 "cost_scale_nats": scale, "class_bits": bits.tolist()},
        "label_threshold_nats": tau,
        "bias_mu": mu,
        "hidden": cfg.hidden,
        "train_steps": cfg.steps,
        "dropped_feature": FEATURES[cfg.drop_feature] if cfg.drop_feature is not None else None,
        "calibration_pooled_bits": summary["pooled_bits"],
    }
    return ctrl, summary
