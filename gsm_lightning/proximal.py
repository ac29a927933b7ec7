"""Proximal structure updates, parameter groups and schedules (plain PyTorch).

After each real optimizer step::

    w <- clamp(softshrink(w, lambda * lr_structure), 0, 1)     (while the FLOPs ratio > target)
    l <- l mod 1

The FLOPs ratio is FLOPs-weighted over all non-frozen GBLR layers: sum of structured FLOPs over
sum of dense FLOPs (not a plain mean of widths).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .flops import grid_cost, layers_flops
from .layer import GBLRLinear, gblr_layers

__all__ = [
    "gblr_layers",
    "flops_ratio",
    "proximal_step",
    "project_model_to_budget",
    "param_groups",
    "SigmaSchedule",
    "set_sigma",
    "cosine_warmup_lambda",
]


def flops_ratio(layers: Iterable[GBLRLinear]) -> float:
    """FLOPs-weighted ratio of structured to dense multiply-adds over ``layers`` (1.0 if none)."""
    return layers_flops(layers)["ratio"]


@torch.no_grad()
def proximal_step(model: nn.Module, lam: float, lr: float, target: float, shrink: bool = True) -> dict[str, float]:
    """One proximal update of all non-frozen GBLR layers of ``model``.

    Widths are soft-thresholded by ``lam * lr`` and clamped to [0, 1] while the FLOPs ratio is above
    ``target`` (and ``shrink`` is true); locations are always wrapped into [0, 1).  Returns the ratio
    before the step and whether the shrink was applied."""
    layers = [m for _, m in gblr_layers(model, include_frozen=False)]
    ratio = flops_ratio(layers)
    applied = bool(shrink and ratio > target and lam > 0)
    for layer in layers:
        if applied:
            layer.widths.copy_(F.softshrink(layer.widths, lam * lr).clamp(0, 1))
        else:
            layer.widths.clamp_(0, 1)
        layer.locations.copy_(torch.remainder(layer.locations, 1.0))
    return {"flops_ratio": ratio, "shrink": float(applied)}


@torch.no_grad()
def project_model_to_budget(model: nn.Module, target: float, iters: int = 60) -> float:
    """Lower all non-frozen widths by one common ``tau`` so the FLOPs-weighted ratio is <= ``target``.
    Returns ``tau`` (0 if already within budget)."""
    layers = [m for _, m in gblr_layers(model, include_frozen=False)]
    if not layers or flops_ratio(layers) <= target:
        return 0.0
    dense = sum(m.dense_flops() for m in layers)

    def ratio_at(tau: float) -> float:
        cost = sum(float(grid_cost((m.widths - tau).clamp(0, 1), m.in_features, m.out_features, m.rank_per_component))
                   for m in layers)
        return cost / dense

    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if ratio_at(mid) <= target:
            hi = mid
        else:
            lo = mid
    for m in layers:
        m.widths.copy_((m.widths - hi).clamp(0, 1))
    return hi


_NO_DECAY_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Embedding)


def param_groups(
    model: nn.Module, structure_lr: float, structure_betas: tuple[float, float] = (0.0, 0.999),
    widths_apart: bool = False,
) -> list[dict[str, Any]]:
    """AdamW groups, always in this order (so optimizer states stay loadable across phases):

    0. weights with weight decay (the optimizer's own ``weight_decay``);
    1. biases, norm and embedding parameters, 1-D tensors: ``weight_decay=0``;
    2. structure (widths, locations of non-frozen GBLR layers): ``lr=structure_lr``, ``betas=structure_betas``,
       ``weight_decay=0`` (empty once every layer is frozen);
    3. only with ``widths_apart``: the widths, taken out of group 2, with ``lr=0`` and no decay.  The
       optimizer then never moves them (a :class:`~gsm_lightning.budget_learner.BudgetLearner` does), but
       still clears, unscales and clips their gradients.
    """
    decay, no_decay, structure, widths = [], [], [], []
    seen: set[int] = set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, GBLRLinear) and pname in ("widths", "locations"):
                if not module.is_frozen:
                    (widths if widths_apart and pname == "widths" else structure).append(p)
                continue
            if not p.requires_grad:
                continue
            if isinstance(module, _NO_DECAY_TYPES) or p.ndim <= 1 or pname.endswith("bias"):
                no_decay.append(p)
            else:
                decay.append(p)
    return [
        {"params": decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        {"params": structure, "lr": structure_lr, "betas": tuple(structure_betas), "weight_decay": 0.0,
         "name": "structure"},
    ] + ([{"params": widths, "lr": 0.0, "betas": tuple(structure_betas), "weight_decay": 0.0, "name": "widths"}]
         if widths_apart else [])


@dataclass
class SigmaSchedule:
    """sigma0 until ``start_epoch``, then linear to sigma1 at ``end_epoch``, held after it (None = inf = pure
    Dirichlet).  Epochs may be fractional: GSMModule evaluates it after every optimizer step at
    ``steps / steps_per_epoch``, so sigma rises smoothly within epochs."""

    sigma0: float | None = 1.0
    sigma1: float | None = 100.0
    start_epoch: float = 0
    end_epoch: float = 1

    def __post_init__(self) -> None:
        for name in ("sigma0", "sigma1"):
            v = getattr(self, name)
            if v is not None and not float(v) > 0:
                raise ValueError(f"{name} must be > 0 or null (pure Dirichlet), got {v}")
        if self.start_epoch < 0 or self.end_epoch < self.start_epoch:
            raise ValueError(f"sigma schedule needs 0 <= start_epoch <= end_epoch, got {self.start_epoch}, {self.end_epoch}")

    def __call__(self, epoch: float) -> float:
        s0 = math.inf if self.sigma0 is None else float(self.sigma0)
        s1 = math.inf if self.sigma1 is None else float(self.sigma1)
        if epoch >= self.end_epoch:
            return s1
        if epoch <= self.start_epoch or s0 == s1:
            return s0
        if math.isinf(s0) or math.isinf(s1):
            return s1
        t = (epoch - self.start_epoch) / (self.end_epoch - self.start_epoch)
        return s0 + t * (s1 - s0)


def set_sigma(model: nn.Module, sigma: float | None) -> None:
    """Set sigma on every non-frozen GBLR layer."""
    for _, layer in gblr_layers(model, include_frozen=False):
        layer.set_sigma(sigma)


def cosine_warmup_lambda(warmup_steps: int, total_steps: int, min_factor: float = 0.0):
    """LambdaLR factor: linear warmup for ``warmup_steps`` then cosine decay to ``min_factor`` at ``total_steps``."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
