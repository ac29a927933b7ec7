"""Metrics of the ``regression`` task (torchmetrics, DDP-aware)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["RelativeMSE"]


class RelativeMSE(Metric):
    """Mean squared error over the variance of the targets, both over everything seen (all ranks).

    ``1.0`` is what predicting the targets' mean achieves; ``0.0`` is a perfect fit.  The variance is
    taken over all target entries (the population variance of the flattened targets)."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("sse", "sum_y", "sum_y2", "count"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        if preds.shape != target.shape:
            raise ValueError(f"RelativeMSE: preds {tuple(preds.shape)} and target {tuple(target.shape)} differ in shape")
        p, y = preds.detach().double(), target.detach().double()
        self.sse += (p - y).pow(2).sum()
        self.sum_y += y.sum()
        self.sum_y2 += y.pow(2).sum()
        self.count += y.numel()

    def compute(self) -> Tensor:
        n = self.count.clamp_min(1)
        var = (self.sum_y2 / n - (self.sum_y / n) ** 2).clamp_min(1e-30)
        return (self.sse / n / var).float()
