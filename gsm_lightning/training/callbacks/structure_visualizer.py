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


class StructureVisualizer(Callback):
    """Pictures of the learned structure for TensorBoard-like loggers.

    Every ``every_n_epochs`` training epochs (and once at the start of training):

    * ``{prefix}/{layer}/widths_in`` / ``widths_out``: histograms of the width fractions of all components;
    * ``{prefix}/{layer}/footprint``: where the weight is nonzero (:func:`footprint_image`, at most
      ``max_size`` pixels per side; rows = outputs, columns = inputs), and ``{prefix}/footprint_grid``: every
      layer's footprint in one labelled figure (:func:`~gsm_lightning.plotting.footprint_grid_figure`);
    * ``{prefix}/flops_by_type`` / ``flops_by_depth``: dense vs GBLR FLOPs per layer type and per depth;
    * ``{prefix}/overview``: one row per layer with widths, effective rank and FLOPs % against the budget, and
      ``{prefix}/width_histograms`` (:func:`~gsm_lightning.plotting.model_overview`, ``width_histograms``).

    Per layer, ``{prefix}/{layer}/weights`` (the ``|W|`` heatmap) and ``{prefix}/{layer}/windows`` (the component
    windows; :func:`~gsm_lightning.plotting.weight_heatmap`, ``component_windows``) at the end of training, and
    also every ``layer_figures_every_n_epochs`` epochs (and at the start) when set: at two figures per layer they
    are the costliest pictures to draw.

    Args:
        every_n_epochs: epoch interval.
        max_size: maximum image side in pixels (footprints) or cells (heatmaps).
        log_histograms / log_images / log_flops_chart / log_figures / log_layer_figures: switch each kind off
            (``log_figures``: overview and width histograms; ``log_layer_figures``: the two figures per layer).
        log_on_train_start: also log the initial structure (step 0).
        prefix: tag prefix.
        layer_figures_every_n_epochs: also log the per-layer figures at this epoch interval (default: only at the
            end of training).

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
        log_layer_figures: bool = True,
        layer_figures_every_n_epochs: int | None = None,
    ) -> None:
        if isinstance(every_n_epochs, bool) or int(every_n_epochs) < 1:
            raise ValueError(f"every_n_epochs must be a positive integer, got {every_n_epochs!r}")
        if layer_figures_every_n_epochs is not None and (
                isinstance(layer_figures_every_n_epochs, bool) or int(layer_figures_every_n_epochs) < 1):
            raise ValueError(f"layer_figures_every_n_epochs must be a positive integer or None, "
                             f"got {layer_figures_every_n_epochs!r}")
        if isinstance(max_size, bool) or int(max_size) < 8:
            raise ValueError(f"max_size must be an integer >= 8 (pixels), got {max_size!r}")
        if not prefix:
            raise ValueError("prefix must be a non-empty string")
        self.every_n_epochs = int(every_n_epochs)
        self.max_size = int(max_size)
        self.log_histograms = log_histograms
        self.log_images = log_images
        self.log_flops_chart = log_flops_chart
        self.log_figures = log_figures
        self.log_layer_figures = log_layer_figures
        self.layer_figures_every_n_epochs = None if layer_figures_every_n_epochs is None else int(layer_figures_every_n_epochs)
        self.log_on_train_start = log_on_train_start
        self.prefix = prefix
        self._warned: set[str] = set()
        self._layer_figures_step: int | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.log_on_train_start:
            self._visualize(trainer, pl_module, layers=self.layer_figures_every_n_epochs is not None)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        every_layers = self.layer_figures_every_n_epochs
        layers = every_layers is not None and epoch % every_layers == 0
        if epoch % self.every_n_epochs == 0:
            self._visualize(trainer, pl_module, layers=layers)
        elif layers:
            self._visualize(trainer, pl_module, layers=True, model=False)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._layer_figures_step != log_step(trainer):  # not drawn at this step already
            self._visualize(trainer, pl_module, layers=True, model=False)

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
    def _visualize(self, trainer: Trainer, pl_module: LightningModule, layers: bool, model: bool = True) -> None:
        if not trainer.is_global_zero:
            return
        named = gblr_layers(pl_module)
        if not named:
            if "layers" not in self._warned:
                self._warned.add("layers")
                rank_zero_warn("StructureVisualizer: the module has no GBLR layer, nothing to draw.")
            return
        step = log_step(trainer)
        if model and self.log_histograms and (exp := self._experiment(trainer, "add_histogram")) is not None:
            self._histograms(exp, named, step)
        if model and self.log_images and (exp := self._experiment(trainer, "add_image")) is not None:
            for name, layer in named:
                exp.add_image(f"{self.prefix}/{name}/footprint", footprint_image(layer, self.max_size).cpu(), step,
                              dataformats="CHW")
        figures = (self._model_figures(pl_module) if model else []) + (
            self._layer_figures(named) if layers and self.log_layer_figures else [])
        if figures and (exp := self._experiment(trainer, "add_figure")) is not None:
            for tag, make in figures:
                exp.add_figure(f"{self.prefix}/{tag}", make(), global_step=step, close=False)
            if layers and self.log_layer_figures:
                self._layer_figures_step = step

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
