"""Figures of the learned GBLR structure: matplotlib ``Figure`` objects on the Agg canvas (no pyplot state, no
Lightning), used by :class:`~gsm_lightning.callbacks.StructureVisualizer` (TensorBoard) and by the checkpoint
report (:mod:`gsm_lightning.report`).

Per layer (titles give the layer name, shape ``out x in``, FLOPs % of dense and the active components):

* :func:`weight_heatmap`: ``|W|`` where the weight may be nonzero, white elsewhere, with axes and a colorbar;
* :func:`component_windows`: each active component as a bar over the input axis and one over the output axis,
  sorted by location (a cyclic window that wraps around the end is drawn as two pieces).

Whole model: :func:`model_overview` (one row per layer: widths, effective rank, FLOPs % against the budget),
:func:`flops_chart` (by layer type), :func:`flops_depth_chart` (by depth), :func:`width_histograms` and
:func:`footprint_grid_figure` (every layer's footprint, labelled).  :func:`structure_figures` builds them all
(:func:`iter_structure_figures` one at a time);
:func:`figure_png` / :func:`save_figure` render one.  :func:`footprint_image` / :func:`footprint_grid` are the
raw grayscale images (tensors).

Figures are at least 640 x 450 pixels (``DPI`` = 100 dots per inch of ``figsize``).
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.ticker import MaxNLocator, NullLocator
from torch import Tensor, nn

from ..core.flops import flops_ratio
from ..core.layer import GBLRLinear, gblr_layers
from ..core.masks import boxcar_mask
from .structure import flops_by_depth, flops_by_group, layer_group, layer_stats, structure_table

__all__ = [
    "DPI",
    "new_figure",
    "figure_png",
    "save_figure",
    "layer_title",
    "footprint",
    "footprint_image",
    "footprint_grid",
    "weight_heatmap",
    "component_windows",
    "window_segments",
    "model_overview",
    "flops_chart",
    "flops_depth_chart",
    "width_histograms",
    "footprint_grid_figure",
    "structure_figures",
    "iter_structure_figures",
    "select_layers",
]

#: Dots per inch of every figure: a ``figsize`` of (w, h) inches renders to ``100 w x 100 h`` pixels.
DPI = 100
_EMPTY = "#ffffff"  # cells outside every window
_DENSE = "#bbbbbb"
_GBLR = "#1f77b4"


def new_figure(width: float, height: float, constrained: bool = True) -> Figure:
    """A ``Figure`` of ``width x height`` inches (at least 6.4 x 4.5) at :data:`DPI` with an Agg canvas; with
    ``constrained`` matplotlib's constrained layout, else the caller places the axes (about twice as fast)."""
    size = (round(max(6.4, width) * DPI) / DPI, round(max(4.5, height) * DPI) / DPI)  # whole pixels
    fig = Figure(figsize=size, dpi=DPI, layout="constrained" if constrained else None)
    FigureCanvasAgg(fig)
    return fig


def _title(ax: Any, text: str, **kwargs: Any) -> None:
    """``ax.set_title`` at a fixed height (``y=1``): matplotlib's automatic title placement measures every tick
    label of the axes on each draw (up to a fifth of a figure's drawing time); these axes have nothing above them."""
    ax.set_title(text, y=1.0, **kwargs)


def _inches_rect(fig: Figure, left: float, bottom: float, right: float, top: float) -> list[float]:
    """``[x, y, w, h]`` figure fractions for margins given in inches."""
    w, h = fig.get_size_inches()
    return [left / w, bottom / h, 1 - (left + right) / w, 1 - (bottom + top) / h]


def figure_png(fig: Figure) -> bytes:
    """The figure rendered as PNG bytes (its ``figsize`` x :data:`DPI` pixels)."""
    buf = io.BytesIO()
    # zlib level 1: about 30 % less encoding time than the default (6) for about 10 % more bytes on these figures
    fig.savefig(buf, format="png", dpi=fig.dpi, facecolor="white", pil_kwargs={"compress_level": 1})
    return buf.getvalue()


