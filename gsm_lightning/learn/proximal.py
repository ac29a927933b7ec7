"""The paper's proximal structure update, and the projection onto the budget (plain PyTorch).

After each real optimizer step::

    w <- clamp(softshrink(w, lambda * lr_structure), 0, 1)     (while the FLOPs ratio > target)
    l <- l mod 1

The FLOPs ratio is FLOPs-weighted over all non-frozen GBLR layers: sum of structured FLOPs over
sum of dense FLOPs (not a plain mean of widths).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.flops import bisect_threshold, flops_ratio, grid_cost
from ..core.layer import gblr_layers

__all__ = ["proximal_step", "project_model_to_budget"]


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

    hi = bisect_threshold(lambda tau: ratio_at(tau) <= target, 0.0, 1.0, iters)
    for m in layers:
        m.widths.copy_((m.widths - hi).clamp(0, 1))
    return hi


# Names this module exported before the split, importable from here for old code.
_MOVED = {"SigmaSchedule": ".schedules", "set_sigma": ".schedules", "cosine_warmup_lambda": ".schedules",
          "param_groups": ".groups", "gblr_layers": "..core.layer", "flops_ratio": "..core.flops"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name], __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
