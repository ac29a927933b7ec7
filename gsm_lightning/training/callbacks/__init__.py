"""Lightning callbacks to watch the learned GBLR structure, one per concern and one per file.

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

from ...report.plotting import flops_chart, flops_depth_chart, footprint, footprint_grid, footprint_image
from ...report.structure import (
    LAYER_GROUPS,
    flops_by_depth,
    flops_by_group,
    format_structure_table,
    layer_depth,
    layer_group,
    layer_stats,
    structure_metrics,
    structure_summary,
    structure_table,
)
from .structure_monitor import StructureMonitor, custom_scalars_layout
from .structure_report import StructureReport
from .structure_visualizer import StructureVisualizer

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
