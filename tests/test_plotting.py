"""Structure figures: read back what a person sees (size, not blank, labels) and what is drawn (bars, cells)."""

from __future__ import annotations

import io
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from gsm_lightning.core.layer import GBLRLinear
from gsm_lightning.report.plotting import (
    DPI,
    component_windows,
    figure_png,
    flops_chart,
    flops_depth_chart,
    footprint,
    footprint_grid_figure,
    model_overview,
    save_figure,
    structure_figures,
    weight_heatmap,
    width_histograms,
    window_segments,
)
from gsm_lightning.report.structure import flops_by_depth, layer_depth, layer_stats, structure_table

from .helpers import hand_layer

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "gsm_lightning"




def small_model() -> nn.Module:
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Module() for _ in range(11)])
    model.blocks[0].q = GBLRLinear(16, 16, width_init=0.5, location_init="uniform")
    model.blocks[2].fc1 = GBLRLinear(16, 32, width_init=0.25, location_init="random")
    model.blocks[10].fc2 = GBLRLinear(32, 16, width_init=0.25).freeze_structure()
    model.head = hand_layer()
    model.budget = 0.4
    return model


def png_pixels(fig) -> np.ndarray:
    """The figure as a PNG, decoded: (H, W) grayscale, after checking the PNG is the figure's size."""
    data = figure_png(fig)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(data))
    w, h = fig.get_size_inches() * DPI
    assert img.size == (round(w), round(h))
    return np.asarray(img.convert("L"), dtype=np.float64)


def assert_readable(fig) -> np.ndarray:
    pixels = png_pixels(fig)
    assert pixels.shape[1] >= 600 and pixels.shape[0] >= 400
    assert pixels.std() > 5  # not blank
    assert (pixels < 100).mean() > 0.002  # dark ink: text, ticks, cells
    return pixels


def all_text(fig) -> str:
    """Every text a person can read on the figure: titles, axis labels, tick labels, free text."""
    parts = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text") and callable(a.get_text))]
    return "\n".join(p for p in parts if isinstance(p, str))


# ------------------------------------------------------------------------------ per layer
def test_weight_heatmap_shows_w_on_its_support_with_labels():
    layer = hand_layer()
    fig = weight_heatmap(layer, "blocks.0.attn.q")
    ax, cax = fig.axes
    title = ax.get_title()
    assert "blocks.0.attn.q" in title and "12 x 10" in title and "FLOPs 17.5% of dense" in title
    assert "2/3 components active" in title and "rank 2" in title
    assert "input" in ax.get_xlabel() and "output" in ax.get_ylabel()
    assert "|W_ij|" in cax.get_ylabel()  # the colorbar says what the colors are
    shown = ax.images[0].get_array()
    support = footprint(layer) > 0
    assert np.array_equal(np.ma.getmaskarray(shown), ~support.numpy())  # white exactly outside every window
    want = layer.to_dense().detach().abs()
    np.testing.assert_allclose(shown.filled(0), torch.where(support, want, 0).numpy(), rtol=1e-6)
    assert tuple(ax.images[0].get_extent()) == (0, 10, 12, 0)  # axes in feature indices
    pixels = assert_readable(fig)
    assert (pixels == 255).mean() > 0.1  # the white area of the zero cells (and the margins)


def test_weight_heatmap_pools_large_layers_keeping_the_peak():
    layer = GBLRLinear(300, 600, width_init=0.3, location_init="random")
    fig = weight_heatmap(layer, "big", max_size=64)
    shown = fig.axes[0].images[0].get_array()
    assert shown.shape == (64, 32)  # longer side max_size, aspect kept
    assert float(shown.max()) == pytest.approx(float(layer.to_dense().detach().abs().max()), rel=1e-6)
    assert "600 x 300" in fig.axes[0].get_title()


def test_window_segments_wrap():
    assert window_segments(8, 4, 10) == [(8, 2), (0, 2)]
    assert window_segments(0, 10, 10) == [(0, 10)]
    assert window_segments(3, 0, 10) == []
    assert window_segments(15, 3, 10) == [(5, 3)]  # location taken modulo n
    assert window_segments(5, 12, 10) == [(5, 5), (0, 5)]  # never wider than the side