def save_figure(fig: Figure, path: str) -> str:
    """Write the figure as a PNG to ``path`` (folders created); returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(figure_png(fig))
    return path


def layer_title(name: str, layer: GBLRLinear) -> str:
    """Two-line title: layer name and shape, then FLOPs % of dense, active components, rank and state."""
    st = layer_stats(layer)
    if layer.is_frozen:
        state = "frozen"
    else:
        sigma = float(layer.sigma)
        state = "learning, sigma " + ("inf" if math.isinf(sigma) else f"{sigma:g}")
    return (f"{name or 'GBLRLinear'}  [{layer.out_features} x {layer.in_features}, out x in]\n"
            f"FLOPs {100 * st['flops_ratio']:.1f}% of dense | {int(st['active'])}/{int(st['components'])} "
            f"components active | rank {int(st['rank'])} | {state}")


# ============================================================================ footprints (tensors)
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


# ============================================================================ per layer
def _cmap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=_EMPTY)


@torch.no_grad()
def _magnitude(layer: GBLRLinear, max_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``|W|`` (block max-pooled so the longer side is at most ``max_size``) and its support (footprint > 0)."""
    w = layer.to_dense().detach().float().abs().cpu()
    support = (footprint(layer, max_size) > 0).cpu()
    if tuple(w.shape) != tuple(support.shape):
        w = F.adaptive_max_pool2d(w[None], tuple(support.shape))[0]
    return w.numpy(), support.numpy()


def weight_heatmap(layer: GBLRLinear, name: str = "", max_size: int = 256) -> Figure:
    """Heatmap of ``|W|`` (rows: outputs, columns: inputs; block max-pooled to at most ``max_size`` cells per
    side) over its support, the union of the components' windows; white cells are outside every window (``W``
    is zero there once the structure is frozen).  Title: :func:`layer_title`; colorbar: ``|W_ij|``."""
    if int(max_size) < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    mag, support = _magnitude(layer, int(max_size))
    data = np.ma.masked_array(mag, mask=~support)
    n_in, n_out = layer.in_features, layer.out_features
    aspect = n_out / n_in
    fig = new_figure(7.5, min(9.0, max(5.0, 6.2 * min(aspect, 1.4))), constrained=False)
    ax = fig.add_axes(_inches_rect(fig, 0.85, 0.75, 1.55, 0.9))
    cax = fig.add_axes(_inches_rect(fig, 6.15, 0.75, 1.1, 0.9))
    top = float(data.max()) if data.count() else 1.0
    im = ax.imshow(data, cmap=_cmap("viridis"), vmin=0.0, vmax=top if top > 0 else 1.0, extent=(0, n_in, n_out, 0),
                   aspect="auto", interpolation="nearest")
    ax.set_facecolor(_EMPTY)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    ax.set_xlabel(f"input feature (column, 0..{n_in - 1})")
    ax.set_ylabel(f"output feature (row, 0..{n_out - 1})")
    _title(ax, layer_title(name, layer), fontsize=10)
    cbar = fig.colorbar(im, cax=cax)
    cbar.set_label("|W_ij|  (white: outside every window)")
    covered = float(support.mean()) if support.size else 0.0
    fig.text(0.99, 0.01, f"support: {100 * covered:.1f}% of the cells", ha="right", va="bottom", fontsize=8,
             color="#444444")
    return fig


def window_segments(location: int, width: int, n: int) -> list[tuple[int, int]]:
    """``(start, length)`` pieces of the cyclic window ``[location, location + width)`` on ``0..n-1``: one piece,
    or two when it wraps around the end; none for width 0."""
    width = min(int(width), n)
    location = int(location) % n if n else 0
    if width <= 0:
        return []
    if location + width <= n:
        return [(location, width)]
    return [(location, n - location), (0, location + width - n)]


