"""StructureMonitor: scalars of the learned structure for every logger, and a TensorBoard custom-scalars layout."""

from __future__ import annotations

import re
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ...report.structure import (
    structure_metrics,
)
from ._logging import log_step

__all__ = ["StructureMonitor", "custom_scalars_layout"]


def custom_scalars_layout(prefix: str = "structure") -> dict[str, dict[str, list]]:
    """TensorBoard custom-scalars layout (``SummaryWriter.add_custom_scalars``) for the tags of
    :func:`structure_metrics` under ``prefix``: the FLOPs ratio with its target, path target and phase-1 end
    ratio in one chart, the FLOPs ratio and the widths per layer type, sigma, the phase, the projection at the
    switch, the mean widths and the effective rank.  Tags are regular expressions."""
    p = re.escape(prefix)
    by_type = rf"^{p}/by_type/[^/]+"
    return {
        "GSM: FLOPs and schedule": {
            "FLOPs ratio vs target (flops_ratio, target, target_path, phase1_end_ratio)": [
                "Multiline", [f"^{p}/flops_ratio$", f"^{p}/target$", f"^{p}/target_path$", f"^{p}/phase1_end_ratio$"]],
            "FLOPs ratio by layer type": ["Multiline", [f"{by_type}/flops_ratio$"]],
            "sigma (mask bandwidth, while learning)": ["Multiline", [f"^{p}/sigma$"]],
            "phase (1: learning the structure, 2: frozen)": ["Multiline", [f"^{p}/phase$"]],
            "projection at the phase switch": ["Multiline", [f"^{p}/projection$"]],
        },
        "GSM: widths and rank": {
            "input width by layer type (mean fraction, active components)": ["Multiline", [f"{by_type}/width_in$"]],
            "output width by layer type (mean fraction, active components)": ["Multiline", [f"{by_type}/width_out$"]],
            "mean widths, all layers (active components)": ["Multiline", [f"^{p}/width_in$", f"^{p}/width_out$"]],
            "effective rank (sum over layers)": ["Multiline", [f"^{p}/rank$"]],
        },
    }


class StructureMonitor(Callback):
    """Log scalars of the learned structure to every logger of the trainer.

    Args:
        logging_interval: ``"epoch"`` (at the end of every training epoch) or ``"step"`` (every
            ``log_every_n_steps`` optimizer steps).
        log_every_n_steps: step interval; default the trainer's ``log_every_n_steps``.
        log_per_layer: also log the statistics of every layer (``{prefix}/{layer}/{stat}``).
        prefix: tag prefix.
        layout: write :func:`custom_scalars_layout` once per fit to loggers whose ``experiment`` has
            ``add_custom_scalars`` (TensorBoard: the "Custom Scalars" tab).

    Tags: see :func:`structure_metrics` (e.g. ``structure/flops_ratio``, ``structure/target``,
    ``structure/sigma``, ``structure/phase``, ``structure/by_type/query/width_in``,
    ``structure/{layer}/width_in``), logged at the end of the epoch (or step).  Logged from global rank 0.

    Example::

        trainer = Trainer(callbacks=[StructureMonitor(logging_interval="step", log_every_n_steps=50)])
    """

    def __init__(
        self,
        logging_interval: Literal["epoch", "step"] = "epoch",
        log_every_n_steps: int | None = None,
        log_per_layer: bool = True,
        prefix: str = "structure",
        layout: bool = True,
    ) -> None:
        if logging_interval not in ("epoch", "step"):
            raise ValueError(f"logging_interval must be 'epoch' or 'step', got {logging_interval!r}")
        if log_every_n_steps is not None and (isinstance(log_every_n_steps, bool) or int(log_every_n_steps) < 1):
            raise ValueError(f"log_every_n_steps must be a positive integer or None, got {log_every_n_steps!r}")
        if not prefix:
            raise ValueError("prefix must be a non-empty string")
        self.logging_interval = logging_interval
        self.log_every_n_steps = None if log_every_n_steps is None else int(log_every_n_steps)
        self.log_per_layer = log_per_layer
        self.prefix = prefix
        self.layout = layout
        self._last_step = -1
        self._warned_no_layers = False

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.loggers:
            rank_zero_warn("StructureMonitor: the trainer has no logger, nothing will be logged.")
        elif self.layout and trainer.is_global_zero:
            for logger in trainer.loggers:
                experiment = getattr(logger, "experiment", None)
                if callable(getattr(experiment, "add_custom_scalars", None)):
                    experiment.add_custom_scalars(custom_scalars_layout(self.prefix))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.logging_interval != "step":
            return
        every = self.log_every_n_steps or max(1, int(trainer.log_every_n_steps))
        step = trainer.global_step
        if step == self._last_step or step % every != 0:  # once per optimizer step (gradient accumulation)
            return
        self._last_step = step
        self._log(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.logging_interval == "epoch":
            self._log(trainer, pl_module)

    def _log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.loggers or not trainer.is_global_zero:
            return
        metrics = structure_metrics(pl_module, self.prefix, self.log_per_layer)
        if not metrics:
            if not self._warned_no_layers:
                self._warned_no_layers = True
                rank_zero_warn("StructureMonitor: the module has no GBLR layer, nothing to log.")
            return
        step = log_step(trainer)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
