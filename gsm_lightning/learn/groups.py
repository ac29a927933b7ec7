"""The optimizer's parameter groups: weights, no-decay parameters, and the structure (plain PyTorch)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core.layer import GBLRLinear

__all__ = ["param_groups"]

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
