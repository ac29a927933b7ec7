"""Lightning callbacks to watch the learned GBLR structure, one per concern.

* :class:`StructureMonitor`: scalars per GBLR layer, per layer type and for the whole model (widths, rank,
  FLOPs ratio, parameters, target, sigma, phase) sent to every logger, and a TensorBoard custom-scalars layout
  (:func:`custom_scalars_layout`) that groups them.
* :class:`StructureVisualizer`: width histograms, footprint images and labelled figures (per layer: the ``|W|``
  heatmap and the component windows; model: overview, FLOPs by layer type and by depth, width histograms,
  footprint grid), for loggers whose ``experiment`` has ``add_histogram`` / ``add_image`` / ``add_figure``
  (TensorBoard); other loggers get a one-time warning and no pictures.
* :class:`StructureReport`: a table of every layer with model totals, printed and written to
  ``structure.json`` / ``structure.csv`` in the log directory at the end of ``fit``.

They work with any ``LightningModule`` that holds :class:`~gsm_lightning.layer.GBLRLinear` layers.  The
statistics are in :mod:`gsm_lightning.structure` and the figures in :mod:`gsm_lightning.plotting` (neither
imports Lightning); their public names are re-exported here.  ``python -m gsm_lightning.report CKPT --out DIR``
writes the same report and figures from any checkpoint.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from .layer import GBLRLinear
from .plotting import (
    component_windows,
    flops_chart,
    flops_depth_chart,
    footprint,
    footprint_grid,
    footprint_grid_figure,
    footprint_image,
    model_overview,
    weight_heatmap,
    width_histograms,
)
from .proximal import gblr_layers
from .structure import (
    LAYER_GROUPS,
    flops_by_depth,
    flops_by_group,
    format_structure_table,
    layer_depth,
    layer_group,
    layer_stats,
    print_structure_table,
    structure_metrics,
    structure_summary,
    structure_table,
    write_structure_csv,
)

__all__ = [
    "StructureMonitor",
    "StructureVisualizer",
    "StructureReport",
    "custom_scalars_layout",
    "LAYER_GROUPS",
    "layer_stats",
    "structure_metrics",
    "structure_table",
    "structure_summary",
    "layer_group",
    "layer_depth",
    "flops_by_group",
    "flops_by_depth",
    "flops_chart",
    "flops_depth_chart",
    "footprint",
    "footprint_image",
    "footprint_grid",
    "format_structure_table",
]


def _log_step(trainer: Trainer) -> int:
    # the step Lightning's own logging uses (as LearningRateMonitor does)
    return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))


# ============================================================================ monitor
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
        step = _log_step(trainer)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


# ============================================================================ visualizer
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
        if self._layer_figures_step != _log_step(trainer):  # not drawn at this step already
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
        step = _log_step(trainer)
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


# ============================================================================ report

class StructureReport(Callback):
    """At the end of ``fit``: print a table of every GBLR layer and the model totals (rich when available) and
    write ``{filename}.json`` and ``{filename}.csv`` to the trainer's log directory (``trainer.log_dir``, else
    ``trainer.default_root_dir``).  See :func:`structure_summary` for the content.

    Args:
        filename: base name of the files.
        print_table: print the table.
        count_example_input: add a ``FlopCounterMode`` count of one forward of the module's
            ``example_input_array`` (when it has one).

    After the run, ``summary`` holds the report and ``paths`` the two files.  Rank 0 writes and prints.
    ``python -m gsm_lightning.report CKPT --out DIR`` writes the same files, figures and an HTML page from a
    checkpoint.
    """

    def __init__(self, filename: str = "structure", print_table: bool = True, count_example_input: bool = True) -> None:
        if not filename or os.sep in filename or (os.altsep and os.altsep in filename):
            raise ValueError(f"filename must be a plain non-empty file name without directories, got {filename!r}")
        self.filename = filename
        self.print_table = print_table
        self.count_example_input = count_example_input
        self.summary: dict[str, Any] | None = None
        self.paths: tuple[str, str] | None = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = trainer.log_dir or trainer.default_root_dir  # log_dir broadcasts: call it on every rank
        if trainer.is_global_zero:
            self.write(pl_module, log_dir)

    def write(self, model: nn.Module, directory: str) -> tuple[str, str]:
        """Build the report of ``model``, print it (if ``print_table``) and write the JSON and CSV files into
        ``directory``; returns their paths."""
        example = getattr(model, "example_input_array", None) if self.count_example_input else None
        if example is not None:
            from lightning.fabric.utilities import move_data_to_device

            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            example = move_data_to_device(example, device)
        summary = structure_summary(model, example)
        os.makedirs(directory, exist_ok=True)
        json_path = os.path.join(directory, f"{self.filename}.json")
        csv_path = os.path.join(directory, f"{self.filename}.csv")
        with open(json_path, "w") as f:
            json.dump(summary, f, indent=2)
        write_structure_csv(csv_path, summary)
        if self.print_table:
            print_structure_table(summary)
        self.summary, self.paths = summary, (json_path, csv_path)
        return self.paths
