"""Lightning callbacks to watch the learned GBLR structure.

* :class:`StructureMonitor`: scalars per GBLR layer and for the whole model (widths, rank, FLOPs ratio,
  parameters, target, sigma, phase) sent to every logger.
* :class:`StructureVisualizer`: width histograms, block-layout images (one per layer and a grid) and a
  FLOPs-by-layer-type bar chart, for loggers whose ``experiment`` has ``add_histogram`` / ``add_image`` /
  ``add_figure`` (TensorBoard); other loggers get a one-time warning and no pictures.
* :class:`StructureReport`: a table of every layer with model totals, printed and written to
  ``structure.json`` / ``structure.csv`` in the log directory at the end of ``fit``.

They work with any ``LightningModule`` that holds :class:`~gsm_lightning.layer.GBLRLinear` layers.
FLOPs here are multiply-adds per token (as :meth:`GBLRLinear.flops`) unless a field says otherwise.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from .conversion import linear_types
from .flop_count import flop_breakdown
from .layer import GBLRLinear
from .masks import boxcar_mask
from .proximal import flops_ratio, gblr_layers

__all__ = [
    "StructureMonitor",
    "StructureVisualizer",
    "StructureReport",
    "layer_stats",
    "structure_metrics",
    "structure_table",
    "structure_summary",
    "layer_group",
    "flops_by_group",
    "flops_chart",
    "footprint",
    "footprint_image",
    "footprint_grid",
    "format_structure_table",
]


# ============================================================================ statistics
def layer_stats(layer: GBLRLinear) -> dict[str, float]:
    """Structure statistics of one layer.

    ``width_in`` / ``width_out``: mean width fraction over active components (0 if none);
    ``width_in_all`` / ``width_out_all``: over all components; ``rank``: effective rank (active components
    times rank per component); ``flops`` / ``dense_flops``: multiply-adds per token; ``params``: nonzero
    structured weights plus bias."""
    w = layer.int_widths().float()
    frac = w / torch.tensor([[layer.in_features], [layer.out_features]], device=w.device, dtype=w.dtype)
    active = (w[0] > 0) & (w[1] > 0)
    n_active = int(active.sum())
    k = layer.num_components
    flops, dense = layer.flops(), layer.dense_flops()
    return {
        "width_in": float(frac[0][active].mean()) if n_active else 0.0,
        "width_out": float(frac[1][active].mean()) if n_active else 0.0,
        "width_in_all": float(frac[0].mean()) if k else 0.0,
        "width_out_all": float(frac[1].mean()) if k else 0.0,
        "rank": float(n_active * layer.rank_per_component),
        "active": float(n_active),
        "components": float(k),
        "flops": float(flops),
        "dense_flops": float(dense),
        "flops_ratio": flops / dense,
        "params": float(layer.params()),
    }


def _phase(model: nn.Module, layers: list[GBLRLinear]) -> int:
    phase = getattr(model, "phase", None)
    if isinstance(phase, int):
        return phase
    return 2 if layers and all(m.is_frozen for m in layers) else 1


def _sigma(layers: list[GBLRLinear]) -> float | None:
    """Mean finite sigma of the layers still learning their structure (None if there is none)."""
    values = [float(m.sigma) for m in layers if not m.is_frozen]
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else None


def structure_metrics(model: nn.Module, prefix: str = "structure", per_layer: bool = True) -> dict[str, float]:
    """Scalars describing the GBLR structure of ``model`` (empty dict if it has none).

    Global keys: ``{prefix}/flops_ratio`` (FLOPs-weighted over layers), ``flops``, ``dense_flops``, ``params``,
    ``rank``, ``width_in`` / ``width_out`` (over the active components of all layers), ``width_in_all`` /
    ``width_out_all``, ``phase``, ``target`` (``model.budget`` if present), ``sigma`` (mean finite sigma of the
    layers still learning their structure; absent when there is none, e.g. pure Dirichlet or phase 2),
    ``target_path`` (the budget learner's current target ratio, in phase 1), and once phase 1 has ended
    ``phase1_end_ratio`` (the ratio reached by learning, before any projection) and ``projection`` (how much the
    projection at the switch lowered it; 0 when the learner reached the budget).  Per layer: ``{prefix}/{name}/{stat}`` for every
    :func:`layer_stats` entry except ``components`` and ``dense_flops``."""
    named = gblr_layers(model)
    if not named:
        return {}
    layers = [m for _, m in named]
    out: dict[str, float] = {}
    sums = dict.fromkeys(("flops", "dense_flops", "params", "rank", "active", "components"), 0.0)
    width_sum = {"width_in": 0.0, "width_out": 0.0, "width_in_all": 0.0, "width_out_all": 0.0}
    for name, layer in named:
        st = layer_stats(layer)
        for key in sums:
            sums[key] += st[key]
        width_sum["width_in"] += st["width_in"] * st["active"]
        width_sum["width_out"] += st["width_out"] * st["active"]
        width_sum["width_in_all"] += st["width_in_all"] * st["components"]
        width_sum["width_out_all"] += st["width_out_all"] * st["components"]
        if per_layer:
            for key, value in st.items():
                if key not in ("components", "dense_flops"):
                    out[f"{prefix}/{name}/{key}"] = value
    out[f"{prefix}/flops_ratio"] = flops_ratio(layers)
    out[f"{prefix}/flops"] = sums["flops"]
    out[f"{prefix}/dense_flops"] = sums["dense_flops"]
    out[f"{prefix}/params"] = sums["params"]
    out[f"{prefix}/rank"] = sums["rank"]
    for key in ("width_in", "width_out"):
        out[f"{prefix}/{key}"] = width_sum[key] / sums["active"] if sums["active"] else 0.0
        out[f"{prefix}/{key}_all"] = width_sum[f"{key}_all"] / sums["components"] if sums["components"] else 0.0
    out[f"{prefix}/phase"] = float(_phase(model, layers))
    budget = getattr(model, "budget", None)
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        out[f"{prefix}/target"] = float(budget)
    sigma = _sigma(layers)
    if sigma is not None:
        out[f"{prefix}/sigma"] = sigma
    learner = getattr(model, "learner", None)
    if learner is not None and _phase(model, layers) == 1:
        out[f"{prefix}/target_path"] = float(learner.target())
    for attr, key in (("phase1_end_ratio", "phase1_end_ratio"), ("projection_delta", "projection")):
        value = getattr(model, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}/{key}"] = float(value)
    return out


def _log_step(trainer: Trainer) -> int:
    # the step Lightning's own logging uses (as LearningRateMonitor does)
    return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))


# ============================================================================ monitor
class StructureMonitor(Callback):
    """Log scalars of the learned structure to every logger of the trainer.

    Args:
        logging_interval: ``"epoch"`` (at the end of every training epoch) or ``"step"`` (every
            ``log_every_n_steps`` optimizer steps).
        log_every_n_steps: step interval; default the trainer's ``log_every_n_steps``.
        log_per_layer: also log the statistics of every layer (``{prefix}/{layer}/{stat}``).
        prefix: tag prefix.

    Tags: see :func:`structure_metrics` (e.g. ``structure/flops_ratio``, ``structure/target``,
    ``structure/sigma``, ``structure/phase``, ``structure/{layer}/width_in``).  Logged from global rank 0.

    Example::

        trainer = Trainer(callbacks=[StructureMonitor(logging_interval="step", log_every_n_steps=50)])
    """

    def __init__(
        self,
        logging_interval: Literal["epoch", "step"] = "epoch",
        log_every_n_steps: int | None = None,
        log_per_layer: bool = True,
        prefix: str = "structure",
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
        self._last_step = -1
        self._warned_no_layers = False

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.loggers:
            rank_zero_warn("StructureMonitor: the trainer has no logger, nothing will be logged.")

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


# ============================================================================ layer types
#: Layer groups of :func:`layer_group`, in display order.
LAYER_GROUPS = ("query", "key", "value", "qkv", "attn_out", "mlp_fc1", "mlp_fc2", "token_mixing",
                "channel_mixing", "other")

_QUERY = {"q", "q_proj", "query", "to_q", "wq", "q_lin"}
_KEY = {"k", "k_proj", "key", "to_k", "wk", "k_lin"}
_VALUE = {"v", "v_proj", "value", "to_v", "wv", "v_lin"}
_QKV = {"qkv", "c_attn", "in_proj", "to_qkv", "query_key_value", "wqkv", "qkv_proj", "w_pack"}
_ATTN_OUT = {"out_proj", "o_proj", "to_out", "wo", "out_lin"}
_FC1 = {"fc1", "c_fc", "up_proj", "gate_proj", "w1", "w3", "lin1", "linear1", "fc_in", "dense_h_to_4h"}
_FC2 = {"fc2", "down_proj", "w2", "lin2", "linear2", "fc_out", "dense_4h_to_h"}
_ATTN_PARENT = re.compile(r"attn|attention|self_attn|mixer")


def layer_group(name: str) -> str:
    """Layer type from a qualified module name (heuristic, one of :data:`LAYER_GROUPS`).

    Token-/channel-mixing MLPs (MLP-Mixer: ``token_mlp``, ``mlp_tokens``, ``channel_mlp``...) come first;
    then separate ``q``/``k``/``v`` projections, fused ``qkv`` (``c_attn``, ``qkv``), the attention output
    projection (``out_proj``, ``attn.proj``, ``attn.c_proj``, BERT ``attention.output.dense``), MLP input
    (``fc1``, ``c_fc``, ``intermediate.dense``) and output (``fc2``, ``mlp.c_proj``, BERT ``output.dense``)."""
    parts = [p.lower() for p in name.split(".") if p]
    if not parts:
        return "other"
    last, parent = parts[-1], (parts[-2] if len(parts) > 1 else "")
    path = parts[:-1]
    if any("token" in p and ("mlp" in p or "mix" in p) for p in path) or last in ("token_mixing", "mlp_tokens"):
        return "token_mixing"
    if any("channel" in p and ("mlp" in p or "mix" in p) for p in path) or last in ("channel_mixing", "mlp_channels"):
        return "channel_mixing"
    if last in _QUERY:
        return "query"
    if last in _KEY:
        return "key"
    if last in _VALUE:
        return "value"
    if last in _QKV:
        return "qkv"
    if last in _ATTN_OUT or (last in ("proj", "c_proj", "dense") and _ATTN_PARENT.search(parent)):
        return "attn_out"
    if last == "dense" and parent == "output" and len(parts) > 2 and _ATTN_PARENT.search(parts[-3]):
        return "attn_out"
    if last in _FC1 or (last == "dense" and parent == "intermediate"):
        return "mlp_fc1"
    if last in _FC2 or (last == "c_proj" and "mlp" in parent) or (last == "dense" and parent == "output"):
        return "mlp_fc2"
    return "other"


def flops_by_group(model: nn.Module) -> dict[str, dict[str, float]]:
    """``{group: {"flops", "dense_flops", "layers"}}`` over the GBLR layers of ``model`` (multiply-adds per
    token), groups from :func:`layer_group` in :data:`LAYER_GROUPS` order, empty groups left out."""
    groups: dict[str, dict[str, float]] = {}
    for name, layer in gblr_layers(model):
        g = groups.setdefault(layer_group(name), {"flops": 0.0, "dense_flops": 0.0, "layers": 0.0})
        g["flops"] += layer.flops()
        g["dense_flops"] += layer.dense_flops()
        g["layers"] += 1
    return {k: groups[k] for k in LAYER_GROUPS if k in groups}


def flops_chart(model: nn.Module) -> Any:
    """A matplotlib ``Figure`` (Agg, no pyplot state) with dense vs GBLR FLOPs per layer type."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = flops_by_group(model)
    names = list(groups)
    dense = [groups[g]["dense_flops"] for g in names]
    gblr = [groups[g]["flops"] for g in names]
    fig = Figure(figsize=(max(4.0, 1.2 * len(names) + 2), 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], dense, width=0.4, label="dense", color="#bbbbbb")
    bars = ax.bar([i + 0.2 for i in x], gblr, width=0.4, label="GBLR", color="#1f77b4")
    for bar, f, d in zip(bars, gblr, dense):
        ax.annotate(f"{100 * f / d:.0f}%" if d else "", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("multiply-adds per token")
    total = 100 * flops_ratio(m for _, m in gblr_layers(model))
    ax.set_title(f"FLOPs by layer type (GBLR layers: {total:.1f}% of dense)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    return fig


# ============================================================================ footprints
def footprint(layer: GBLRLinear, max_size: int | None = None) -> Tensor:
    """Number of components covering each weight entry, ``(out, in)`` float.

    Component k covers the rows/columns of its integer cyclic boxcars: ``F = M_out^T M_in`` with the
    ``(K, n)`` boxcar masks, so ``F > 0`` is where ``W`` may be nonzero.  With ``max_size`` the map is
    block-averaged so its longer side is at most ``max_size`` (aspect ratio kept; adaptive average pooling,
    exact because it is separable: the pooled map is ``pool(M_out)^T pool(M_in)``)."""
    if max_size is not None and int(max_size) < 1:
        raise ValueError(f"max_size must be >= 1 or None, got {max_size}")
    w, loc = layer.int_widths(), layer.int_locations()
    m_in = boxcar_mask(w[0], loc[0], layer.in_features, torch.float32)
    m_out = boxcar_mask(w[1], loc[1], layer.out_features, torch.float32)
    if max_size is not None:
        scale = min(1.0, int(max_size) / max(layer.in_features, layer.out_features))  # keep the aspect ratio
        m_in = _pool(m_in, max(1, round(layer.in_features * scale)))
        m_out = _pool(m_out, max(1, round(layer.out_features * scale)))
    return m_out.t() @ m_in


def _pool(m: Tensor, size: int) -> Tensor:
    n = m.shape[-1]
    if n <= size:
        return m
    if m.shape[0] == 0:
        return m.new_zeros(0, size)
    return F.adaptive_avg_pool1d(m.unsqueeze(0), size).squeeze(0)


def footprint_image(layer: GBLRLinear, max_size: int = 256) -> Tensor:
    """Grayscale ``(1, H, W)`` image in [0, 1] of :func:`footprint`: black where ``W`` is zero, brightness
    from 0.2 (one component, or partial cover of a downsampled pixel) to 1 growing with the log of the
    number of overlapping components.  Rows are outputs, columns inputs."""
    fp = footprint(layer, max_size)
    top = float(fp.max()) if fp.numel() else 0.0
    if top <= 0:
        return fp.new_zeros(1, *fp.shape)
    shade = 0.2 + 0.8 * torch.log1p(fp) / math.log1p(top)
    return torch.where(fp > 0, shade, torch.zeros_like(fp)).clamp(0, 1).unsqueeze(0)


def footprint_grid(images: list[Tensor], tile: int = 256, pad: int = 2, ncols: int | None = None) -> Tensor:
    """Tile ``(1, H, W)`` images into one ``(1, H', W')`` image: each scaled (nearest) so its longer side is
    ``tile``, top-left aligned in its cell, cells separated by ``pad`` gray pixels, row-major."""
    if not images:
        raise ValueError("footprint_grid needs at least one image")
    if tile < 1 or pad < 0:
        raise ValueError(f"tile must be >= 1 and pad >= 0, got {tile}, {pad}")
    ncols = ncols or math.ceil(math.sqrt(len(images)))
    nrows = math.ceil(len(images) / ncols)
    cell = tile + pad
    grid = torch.full((1, nrows * cell + pad, ncols * cell + pad), 0.5)
    for i, img in enumerate(images):
        h, w = img.shape[-2:]
        scale = tile / max(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        scaled = F.interpolate(img.float().cpu().unsqueeze(0), size=size, mode="nearest").squeeze(0)
        r, c = divmod(i, ncols)
        top, left = pad + r * cell, pad + c * cell
        grid[:, top:top + tile, left:left + tile] = 0.0
        grid[:, top:top + size[0], left:left + size[1]] = scaled
    return grid


# ============================================================================ visualizer
class StructureVisualizer(Callback):
    """Pictures of the learned structure for TensorBoard-like loggers.

    Every ``every_n_epochs`` training epochs (and once at the start of training):

    * ``{prefix}/{layer}/widths_in`` / ``widths_out``: histograms of the width fractions of all components;
    * ``{prefix}/{layer}/footprint``: where the weight is nonzero (:func:`footprint_image`, at most
      ``max_size`` pixels per side; rows = outputs, columns = inputs), and ``{prefix}/footprint_grid`` with all
      layers;
    * ``{prefix}/flops_by_type``: dense vs GBLR FLOPs per layer type (:func:`flops_chart`).

    Args:
        every_n_epochs: epoch interval.
        max_size: maximum image side in pixels (also the grid tile size).
        log_histograms / log_images / log_flops_chart: switch each kind off.
        log_on_train_start: also log the initial structure (step 0).
        prefix: tag prefix.

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
    ) -> None:
        if isinstance(every_n_epochs, bool) or int(every_n_epochs) < 1:
            raise ValueError(f"every_n_epochs must be a positive integer, got {every_n_epochs!r}")
        if isinstance(max_size, bool) or int(max_size) < 8:
            raise ValueError(f"max_size must be an integer >= 8 (pixels), got {max_size!r}")
        if not prefix:
            raise ValueError("prefix must be a non-empty string")
        self.every_n_epochs = int(every_n_epochs)
        self.max_size = int(max_size)
        self.log_histograms = log_histograms
        self.log_images = log_images
        self.log_flops_chart = log_flops_chart
        self.log_on_train_start = log_on_train_start
        self.prefix = prefix
        self._warned: set[str] = set()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.log_on_train_start:
            self._visualize(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._visualize(trainer, pl_module)

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
    def _visualize(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        named = gblr_layers(pl_module)
        if not named:
            if "layers" not in self._warned:
                self._warned.add("layers")
                rank_zero_warn("StructureVisualizer: the module has no GBLR layer, nothing to draw.")
            return
        step = _log_step(trainer)
        if self.log_histograms and (exp := self._experiment(trainer, "add_histogram")) is not None:
            self._histograms(exp, named, step)
        if self.log_images and (exp := self._experiment(trainer, "add_image")) is not None:
            self._images(exp, named, step)
        if self.log_flops_chart and (exp := self._experiment(trainer, "add_figure")) is not None:
            exp.add_figure(f"{self.prefix}/flops_by_type", flops_chart(pl_module), global_step=step, close=False)

    def _histograms(self, experiment: Any, named: list[tuple[str, GBLRLinear]], step: int) -> None:
        for name, layer in named:
            if layer.num_components == 0:
                continue
            w = layer.int_widths().float().cpu()
            experiment.add_histogram(f"{self.prefix}/{name}/widths_in", (w[0] / layer.in_features).numpy(), step)
            experiment.add_histogram(f"{self.prefix}/{name}/widths_out", (w[1] / layer.out_features).numpy(), step)

    def _images(self, experiment: Any, named: list[tuple[str, GBLRLinear]], step: int) -> None:
        images = []
        for name, layer in named:
            img = footprint_image(layer, self.max_size).cpu()
            images.append(img)
            experiment.add_image(f"{self.prefix}/{name}/footprint", img, step, dataformats="CHW")
        experiment.add_image(f"{self.prefix}/footprint_grid", footprint_grid(images, tile=self.max_size), step,
                             dataformats="CHW")


# ============================================================================ report
_ROW_FIELDS = ("name", "type", "in_features", "out_features", "rank_per_component", "components", "active",
               "width_in", "width_out", "flops", "dense_flops", "flops_ratio", "params", "dense_params")


def structure_table(model: nn.Module) -> list[dict[str, Any]]:
    """One row per GBLR layer of ``model``: ``name``, ``type`` (:func:`layer_group`), ``in_features``,
    ``out_features``, ``rank_per_component``, ``components``, ``active``, ``width_in`` / ``width_out`` (mean
    fractions over active components), ``flops`` / ``dense_flops`` (multiply-adds per token), ``flops_ratio``,
    ``params`` (nonzero structured weights + bias) and ``dense_params`` (``in * out`` + bias)."""
    rows = []
    for name, layer in gblr_layers(model):
        st = layer_stats(layer)
        bias = layer.out_features if layer.bias is not None else 0
        rows.append({
            "name": name,
            "type": layer_group(name),
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "rank_per_component": layer.rank_per_component,
            "components": layer.num_components,
            "active": int(st["active"]),
            "width_in": st["width_in"],
            "width_out": st["width_out"],
            "flops": int(st["flops"]),
            "dense_flops": int(st["dense_flops"]),
            "flops_ratio": st["flops_ratio"],
            "params": int(st["params"]),
            "dense_params": layer.dense_flops() + bias,
        })
    return rows


def _ratio(a: float, b: float) -> float:
    return a / b if b else 1.0


def structure_summary(model: nn.Module, example_input: Any = None) -> dict[str, Any]:
    """The structure report of ``model`` as a JSON-serialisable dict: ``layers`` (:func:`structure_table`),
    ``totals`` (GBLR layers, other linear layers, whole model), ``accounting`` (what is counted how) and, if
    ``example_input`` is given, ``flop_counter``: one forward under ``FlopCounterMode``
    (:func:`gsm_lightning.flop_count.flop_breakdown`; a tuple/list is unpacked into positional arguments,
    a dict into keyword arguments)."""
    rows = structure_table(model)
    gblr_ids: set[int] = set()
    structured_flops = structured_dense = structured_params = structured_dense_params = 0
    linear_flops = n_linear = n_structured = 0
    lin_types = linear_types()
    inside: list[str] = []  # structured layers: their submodules are not counted again
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, GBLRLinear):
            gblr_ids.update(id(p) for p in module.parameters())
        elif callable(getattr(module, "flops", None)) and callable(getattr(module, "dense_flops", None)) \
                and hasattr(module, "in_features") and hasattr(module, "out_features"):
            # other structured linear layers (e.g. the fixed-structure baselines) with analytic costs
            gblr_ids.update(id(p) for p in module.parameters())
            inside.append(f"{name}." if name else "")
            bias = module.out_features if getattr(module, "bias", None) is not None else 0
            structured_flops += int(module.flops())
            structured_dense += int(module.dense_flops())
            structured_params += int(module.params()) if callable(getattr(module, "params", None)) else sum(
                p.numel() for p in module.parameters())
            structured_dense_params += int(module.dense_flops()) + bias
            n_structured += 1
        elif isinstance(module, lin_types):
            weight = module.weight
            linear_flops += weight.numel()
            n_linear += 1
    other_params = sum(p.numel() for p in model.parameters() if id(p) not in gblr_ids)
    stored_params = sum(p.numel() for p in model.parameters())
    # nn.Linear / Conv1D parameters are in other_params; their FLOPs are in*out = weight.numel()
    linear_params = sum(m.weight.numel() + (m.bias.numel() if getattr(m, "bias", None) is not None else 0)
                        for m in model.modules() if isinstance(m, lin_types) and not isinstance(m, GBLRLinear))
    g_flops = sum(r["flops"] for r in rows)
    g_dense = sum(r["dense_flops"] for r in rows)
    g_params = sum(r["params"] for r in rows)
    g_dense_params = sum(r["dense_params"] for r in rows)
    m_flops = g_flops + structured_flops + linear_flops
    m_dense = g_dense + structured_dense + linear_flops
    m_params = other_params + g_params + structured_params
    m_dense_params = other_params + g_dense_params + structured_dense_params
    totals = {
        "gblr_layers": {"layers": len(rows), "flops": g_flops, "dense_flops": g_dense,
                        "flops_ratio": _ratio(g_flops, g_dense), "params": g_params, "dense_params": g_dense_params,
                        "params_ratio": _ratio(g_params, g_dense_params)},
        "other_structured_layers": {"layers": n_structured, "flops": structured_flops, "dense_flops": structured_dense,
                                    "params": structured_params, "dense_params": structured_dense_params},
        "dense_linear_layers": {"layers": n_linear, "flops": linear_flops, "params": linear_params},
        "model": {"flops_per_token": m_flops, "dense_flops_per_token": m_dense,
                  "flops_ratio": _ratio(m_flops, m_dense), "params": m_params, "dense_params": m_dense_params,
                  "params_ratio": _ratio(m_params, m_dense_params), "stored_params": stored_params},
    }
    accounting = {
        "unit": "multiply-adds per token (one row through each layer), bias adds excluded",
        "counted_per_token": [
            "GBLRLinear: r * sum(W_in + W_out) over active components (layer.flops())",
            "other structured linear layers exposing flops()/dense_flops() (e.g. baselines): their analytic flops()",
            "nn.Linear and HF Conv1D: in_features * out_features",
        ],
        "not_counted": [
            "convolutions (e.g. patch embeddings), embeddings, normalization, activations, bias adds",
            "attention score and attention-value products (they depend on the sequence length)",
            "different row counts of different layers: the per-token sum weights every linear layer once, e.g. a "
            "classifier head applied to one token per sample or Mixer token-mixing layers applied per channel",
        ],
        "model_flops": "sum of the counted per-token costs; dense_flops_per_token replaces every GBLR / structured "
                       "layer by its dense in*out product",
        "params": "GBLR layers: nonzero structured weights + bias (layer.params()); all other parameters as stored; "
                  "dense_params replaces GBLR / structured layers by in*out + bias; stored_params counts every "
                  "parameter tensor element as allocated",
        "flop_counter": "if present: torch FlopCounterMode FLOPs (= 2 x multiply-adds) for one forward of the "
                        "example input, every counted op included; frozen GBLR layers at their true cost, layers "
                        "still learning their structure as the dense masked products they compute",
    }
    summary: dict[str, Any] = {"layers": rows, "totals": totals, "accounting": accounting}
    budget = getattr(model, "budget", None)
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        summary["target_flops_ratio"] = float(budget)
    layers = [m for _, m in gblr_layers(model)]
    if layers:
        summary["phase"] = _phase(model, layers)
    if example_input is not None:
        summary["flop_counter"] = _flop_counter_section(model, example_input)
    return summary


def _flop_counter_section(model: nn.Module, example_input: Any) -> dict[str, Any]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        if isinstance(example_input, dict):
            br = flop_breakdown(model, **example_input)
        elif isinstance(example_input, (tuple, list)):
            br = flop_breakdown(model, *example_input)
        else:
            br = flop_breakdown(model, example_input)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return {
        "unit": "FLOPs = 2 x multiply-adds (torch FlopCounterMode), one forward of the example input",
        "flops": br["flops"],
        "analytic_flops": br["analytic_flops"],
        "dense_flops": br["dense_flops"],
        "flops_ratio": br["ratio"],
        "tokens_per_layer": {name: s["tokens"] for name, s in br["layers"].items()},
    }


def format_structure_table(summary: dict[str, Any]) -> str:
    """Plain-text table of a :func:`structure_summary` (layers and totals)."""
    header = ("layer", "type", "shape (out x in)", "active/K", "w_in", "w_out", "FLOPs", "dense", "ratio", "params")
    lines = [header]
    for r in summary["layers"]:
        lines.append((r["name"], r["type"], f"{r['out_features']} x {r['in_features']}", f"{r['active']}/{r['components']}",
                      f"{r['width_in']:.3f}", f"{r['width_out']:.3f}", f"{r['flops']:,}", f"{r['dense_flops']:,}",
                      f"{r['flops_ratio']:.3f}", f"{r['params']:,}"))
    g, m = summary["totals"]["gblr_layers"], summary["totals"]["model"]
    lines.append(("GBLR total", "", "", "", "", "", f"{g['flops']:,}", f"{g['dense_flops']:,}", f"{g['flops_ratio']:.3f}",
                  f"{g['params']:,}"))
    lines.append(("model total", "", "", "", "", "", f"{m['flops_per_token']:,}", f"{m['dense_flops_per_token']:,}",
                  f"{m['flops_ratio']:.3f}", f"{m['params']:,}"))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in lines]
    text.insert(1, "-" * len(text[0]))
    text.insert(len(text) - 2, "-" * len(text[0]))
    return "\n".join(text)


def _print_summary(summary: dict[str, Any]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(format_structure_table(summary))
        return
    table = Table(title="GBLR structure (shape = out x in; FLOPs = multiply-adds per token)")
    for col in ("layer", "type", "shape", "active/K", "w_in", "w_out", "FLOPs", "dense", "ratio", "params"):
        table.add_column(col, justify="left" if col in ("layer", "type") else "right")
    for r in summary["layers"]:
        table.add_row(r["name"], r["type"], f"{r['out_features']} x {r['in_features']}", f"{r['active']}/{r['components']}",
                      f"{r['width_in']:.3f}", f"{r['width_out']:.3f}", f"{r['flops']:,}", f"{r['dense_flops']:,}",
                      f"{r['flops_ratio']:.3f}", f"{r['params']:,}")
    g, m = summary["totals"]["gblr_layers"], summary["totals"]["model"]
    table.add_section()
    table.add_row("GBLR total", "", "", "", "", "", f"{g['flops']:,}", f"{g['dense_flops']:,}", f"{g['flops_ratio']:.3f}",
                  f"{g['params']:,}")
    table.add_row("model total", "", "", "", "", "", f"{m['flops_per_token']:,}", f"{m['dense_flops_per_token']:,}",
                  f"{m['flops_ratio']:.3f}", f"{m['params']:,}")
    console = Console()
    if not console.is_terminal:  # logs / pipes: do not squeeze the table into 80 columns
        console = Console(width=max(console.width, 160))
    console.print(table)


def _write_csv(path: str, summary: dict[str, Any]) -> None:
    g, m = summary["totals"]["gblr_layers"], summary["totals"]["model"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(_ROW_FIELDS))
        writer.writeheader()
        writer.writerows(summary["layers"])
        writer.writerow({"name": "TOTAL_GBLR", "flops": g["flops"], "dense_flops": g["dense_flops"],
                         "flops_ratio": g["flops_ratio"], "params": g["params"], "dense_params": g["dense_params"]})
        writer.writerow({"name": "TOTAL_MODEL_PER_TOKEN", "flops": m["flops_per_token"],
                         "dense_flops": m["dense_flops_per_token"], "flops_ratio": m["flops_ratio"],
                         "params": m["params"], "dense_params": m["dense_params"]})


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
        _write_csv(csv_path, summary)
        if self.print_table:
            _print_summary(summary)
        self.summary, self.paths = summary, (json_path, csv_path)
        return self.paths
