"""StructureVisualizer: histograms, footprints and labelled figures of the learned structure (TensorBoard)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from ...core.layer import GBLRLinear, gblr_layers
from ...report.plotting import (
    component_windows,
    flops_chart,
    flops_depth_chart,
    footprint_grid_figure,
    footprint_image,
    model_overview,
    weight_heatmap,
    width_histograms,
)
from ._logging import log_step

__all__ = ["StructureVisualizer"]

#: What one drawing logs: ``pictures`` (width histograms and raw footprint images: milliseconds per layer),
#: ``model`` (the model's matplotlib figures) and ``layers`` (two matplotlib figures per layer: the costliest).
_KINDS = ("pictures", "model", "layers")


def _interval(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise ValueError(f"{what} must be a positive integer or None, got {value!r}")
    return int(value)


def _structure_key(named: list[tuple[str, GBLRLinear]]) -> bytes:
    """The integer structure of the active components of every layer (what the model figures show)."""
    parts = []
    for name, layer in named:
        w, loc = layer.int_widths(), layer.int_locations()
        active = (w[0] > 0) & (w[1] > 0)
        both = torch.cat([w[:, active], loc[:, active]]).cpu()
        parts.append(name.encode() + b":" + both.numpy().tobytes())
    return b"|".join(parts)


class StructureVisualizer(Callback):
    """Pictures of the learned structure for TensorBoard-like loggers, drawn off the hot path: the matplotlib
    figures at the end of each phase (and at an interval only when asked), the cheap pictures more often.

    * Cheap pictures, every ``every_n_epochs`` training epochs, at the start of training and at the end of each
      phase: ``{prefix}/{layer}/widths_in`` / ``widths_out`` (histograms of the width fractions of all components)
      and ``{prefix}/{layer}/footprint`` (where the weight is nonzero, :func:`footprint_image`, at most
      ``max_size`` pixels per side; rows = outputs, columns = inputs).
    * Model figures (matplotlib), at the end of each phase, and also every ``figures_every_n_epochs`` epochs (and
      at the start) when set: ``{prefix}/footprint_grid`` (every layer's footprint, labelled;
      :func:`~gsm_lightning.plotting.footprint_grid_figure`), ``{prefix}/flops_by_type`` / ``flops_by_depth``
      (dense vs GBLR FLOPs), ``{prefix}/overview`` (one row per layer: widths, effective rank, FLOPs % against the
      budget) and ``{prefix}/width_histograms``.
    * Per-layer figures (``log_layer_figures``), at the end of each phase, and also every
      ``layer_figures_every_n_epochs`` epochs (and at the start) when set: ``{prefix}/{layer}/weights`` (the
      ``|W|`` heatmap) and ``{prefix}/{layer}/windows`` (the component windows;
      :func:`~gsm_lightning.plotting.weight_heatmap`, ``component_windows``).  About 0.1 s per figure, two per
      layer, so off by default: ``python -m gsm_lightning.report CKPT --out DIR --layer-figures`` draws the same
      figures from a checkpoint after the fit.

    The end of phase 1 is the end of the last epoch before the structure freezes (for
    :class:`~gsm_lightning.module.GSMModule`, epoch ``phase1_epochs - 1``: the structure phase 1 learned, before
    the switch's projection and rounding; for another module, the first batch at which all its GBLR layers are
    frozen); the end of phase 2 is the end of training.  Nothing is drawn twice at the same step, and the model
    figures (which show only the structure) are not drawn again while the active components' integer widths and
    locations are those of the last drawing: at the end of training they come only when the phase switch changed
    the structure (a projection onto the budget, a rounding).

    Args:
        every_n_epochs: epoch interval of the cheap pictures.
        max_size: maximum image side in pixels (footprints) or cells (heatmaps).
        log_histograms / log_images / log_flops_chart / log_figures: switch each kind off (``log_images``: the
            footprints, raw and as a figure; ``log_figures``: overview and width histograms).
        log_on_train_start: also log the initial structure (step 0): the cheap pictures, and the figures that
            have an interval.
        prefix: tag prefix.
        log_layer_figures: the two figures per layer; ``None`` (default): only when
            ``layer_figures_every_n_epochs`` is set.
        layer_figures_every_n_epochs: also log the per-layer figures at this epoch interval.
        figures_every_n_epochs: also log the model figures at this epoch interval (default: only at the end of
            each phase).

    Loggers whose ``experiment`` lacks ``add_histogram`` / ``add_image`` / ``add_figure`` (CSV, none) are
    skipped with a one-time warning.  Rank 0 only.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        max_size: int = 256,
        log_histograms: bool = True,
        log_images: bool = True,
        log_flops_chart: bool = True,
        log_on_train_start: bool = True,
        prefix: str = "structure",
        log_figures: bool = True,
        log_layer_figures: bool | None = None,
        layer_figures_every_n_epochs: int | None = None,
        figures_every_n_epochs: int | None = None,
    ) -> None:
        if isinstance(every_n_epochs, bool) or int(every_n_epochs) < 1:
            raise ValueError(f"every_n_epochs must be a positive integer, got {every_n_epochs!r}")
        if isinstance(max_size, bool) or int(max_size) < 8:
            raise ValueError(f"max_size must be an integer >= 8 (pixels), got {max_size!r}")
        if not prefix:
            raise ValueError("prefix must be a non-empty string")
        self.every_n_epochs = int(every_n_epochs)
        self.layer_figures_every_n_epochs = _interval(layer_figures_every_n_epochs, "layer_figures_every_n_epochs")
        self.figures_every_n_epochs = _interval(figures_every_n_epochs, "figures_every_n_epochs")
        self.max_size = int(max_size)
        self.log_histograms = log_histograms
        self.log_images = log_images
        self.log_flops_chart = log_flops_chart
        self.log_figures = log_figures
        self.log_layer_figures = (self.layer_figures_every_n_epochs is not None if log_layer_figures is None
                                  else bool(log_layer_figures))
        self.log_on_train_start = log_on_train_start
        self.prefix = prefix
        self._warned: set[str] = set()
        self._drawn: dict[str, int] = {}  # kind -> the last step it was drawn at
        self._model_key: bytes | None = None  # the structure the model figures last showed
        self._learning: list[GBLRLinear] = []  # layers not frozen yet, while waiting for the end of phase 1

    # ------------------------------------------------------------------ schedule
    def _every(self) -> dict[str, int | None]:
        return {"pictures": self.every_n_epochs, "model": self.figures_every_n_epochs,
                "layers": self.layer_figures_every_n_epochs if self.log_layer_figures else None}

    def _phase_end_kinds(self) -> set[str]:
        return {"pictures", "model"} | ({"layers"} if self.log_layer_figures else set())

    @staticmethod
    def _phase1_ends(pl_module: LightningModule, epoch: int) -> bool:
        """The structure freezes at the start of the next epoch (``GSMModule``: epoch ``phase1_epochs``)."""
        last = getattr(pl_module, "phase1_epochs", None)
        return (isinstance(last, int) and not isinstance(last, bool) and getattr(pl_module, "phase", None) == 1
                and epoch + 1 >= last)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._drawn, self._model_key = {}, None
        self._learning = [m for _, m in gblr_layers(pl_module) if not m.is_frozen]
        if self.log_on_train_start:
            self._visualize(trainer, pl_module, {k for k, every in self._every().items() if every is not None})

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # the end of phase 1 for a module that does not announce it (phase1_epochs): once every layer is frozen
        if self._learning and all(m.is_frozen for m in self._learning):
            self._learning = []
            self._visualize(trainer, pl_module, self._phase_end_kinds())

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        kinds = {k for k, every in self._every().items() if every is not None and (epoch + 1) % every == 0}
        if self._learning and self._phase1_ends(pl_module, epoch):
            self._learning = []
            kinds |= self._phase_end_kinds()
        self._visualize(trainer, pl_module, kinds)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._visualize(trainer, pl_module, self._phase_end_kinds())

    # ------------------------------------------------------------------ drawing
    def _experiment(self, trainer: Trainer, method: str) -> Any:
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if callable(getattr(experiment, method, None)):
                return experiment
        if method not in self._warned:
            self._warned.add(method)
            rank_zero_warn(f"StructureVisualizer: no logger with `experiment.{method}` (e.g. TensorBoardLogger); "
                           f"skipping what needs it.")
        return None

    @torch.no_grad()
    def _visualize(self, trainer: Trainer, pl_module: LightningModule, kinds: set[str]) -> None:
        if not kinds or not trainer.is_global_zero:
            return
        step = log_step(trainer)
        kinds = {k for k in kinds if self._drawn.get(k) != step}  # at most once per step and kind
        if not kinds:
            return
        named = gblr_layers(pl_module)
        if not named:
            if "layers" not in self._warned:
                self._warned.add("layers")
                rank_zero_warn("StructureVisualizer: the module has no GBLR layer, nothing to draw.")
            return
        for kind in kinds:
            self._drawn[kind] = step
        if "pictures" in kinds:
            if self.log_histograms and (exp := self._experiment(trainer, "add_histogram")) is not None:
                self._histograms(exp, named, step)
            if self.log_images and (exp := self._experiment(trainer, "add_image")) is not None:
                for name, layer in named:
                    exp.add_image(f"{self.prefix}/{name}/footprint", footprint_image(layer, self.max_size).cpu(),
                                  step, dataformats="CHW")
        if "model" in kinds:  # the model figures show the structure only: not again for the one drawn last
            key = _structure_key(named)
            if key == self._model_key:
                kinds.discard("model")
            self._model_key = key
        figures = (self._model_figures(pl_module) if "model" in kinds else []) + (
            self._layer_figures(named) if "layers" in kinds else [])
        if figures and (exp := self._experiment(trainer, "add_figure")) is not None:
            for tag, make in figures:
                exp.add_figure(f"{self.prefix}/{tag}", make(), global_step=step, close=False)

    def _model_figures(self, model: nn.Module) -> list[tuple[str, Any]]:
        """(tag, figure builder) of the model figures switched on; built one at a time, as they are logged."""
        out: list[tuple[str, Any]] = []
        if self.log_images:
            out.append(("footprint_grid", lambda: footprint_grid_figure(model, min(self.max_size, 96))))
        if self.log_flops_chart:
            out += [("flops_by_type", lambda: flops_chart(model)), ("flops_by_depth", lambda: flops_depth_chart(model))]
        if self.log_figures:
            out += [("overview", lambda: model_overview(model)), ("width_histograms", lambda: width_histograms(model))]
        return out

    def _layer_figures(self, named: list[tuple[str, GBLRLinear]]) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        for name, layer in named:
            out.append((f"{name}/weights", lambda n=name, m=layer: weight_heatmap(m, n, self.max_size)))
            out.append((f"{name}/windows", lambda n=name, m=layer: component_windows(m, n)))
        return out

    def _histograms(self, experiment: Any, named: list[tuple[str, GBLRLinear]], step: int) -> None:
        for name, layer in named:
            if layer.num_components == 0:
                continue
            w = layer.int_widths().float().cpu()
            experiment.add_histogram(f"{self.prefix}/{name}/widths_in", (w[0] / layer.in_features).numpy(), step)
            experiment.add_histogram(f"{self.prefix}/{name}/widths_out", (w[1] / layer.out_features).numpy(), step)