def component_windows(layer: GBLRLinear, name: str = "") -> Figure:
    """The window of every active component on the input axis (left) and the output axis (right), one row per
    component sorted by input then output location (the same row in both panels is the same component; a
    wrapping window is drawn as two bars).  Inactive components (a zero width) are left out."""
    w, loc = layer.int_widths().cpu(), layer.int_locations().cpu()
    active = ((w[0] > 0) & (w[1] > 0)).nonzero().flatten().tolist()
    order = sorted(active, key=lambda k: (int(loc[0, k]), int(loc[1, k]), k))
    n = len(order)
    fig = new_figure(10.0, min(14.0, max(5.0, 2.2 + 0.16 * n)), constrained=False)
    left = fig.add_axes(_inches_rect(fig, 0.85, 0.7, 5.25, 0.85))
    axes = [left, fig.add_axes(_inches_rect(fig, 5.25, 0.7, 0.85, 0.85))]
    # the same rows as the left panel (same y limits), without ticks of its own: every tick is an object matplotlib
    # builds and draws, the bulk of a panel's cost
    axes[1].yaxis.set_major_locator(NullLocator())
    axes[0].yaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
    colors = [_component_color(i, n) for i in range(n)]
    sides = zip(axes, (layer.in_features, layer.out_features), ("input", "output"), ("in", "out"))
    for side, (ax, size, label, short) in enumerate(sides):
        boxes, cols = [], []
        for row, k in enumerate(order):
            for start, length in window_segments(int(loc[side, k]), int(w[side, k]), size):
                x0, x1, y0, y1 = start, start + length, row - 0.4, row + 0.4
                boxes.append([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])
                cols.append(colors[row])
        # one collection per panel (a bar per window piece): far cheaper to draw than one patch per bar
        ax.add_collection(PolyCollection(boxes, facecolors=cols, edgecolors="#333333", linewidths=0.3 if n < 80 else 0,
                                         label=f"{label} windows"))
        ax.set_xlim(0, size)
        ax.set_ylim(n - 0.4 if n else 1, -0.6)  # first component on top
        ax.set_xlabel(f"{label} feature (0..{size - 1})")
        _title(ax, f"{label} windows ({short} = {size})", fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
        if not n:
            ax.text(0.5, 0.5, "no active component", transform=ax.transAxes, ha="center", va="center")
    axes[0].set_ylabel("component (sorted by input location)")
    fig.suptitle(layer_title(name, layer), fontsize=10)
    return fig


def _component_color(i: int, n: int) -> Any:
    import matplotlib

    return matplotlib.colormaps["tab20"](i % 20)


# ============================================================================ whole model
def _empty_figure(title: str) -> Figure:
    fig = new_figure(6.4, 4.5)
    ax = fig.add_subplot()
    _title(ax, title)
    ax.text(0.5, 0.5, "no GBLR layer", transform=ax.transAxes, ha="center", va="center")
    ax.set_axis_off()
    return fig


def _budget(model: nn.Module, budget: float | None) -> float | None:
    if budget is None:
        budget = getattr(model, "budget", None)
    return float(budget) if isinstance(budget, (int, float)) and not isinstance(budget, bool) else None


def model_overview(model: nn.Module, budget: float | None = None) -> Figure:
    """One row per GBLR layer (labelled with its name and type): mean window widths in and out (fractions of
    the side, over the active components), effective rank against its maximum ``min(in, out)``, and FLOPs as %
    of dense with the budget (``budget``, default ``model.budget``) as a dashed line."""
    rows = structure_table(model)
    budget = _budget(model, budget)
    if not rows:
        return _empty_figure("GBLR structure overview")
    n = len(rows)
    labels = [f"{r['name']}  ({r['type']})" for r in rows]
    font = 8 if n > 30 else 9
    fig = new_figure(14.0, min(60.0, max(4.5, 1.6 + 0.32 * n)), constrained=False)
    # placed by hand (cheaper than constrained layout): the left margin fits the longest layer label
    renderer = fig.canvas.get_renderer()
    label_w = max(renderer.get_text_width_height_descent(t, FontProperties(size=font), ismath=False)[0]
                  for t in labels) / DPI
    width, height = fig.get_size_inches()
    left, right, gap = label_w + 0.25, 0.25, 0.35
    panel = (width - left - right - 2 * gap) / 3.4
    x0 = [left, left + 1.2 * panel + gap, left + 2.2 * panel + 2 * gap]
    widths = [1.2 * panel, 1.0 * panel, 1.2 * panel]
    bottom, top = 0.65, 1.05
    rects = [[x / width, bottom / height, w / width, 1 - (bottom + top) / height] for x, w in zip(x0, widths)]
    ax_w = fig.add_axes(rects[0])
    ax_r = fig.add_axes(rects[1])
    ax_f = fig.add_axes(rects[2])
    for ax in (ax_r, ax_f):  # the rows of ax_w (same y limits below), without a tick per row of their own
        ax.yaxis.set_major_locator(NullLocator())
    y = np.arange(n)
    ax_w.barh(y - 0.2, [r["width_in"] for r in rows], height=0.4, color="#1f77b4", label="input side")
    ax_w.barh(y + 0.2, [r["width_out"] for r in rows], height=0.4, color="#ff7f0e", label="output side")
    ax_w.set_xlim(0, 1)
    ax_w.set_xlabel("mean window width (fraction of the side)")
    _title(ax_w, "widths of the active components:\ninput side (blue), output side (orange)", fontsize=10)
    ax_w.set_yticks(y)
    ax_w.set_yticklabels(labels, fontsize=font)
    for ax in (ax_w, ax_r, ax_f):
        ax.set_ylim(n - 0.5, -0.5)
    max_rank = [min(r["in_features"], r["out_features"]) for r in rows]
    ax_r.barh(y, max_rank, height=0.7, color="#eeeeee", edgecolor="#bbbbbb", label="maximum: min(in, out)")
    ax_r.barh(y, [r["rank"] for r in rows], height=0.7, color="#2ca02c", label="effective rank")
    ax_r.set_xlim(0, max(max_rank) * 1.05)
    ax_r.set_xlabel("effective rank (active components x r)")
    _title(ax_r, "effective rank (green)\nof at most min(in, out) (grey)", fontsize=10)
    pct = [100 * r["flops_ratio"] for r in rows]
    ax_f.barh(y, pct, height=0.7, color=_GBLR)
    for yi, p in zip(y, pct):
        ax_f.annotate(f"{p:.1f}%", (p, yi), xytext=(2, 0), textcoords="offset points", va="center", fontsize=7)
    if budget is not None:
        ax_f.axvline(100 * budget, color="#d62728", linestyle="--", linewidth=1.2, label=f"budget {100 * budget:.0f}%")
    ax_f.set_xlim(0, max(105.0, max(pct) * 1.12))
    ax_f.set_xlabel("FLOPs (% of the dense layer)")
    _title(ax_f, "FLOPs of each layer\n" + (f"budget {100 * budget:.0f}% of the model (dashed)" if budget is not None
                                              else "no budget known"), fontsize=10)
    for ax in (ax_w, ax_r, ax_f):
        ax.grid(axis="x", color="#dddddd", linewidth=0.5)
        ax.set_axisbelow(True)
    total = 100 * flops_ratio(m for _, m in gblr_layers(model))
    target = f" (budget {100 * budget:.0f}%)" if budget is not None else ""
    fig.suptitle(f"GBLR structure: {n} layers, FLOPs {total:.1f}% of dense{target}", fontsize=11)
    return fig


def _flops_bars(groups: dict[str, dict[str, float]], title: str, xlabel: str, labels: list[str]) -> Figure:
    names = list(groups)
    dense = [groups[g]["dense_flops"] for g in names]
    gblr = [groups[g]["flops"] for g in names]
    rotate = len(names) > 4 or max((len(t) for t in labels), default=0) > 12
    fig = new_figure(max(6.4, 0.9 * len(names) + 3.0), 4.5 + (0.3 if rotate else 0.0), constrained=False)
    ax = fig.add_axes(_inches_rect(fig, 1.0, 1.1 if rotate else 0.75, 0.25, 0.45))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], dense, width=0.4, label="dense", color=_DENSE)
    bars = ax.bar([i + 0.2 for i in x], gblr, width=0.4, label="GBLR", color=_GBLR)
    for bar, f, d in zip(bars, gblr, dense):
        ax.annotate(f"{100 * f / d:.0f}%" if d else "", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, rotation=30 if rotate else 0, ha="right" if rotate else "center")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("multiply-adds per token")
    _title(ax, title, fontsize=10)
    ax.legend()
    return fig