def bars(ax) -> set[tuple[float, float, float]]:
    """(x0, x1, row) of every bar drawn on a component-window panel."""
    (coll,) = ax.collections
    out = set()
    for path in coll.get_paths():
        v = path.vertices
        out.add((float(v[:, 0].min()), float(v[:, 0].max()), round(float(v[:, 1].min() + v[:, 1].max()) / 2, 6)))
    return out


def test_component_windows_draw_each_active_window_sorted_and_wrapped():
    fig = component_windows(hand_layer(), "blocks.0.attn.q")
    ax_in, ax_out = fig.axes
    # component 1 (input location 0) first, then component 0 (location 8); component 2 is inactive
    assert bars(ax_in) == {(0, 10, 0), (8, 10, 1), (0, 2, 1)}
    assert bars(ax_out) == {(1, 3, 0), (10, 12, 1), (0, 3, 1)}
    assert ax_in.get_xlim() == (0, 10) and ax_out.get_xlim() == (0, 12)
    assert ax_in.get_ylim()[0] > ax_in.get_ylim()[1]  # first component on top
    assert ax_in.get_title() == "input windows (in = 10)" and ax_out.get_title() == "output windows (out = 12)"
    assert "input" in ax_in.get_xlabel() and "output" in ax_out.get_xlabel() and "component" in ax_in.get_ylabel()
    suptitle = fig.get_suptitle()
    assert "blocks.0.attn.q" in suptitle and "2/3 components active" in suptitle
    assert_readable(fig)


def test_component_windows_of_a_layer_without_active_component():
    layer = GBLRLinear(8, 8, num_components=2, width_init=0.5)
    with torch.no_grad():
        layer.widths[1] = 0
    fig = component_windows(layer, "dead")
    assert "no active component" in all_text(fig) and "0/2 components active" in all_text(fig)
    assert all(not ax.collections[0].get_paths() for ax in fig.axes)
    assert_readable(fig)


# ------------------------------------------------------------------------------ model
def test_model_overview_one_labelled_row_per_layer():
    model = small_model()
    rows = structure_table(model)
    fig = model_overview(model)
    ax_w, ax_r, ax_f = fig.axes
    assert [t.get_text() for t in ax_w.get_yticklabels()] == [f"{r['name']}  ({r['type']})" for r in rows]
    n = len(rows)
    np.testing.assert_allclose([p.get_width() for p in ax_w.patches],
                               [r["width_in"] for r in rows] + [r["width_out"] for r in rows])
    np.testing.assert_allclose([p.get_width() for p in ax_r.patches],
                               [min(r["in_features"], r["out_features"]) for r in rows] + [r["rank"] for r in rows])
    np.testing.assert_allclose([p.get_width() for p in ax_f.patches], [100 * r["flops_ratio"] for r in rows])
    (budget_line,) = ax_f.lines
    assert list(budget_line.get_xdata()) == [40.0, 40.0]
    for ax in (ax_w, ax_r, ax_f):
        assert ax.get_xlabel() and ax.get_title()
    assert f"{n} layers" in fig.get_suptitle() and "budget 40%" in fig.get_suptitle()
    texts = all_text(fig)
    assert all(f"{100 * r['flops_ratio']:.1f}%" in texts for r in rows)  # each bar says its FLOPs %
    assert_readable(fig)


def test_flops_by_type_and_depth_charts():
    model = small_model()
    assert [layer_depth(n) for n in ("blocks.10.fc2", "encoder.layer.3.output.dense", "head")] == [10, 3, None]
    groups = flops_by_depth(model)
    assert list(groups) == ["0", "2", "10", "other"]  # numeric order, layers without an index last
    assert groups["other"]["flops"] == model.head.flops()
    fig = flops_depth_chart(model)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["block 0", "block 2", "block 10", "other"]
    heights = [p.get_height() for p in ax.patches]
    assert heights[:4] == [g["dense_flops"] for g in groups.values()] and heights[4:] == [g["flops"] for g in groups.values()]
    assert "FLOPs by depth" in ax.get_title() and ax.get_ylabel() == "multiply-adds per token"
    assert_readable(fig)
    fig = flops_chart(model)
    assert "FLOPs by layer type" in fig.axes[0].get_title()
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["query", "mlp_fc1", "mlp_fc2", "other"]
    assert_readable(fig)


