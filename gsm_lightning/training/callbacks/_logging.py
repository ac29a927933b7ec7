"""The logging step shared by the callbacks."""

from __future__ import annotations

from lightning.pytorch import Trainer


def log_step(trainer: Trainer) -> int:
    """The step Lightning's own logging uses (as ``LearningRateMonitor`` does): optimizer steps so far."""
    return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))