def flops_chart(model: nn.Module) -> Figure:
    """Dense vs GBLR FLOPs per layer type (:func:`~gsm_lightning.structure.layer_group`), % of dense on top."""
    groups = flops_by_group(model)
    total = 100 * flops_ratio(m for _, m in gblr_layers(model))
    return _flops_bars(groups, f"FLOPs by layer type (GBLR layers: {total:.1f}% of dense)", "layer type", list(groups))


def flops_depth_chart(model: nn.Module) -> Figure:
    """Dense vs GBLR FLOPs per depth (:func:`~gsm_lightning.structure.layer_depth`: the first index in the layer
    name, e.g. the transformer block), % of dense on top."""
    groups = flops_by_depth(model)
    total = 100 * flops_ratio(m for _, m in gblr_layers(model))
    labels = [g if g == "other" else f"block {g}" for g in groups]
    return _flops_bars(groups, f"FLOPs by depth (GBLR layers: {total:.1f}% of dense)",
                       "depth (first index in the layer name)", labels)


def width_histograms(model: nn.Module, bins: int = 20) -> Figure:
    """Histograms of the window widths (fractions of the side) of the active components of all GBLR layers,
    input and output side, stacked by layer type."""
    named = gblr_layers(model)
    if not named:
        return _empty_figure("window widths")
    by_type: dict[str, list[np.ndarray]] = {}
    total = active_total = 0
    for name, layer in named:
        w = layer.int_widths().float().cpu()
        frac = (w / torch.tensor([[layer.in_features], [layer.out_features]])).numpy()
        active = (w[0] > 0) & (w[1] > 0)
        total += layer.num_components
        active_total += int(active.sum())
        by_type.setdefault(layer_group(name), []).append(frac[:, active.numpy()])
    fig = new_figure(11.0, 4.8, constrained=False)
    left = fig.add_axes(_inches_rect(fig, 0.8, 0.7, 5.75, 0.6))
    axes = [left, fig.add_axes(_inches_rect(fig, 5.75, 0.7, 0.8, 0.6), sharey=left)]
    axes[1].tick_params(labelleft=False)
    edges = np.linspace(0.0, 1.0, int(bins) + 1)
    groups = list(by_type)
    for side, (ax, label) in enumerate(zip(axes, ("input", "output"))):
        # stacked as one filled step artist per layer type (ax.hist draws a patch per bin: 10x slower to build)
        bottom = np.zeros(len(edges) - 1)
        for i, g in enumerate(groups):
            counts, _ = np.histogram(np.concatenate([f[side] for f in by_type[g]]), bins=edges)
            top = bottom + counts
            ax.stairs(top, edges, baseline=bottom, fill=True, label=g, color=f"C{i}", edgecolor="white",
                      linewidth=0.4)
            bottom = top
        ax.set_ylim(0, max(1.0, float(bottom.max()) * 1.05))
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"{label} window width (fraction of the {label} side)")
        _title(ax, f"{label} side", fontsize=10)
        ax.grid(axis="y", color="#dddddd", linewidth=0.5)
        ax.set_axisbelow(True)
    axes[0].set_ylabel("active components")
    axes[1].legend(title="layer type", fontsize=8)
    fig.suptitle(f"Window widths of the {active_total} active components ({total - active_total} of {total} "
                 f"inactive or dropped) in {len(named)} layers", fontsize=11)
    return fig