def test_width_histograms_count_every_active_component():
    model = small_model()
    fig = width_histograms(model)
    ax_in, ax_out = fig.axes
    layers = [model.blocks[0].q, model.blocks[2].fc1, model.blocks[10].fc2, model.head]
    active = sum(int(layer_stats(m)["active"]) for m in layers)
    total = sum(m.num_components for m in layers)
    for ax in (ax_in, ax_out):
        top = ax.patches[-1].get_data()  # stacked step artists, one per layer type: the last one is the stack's top
        assert top.values.sum() == active  # stacked: every active component once
        assert ax.get_xlim() == (0, 1) and "width" in ax.get_xlabel()
    # the head's input widths 0.4 and 1.0 (inactive third component left out) land in their bins
    head = ax_in.patches[-1].get_data()
    counts = head.values - head.baseline
    assert sorted(round(float(head.edges[i]), 2) for i in np.flatnonzero(counts)) == [0.4, 0.95]
    assert counts.sum() == 2
    assert f"{active} active components ({total - active} of {total}" in fig.get_suptitle()
    assert "active components" in ax_in.get_ylabel()
    assert_readable(fig)


def test_footprint_grid_figure_names_every_layer():
    model = small_model()
    fig = footprint_grid_figure(model, max_size=24)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.texts]
    names = ["blocks.0.q", "blocks.2.fc1", "blocks.10.fc2", "head"]
    assert [label.split("\n")[0] for label in labels] == names
    assert "12x10, 18% FLOPs, 2/3" in labels[3]
    mosaic = ax.images[0].get_array()
    # every covered cell is shown with its count, everything else (gaps, uncovered cells) is white
    shown = np.unique(mosaic.compressed())
    layers = (model.blocks[0].q, model.blocks[2].fc1, model.blocks[10].fc2, model.head)
    drawn = np.unique(np.concatenate([footprint(m, 24).flatten().numpy() for m in layers]))
    assert shown.min() > 0 and set(shown.tolist()) == set(drawn[drawn > 0].tolist())
    assert np.ma.getmaskarray(mosaic).any()
    assert "components covering" in fig.axes[1].get_ylabel()
    assert_readable(fig)


def test_structure_figures_and_save(tmp_path):
    model = small_model()
    figs = structure_figures(model, layers=True, max_size=32)
    names = ["blocks.0.q", "blocks.2.fc1", "blocks.10.fc2", "head"]
    assert set(figs) == {"overview", "width_histograms", "flops_by_type", "flops_by_depth", "footprint_grid",
                         *(f"{n}/{k}" for n in names for k in ("weights", "windows"))}
    path = save_figure(figs["head/windows"], str(tmp_path / "sub" / "w.png"))
    with Image.open(path) as img:
        assert img.size == (1000, 500)
    assert structure_figures(nn.Linear(3, 3)) == {}


def test_plotting_report_and_structure_import_neither_lightning_nor_pyplot():
    """Static walk of the imports (function-level ones too) of the modules the report needs, within the package."""
    from .test_imports import GRAPH

    seen: set[str] = set()
    todo = ["gsm_lightning.report.plotting", "gsm_lightning.report.command", "gsm_lightning.report.structure"]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        inner, outer = GRAPH[mod]
        for name in outer:
            assert not name.startswith("lightning"), f"{mod} imports {name}"
            assert name != "matplotlib.pyplot", f"{mod} imports pyplot"
        todo += sorted(inner)
    assert {"gsm_lightning.core.layer", "gsm_lightning.io.checkpoint"} <= seen
    assert not any(m.startswith("gsm_lightning.training") for m in seen)
