"""Schedules of phase 1: sigma annealing of the Gaudi masks, and the default learning-rate factor (plain PyTorch)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..core.layer import gblr_layers

__all__ = ["SigmaSchedule", "set_sigma", "cosine_warmup_lambda"]


@dataclass
class SigmaSchedule:
    """sigma0 until ``start_epoch``, then linear to sigma1 at ``end_epoch``, held after it (None = inf = pure
    Dirichlet; ``end_epoch=None``: the start of the last phase-1 epoch, see :meth:`resolved`).  Epochs may be fractional: GSMModule evaluates it after every optimizer step at
    ``steps / steps_per_epoch``, so sigma rises smoothly within epochs."""

    sigma0: float | None = 1.0
    sigma1: float | None = 100.0
    start_epoch: float = 0
    end_epoch: float | None = None

    def resolved(self, phase1_epochs: int) -> SigmaSchedule:
        """A copy with ``end_epoch=None`` filled in: the start of the last phase-1 epoch (``phase1_epochs - 1``; the
        end of phase 1 when it is one epoch long), so sigma1 is reached in phase 1 and the last phase-1 epoch trains
        near the boxcars it freezes to."""
        if self.end_epoch is not None:
            return SigmaSchedule(self.sigma0, self.sigma1, self.start_epoch, self.end_epoch)
        end = max(phase1_epochs - 1 if phase1_epochs > 1 else phase1_epochs, self.start_epoch)
        return SigmaSchedule(self.sigma0, self.sigma1, self.start_epoch, end)

    def __post_init__(self) -> None:
        for name in ("sigma0", "sigma1"):
            v = getattr(self, name)
            if v is not None and not float(v) > 0:
                raise ValueError(f"{name} must be > 0 or null (pure Dirichlet), got {v}")
        if self.start_epoch < 0 or (self.end_epoch is not None and self.end_epoch < self.start_epoch):
            raise ValueError(f"sigma schedule needs 0 <= start_epoch <= end_epoch, got {self.start_epoch}, {self.end_epoch}")

    def __call__(self, epoch: float) -> float:
        s0 = math.inf if self.sigma0 is None else float(self.sigma0)
        s1 = math.inf if self.sigma1 is None else float(self.sigma1)
        if self.end_epoch is None and s0 != s1:
            raise ValueError("SigmaSchedule(end_epoch=None) ends with phase 1: call .resolved(phase1_epochs) first")
        if s0 == s1:
            return s0
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