def footprint_grid_figure(model: nn.Module, max_size: int = 96, max_layers: int = 64) -> Figure:
    """Every GBLR layer's footprint (number of components covering each weight entry) in one labelled mosaic:
    each layer scaled to a tile of ``max_size`` cells on its longer side (block-averaged or repeated), framed,
    with its name, shape, FLOPs % and active components above it; white is outside every window, one shared
    colorbar.  At most ``max_layers`` tiles (the first layers).  One axes, so it stays cheap for deep models."""
    all_named = gblr_layers(model)
    named = all_named[: int(max_layers)]
    if not named:
        return _empty_figure("footprints")
    tile = max(8, int(max_size))
    n = len(named)
    ncols = math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    gap, label = max(4, tile // 6), max(8, tile // 3)
    cell_w, cell_h = tile + gap, tile + gap + label
    canvas = np.full((nrows * cell_h, ncols * cell_w), np.nan, dtype=np.float32)
    frames, texts = [], []
    for i, (name, layer) in enumerate(named):
        fp = footprint(layer, tile)
        h, w = fp.shape
        scale = tile / max(h, w, 1)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        if size != (h, w):
            fp = F.interpolate(fp[None, None], size=size, mode="nearest")[0, 0]
        r, c = divmod(i, ncols)
        top, left = r * cell_h + label, c * cell_w
        block = fp.cpu().numpy()
        canvas[top:top + size[0], left:left + size[1]] = np.where(block > 0, block, np.nan)
        frames.append((left - 0.5, top - 0.5, size[1], size[0]))
        st = layer_stats(layer)
        texts.append((left, top - 1.5, f"{name}\n{layer.out_features}x{layer.in_features}, "
                                         f"{100 * st['flops_ratio']:.0f}% FLOPs, {int(st['active'])}/{int(st['components'])}"))
    fig = new_figure(1.9 * ncols + 1.4, 2.35 * nrows * (cell_h / cell_w) / 1.3 + 0.9, constrained=False)
    ax = fig.add_axes(_inches_rect(fig, 0.1, 0.1, 1.2, 0.55))
    cax = fig.add_axes(_inches_rect(fig, fig.get_size_inches()[0] - 1.0, 0.6, 0.8, 1.0))
    top_value = float(np.nanmax(canvas)) if np.isfinite(canvas).any() else 1.0
    im = ax.imshow(np.ma.masked_invalid(canvas), cmap=_cmap("magma_r"), vmin=0.0, vmax=max(top_value, 1.0),
                   interpolation="nearest", aspect="equal")
    # the frames as one collection of vertex lists (Patch objects cost a tenth of a second more to build)
    ax.add_collection(PolyCollection([[(x, y), (x + w, y), (x + w, y + h), (x, y + h)] for x, y, w, h in frames],
                                     facecolors="none", edgecolors="#888888", linewidths=0.6))
    font = 7 if ncols > 4 else 8
    for x, y, text in texts:
        ax.text(x, y, text, ha="left", va="bottom", fontsize=font)
    ax.set_axis_off()
    cbar = fig.colorbar(im, cax=cax)
    cbar.set_label("components covering W_ij (white: none)")
    more = f" (first {n} of {len(all_named)})" if len(all_named) > n else ""
    fig.suptitle(f"Footprints of the GBLR layers{more}: where W may be nonzero (rows: outputs, columns: inputs)",
                 fontsize=11)
    return fig


def select_layers(named: list[tuple[str, GBLRLinear]], layers: bool | str) -> list[tuple[str, GBLRLinear]]:
    """The ``(name, layer)`` pairs chosen by ``layers``: ``True`` all, ``False`` none, a string those whose name
    matches it as a regular expression (``re.search``; ``""`` matches all)."""
    if isinstance(layers, str):
        pattern = re.compile(layers)
        return [(n, m) for n, m in named if pattern.search(n)]
    return list(named) if layers else []


def iter_structure_figures(model: nn.Module, layers: bool | str = True, max_size: int = 256, budget: float | None = None,
                           overview: bool = True, flops: bool = True, footprints: bool = True) -> Iterator[tuple[str, Figure]]:
    """``(name, figure)`` of every figure of ``model``, built one at a time (so a caller that saves and drops each
    one holds a single figure): ``overview``, ``width_histograms``, ``flops_by_type``, ``flops_by_depth``,
    ``footprint_grid`` and, with ``layers``, ``{layer}/weights`` (:func:`weight_heatmap`) and ``{layer}/windows``
    (:func:`component_windows`) for every GBLR layer, or with a regular expression for the layers whose name
    matches it (:func:`select_layers`).  The per-layer figures are most of the cost for a deep model (about 0.1 s
    each).  Nothing without GBLR layers."""
    named = gblr_layers(model)
    if not named:
        return
    chosen = select_layers(named, layers)  # a bad regular expression fails before any drawing
    if overview:
        yield "overview", model_overview(model, budget)
        yield "width_histograms", width_histograms(model)
    if flops:
        yield "flops_by_type", flops_chart(model)
        yield "flops_by_depth", flops_depth_chart(model)
    if footprints:
        yield "footprint_grid", footprint_grid_figure(model, min(int(max_size), 96))
    for name, layer in chosen:
        yield f"{name}/weights", weight_heatmap(layer, name, max_size)
        yield f"{name}/windows", component_windows(layer, name)


def structure_figures(model: nn.Module, layers: bool | str = True, max_size: int = 256, budget: float | None = None,
                      overview: bool = True, flops: bool = True, footprints: bool = True) -> dict[str, Figure]:
    """All figures of :func:`iter_structure_figures` in a dict by name (empty without GBLR layers)."""
    return dict(iter_structure_figures(model, layers, max_size, budget, overview, flops, footprints))
