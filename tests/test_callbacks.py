"""Structure callbacks: what a real (tiny) fit writes to TensorBoard, CSV and the report files."""

from __future__ import annotations

import csv
import functools
import io
import json
import os

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from torch import nn

from gsm_lightning.core.conversion_spec import Conversion
from gsm_lightning.core.layer import GBLRLinear, gblr_layers
from gsm_lightning.learn.rules import BudgetRule
from gsm_lightning.training.callbacks import (
    LAYER_GROUPS,
    StructureMonitor,
    StructureReport,
    StructureVisualizer,
    flops_by_group,
    flops_chart,
    footprint,
    footprint_grid,
    footprint_image,
    format_structure_table,
    layer_group,
    layer_stats,
    structure_metrics,
    structure_summary,
    structure_table,
)
from gsm_lightning.training.module import GSMModule

from .helpers import digits_loaders, hand_layer

MAX_SIZE = 48


def make_module(phase1_epochs: int = 1) -> GSMModule:
    module = GSMModule(
        nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32), nn.GELU(), nn.Linear(32, 10)),
        num_classes=10, budget=0.5, conversion=Conversion(include=["0", "2"]), phase1_epochs=phase1_epochs,
        # the plain energy cut (cost_power 0): on this run the phase switch then leaves phase 1's structure as it is,
        # which the figure-schedule tests below rely on (with the default 0.3 the switch changes it on this run, and
        # the model figures are rightly drawn again at the end)
        rule=BudgetRule(structure_lr=0.02, cost_power=0.0),
        optimizer=functools.partial(torch.optim.AdamW, lr=3e-3),  # picklable for ddp_spawn
    )
    module.example_input_array = torch.randn(4, 64)
    return module


def fit(tmp_path, logger, callbacks, epochs: int = 3):
    module = make_module()
    train, val = digits_loaders(n_train=256)
    trainer = Trainer(max_epochs=epochs, logger=logger, callbacks=callbacks, accelerator="cpu", devices=1,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path), log_every_n_steps=1)
    trainer.fit(module, train, val)
    return trainer, module


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp = tmp_path_factory.mktemp("tb")
    torch.manual_seed(0)
    report = StructureReport(print_table=False)
    trainer, module = fit(tmp, TensorBoardLogger(str(tmp), name="tb"),
                          [StructureMonitor(), StructureVisualizer(max_size=MAX_SIZE, log_layer_figures=True), report])
    acc = EventAccumulator(trainer.logger.log_dir,
                           size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return trainer, module, acc, report


def scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


# ------------------------------------------------------------------------------ real fit, TensorBoard
def test_monitor_scalars(tb_run):
    trainer, module, acc, _ = tb_run
    ratio = scalars(acc, "structure/flops_ratio")
    assert len(ratio) == 3  # one per epoch
    assert all(0 < v <= 1.1 for _, v in ratio)
    assert ratio[-1][1] == pytest.approx(module.flops_ratio())
    assert [v for _, v in scalars(acc, "structure/phase")] == [1.0, 2.0, 2.0]
    assert [v for _, v in scalars(acc, "structure/target")] == [0.5] * 3
    # only while learning; sigma rises every step and ends the one-epoch phase 1 at sigma1
    assert [v for _, v in scalars(acc, "structure/sigma")] == [100.0]
    steps = [s for s, _ in ratio]
    assert steps == sorted(steps) and steps[-1] == trainer.global_step
    for name, layer in gblr_layers(module):
        for stat in ("width_in", "width_out", "width_in_all", "width_out_all"):
            values = [v for _, v in scalars(acc, f"structure/{name}/{stat}")]
            assert len(values) == 3 and all(0 <= v <= 1 for v in values)
        final = layer_stats(layer)
        for stat in ("width_in", "width_out", "flops_ratio", "rank", "params"):
            assert scalars(acc, f"structure/{name}/{stat}")[-1][1] == pytest.approx(final[stat], rel=1e-6)
    assert scalars(acc, "structure/flops")[-1][1] == sum(m.flops() for _, m in gblr_layers(module))
    # the default budget learner: its path target while learning, then the ratio phase 1 reached and the projection
    assert [v for _, v in scalars(acc, "structure/target_path")] == [0.5]  # the path ends at 40% of phase 1
    end = scalars(acc, "structure/phase1_end_ratio")
    assert [s for s, _ in end] == steps[1:]
    assert all(v == pytest.approx(module.phase1_end_ratio) for _, v in end)
    assert module.phase1_end_ratio <= 0.5 + 1e-9
    assert [v for _, v in scalars(acc, "structure/projection")] == [0.0, 0.0]
    # per layer type: both layers are "other"; widths averaged over their active components, FLOPs-weighted ratio
    stats = [layer_stats(m) for _, m in gblr_layers(module)]
    active = sum(st["active"] for st in stats)
    for side in ("in", "out"):
        values = scalars(acc, f"structure/by_type/other/width_{side}")
        assert len(values) == 3
        assert values[-1][1] == pytest.approx(sum(st[f"width_{side}"] * st["active"] for st in stats) / active, rel=1e-6)
    assert scalars(acc, "structure/by_type/other/flops_ratio")[-1][1] == pytest.approx(module.flops_ratio())


def test_monitor_writes_custom_scalars_layout(tb_run):
    import re

    from tensorboard.plugins.custom_scalar import layout_pb2

    _, _, acc, _ = tb_run
    events = acc.Tensors("custom_scalars__config__")
    assert len(events) == 1  # once per fit
    layout = layout_pb2.Layout()
    layout.ParseFromString(events[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    logged = acc.Tags()["scalars"]

    def matched(chart_word):
        (title,) = [t for t in charts if chart_word in t]
        return {tag for tag in logged if any(re.search(rx, tag) for rx in charts[title])}

    # the FLOPs ratio shares one chart with its targets; every regex matches logged tags only as meant
    assert matched("FLOPs ratio vs target") == {"structure/flops_ratio", "structure/target", "structure/target_path",
                                                "structure/phase1_end_ratio"}
    assert matched("sigma") == {"structure/sigma"} and matched("phase (") == {"structure/phase"}
    assert matched("input width by layer type") == {"structure/by_type/other/width_in"}
    assert matched("output width by layer type") == {"structure/by_type/other/width_out"}


def test_visualizer_histograms_and_images(tb_run):
    from PIL import Image

    _, module, acc, _ = tb_run
    tags = acc.Tags()
    names = [n for n, _ in gblr_layers(module)]
    for name, layer in gblr_layers(module):
        for side in ("in", "out"):
            hist = acc.Histograms(f"structure/{name}/widths_{side}")
            assert len(hist) == 4  # train start + 3 epochs
            h = hist[-1].histogram_value
            assert 0 <= h.min <= h.max <= 1 and h.num == layer.num_components
        images = acc.Images(f"structure/{name}/footprint")
        assert len(images) == 4
        last = images[-1]
        assert max(last.width, last.height) <= MAX_SIZE
        decoded = np.asarray(Image.open(io.BytesIO(last.encoded_image_string)), dtype=np.float64)
        if decoded.ndim == 3:
            decoded = decoded[..., 0]
        want = footprint_image(layer, MAX_SIZE)[0].numpy() * 255
        assert decoded.shape == want.shape
        assert np.abs(decoded - want).max() <= 1.0
        assert (decoded > 0).any()
    assert "structure/footprint_grid" in tags["images"]
    assert "structure/flops_by_type" in tags["images"]
    assert len(names) == 2
    # labelled matplotlib figures (add_figure) at a readable size, the model's and per layer: only at the end of
    # each phase (phase 1 is epoch 0: 4 optimizer steps; phase 2 ends with training)
    final_step = acc.Scalars("structure/flops_ratio")[-1].step
    assert final_step == 12
    layer_tags = [f"structure/{n}/{kind}" for n in names for kind in ("weights", "windows")]
    model_tags = [f"structure/{t}" for t in ("overview", "flops_by_type", "flops_by_depth", "width_histograms",
                                              "footprint_grid")]
    for tag in layer_tags + model_tags:
        events = acc.Images(tag)
        # the model figures show only the structure: the switch left it as phase 1 ended, so not drawn again
        assert [e.step for e in events] == ([4] if tag in model_tags else [4, final_step]), tag
        assert events[-1].width >= 600 and events[-1].height >= 400, tag
        pixels = np.asarray(Image.open(io.BytesIO(events[-1].encoded_image_string)).convert("L"), dtype=np.float64)
        assert pixels.shape == (events[-1].height, events[-1].width)
        assert pixels.std() > 5 and (pixels < 128).mean() > 0.005, tag  # not blank: dark text, bars or cells


def test_model_figures_are_redrawn_only_for_another_structure():
    from gsm_lightning.training.callbacks.structure_visualizer import _structure_key

    torch.manual_seed(0)
    model = nn.Sequential(GBLRLinear(16, 8, num_components=4), GBLRLinear(8, 8, num_components=3))
    key = _structure_key(gblr_layers(model))
    with torch.no_grad():
        model[0].weight_in.mul_(2.0)  # weights are not what the figures show
    assert _structure_key(gblr_layers(model)) == key
    with torch.no_grad():
        model[1].widths[0, 1] = 0.5
    assert _structure_key(gblr_layers(model)) != key
    with torch.no_grad():
        model[1].widths[0, 1] = 0.0  # an empty component drawn as nothing, like one dropped at the switch
    empty = _structure_key(gblr_layers(model))
    with torch.no_grad():
        model[1].locations[0, 1] = 0.7
    assert _structure_key(gblr_layers(model)) == empty


def test_report_files_match_layers(tb_run):
    trainer, module, _, report = tb_run
    json_path, csv_path = report.paths
    assert os.path.dirname(json_path) == trainer.logger.log_dir
    with open(json_path) as f:
        data = json.load(f)
    layers = dict(gblr_layers(module))
    assert [r["name"] for r in data["layers"]] == list(layers)
    for row in data["layers"]:
        layer = layers[row["name"]]
        assert row["flops"] == layer.flops() and row["dense_flops"] == layer.dense_flops()
        assert row["params"] == layer.params() and row["active"] == int(layer.active_components().sum())
        assert row["flops_ratio"] == pytest.approx(layer.flops_ratio())
    g = sum(m.flops() for m in layers.values())
    totals = data["totals"]
    assert totals["gblr_layers"]["flops"] == g
    assert totals["dense_linear_layers"] == {"layers": 1, "flops": 32 * 10, "params": 32 * 10 + 10}
    assert totals["model"]["flops_per_token"] == g + 320
    assert totals["model"]["dense_flops_per_token"] == 64 * 128 + 128 * 32 + 320
    assert totals["model"]["stored_params"] == sum(p.numel() for p in module.parameters())
    assert data["phase"] == 2 and data["target_flops_ratio"] == 0.5
    assert "counted_per_token" in data["accounting"] and "not_counted" in data["accounting"]
    fc = data["flop_counter"]  # 4 example rows through every linear layer, FLOPs = 2 x MACs
    assert fc["flops"] == fc["analytic_flops"] == 2 * 4 * (g + 320)
    assert fc["dense_flops"] == 2 * 4 * totals["model"]["dense_flops_per_token"]
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [*layers, "TOTAL_GBLR", "TOTAL_MODEL_PER_TOKEN"]
    assert int(rows[-2]["flops"]) == g and int(rows[0]["flops"]) == layers[rows[0]["name"]].flops()


# ------------------------------------------------------------------------------ other loggers
def test_step_interval_with_csv_logger_skips_pictures(tmp_path):
    logger = CSVLogger(str(tmp_path), name="csv")
    with pytest.warns(UserWarning, match="add_histogram"):
        trainer, _ = fit(tmp_path, logger, [StructureMonitor("step", log_every_n_steps=3, log_per_layer=False),
                                            StructureVisualizer(log_images=False, log_flops_chart=False)], epochs=2)
    with open(os.path.join(logger.log_dir, "metrics.csv"), newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("structure/flops_ratio")]
    assert trainer.global_step == 8
    assert len(rows) == 2  # global steps 3 and 6
    assert not any(k.startswith("structure/backbone") for k in rows[0])
    assert [float(r["structure/phase"]) for r in rows] == [1.0, 2.0]


class FigureRecorder(Logger):
    """A logger whose experiment only has ``add_figure``: records (tag, step, size in pixels) of every figure."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: list[tuple[str, int, tuple[int, int]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    @property
    def experiment(self):
        return self

    def add_figure(self, tag, figure, global_step=None, close=True) -> None:
        w, h = figure.get_size_inches() * figure.dpi
        self.figures.append((tag, global_step, (round(w), round(h))))

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def test_visualizer_layer_figure_schedule(tmp_path):
    logger = FigureRecorder()
    with pytest.warns(UserWarning, match="add_histogram"):  # only add_figure here: the rest is skipped
        fit(tmp_path, logger, [StructureVisualizer(layer_figures_every_n_epochs=2)])
    steps: dict[str, list[int]] = {}
    for tag, step, (w, h) in logger.figures:
        steps.setdefault(tag, []).append(step)
        assert w >= 600 and h >= 400, tag
    # 4 optimizer steps per epoch, phase 1 = epoch 0: model figures at the end of phase 1 only (the end of training
    # has the same structure); per-layer figures (switched on by their interval) at the start, at the end of
    # phase 1, after epoch 2 (every 2 epochs) and at the end of training
    assert steps["structure/overview"] == steps["structure/footprint_grid"] == [4]
    for name in ("backbone.0", "backbone.2"):
        assert steps[f"structure/{name}/weights"] == steps[f"structure/{name}/windows"] == [0, 4, 8, 12]
    assert len(steps) == 5 + 4


class PictureRecorder(FigureRecorder):
    """:class:`FigureRecorder` that also records histograms and images: ``pictures[(kind, tag)] = [steps]``."""

    def __init__(self) -> None:
        super().__init__()
        self.pictures: dict[tuple[str, str], list[int]] = {}

    def add_figure(self, tag, figure, global_step=None, close=True) -> None:
        super().add_figure(tag, figure, global_step, close)
        self.pictures.setdefault(("figure", tag), []).append(global_step)

    def add_histogram(self, tag, values, global_step=None, *args, **kwargs) -> None:
        self.pictures.setdefault(("histogram", tag), []).append(global_step)

    def add_image(self, tag, image, global_step=None, *args, **kwargs) -> None:
        self.pictures.setdefault(("image", tag), []).append(global_step)

    def steps(self, kind: str, suffix: str) -> set[tuple[int, ...]]:
        """The step lists of every tag of ``kind`` ending in ``suffix`` (one set element when all agree)."""
        return {tuple(v) for (k, tag), v in self.pictures.items() if k == kind and tag.endswith(suffix)}


def fit_module(tmp_path, module, logger, callbacks, epochs: int):
    train, val = digits_loaders(n_train=256)  # 4 optimizer steps per epoch
    trainer = Trainer(max_epochs=epochs, logger=logger, callbacks=callbacks, accelerator="cpu", devices=1,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path), log_every_n_steps=1, limit_val_batches=1)
    trainer.fit(module, train, val)
    return trainer


def test_visualizer_draws_figures_only_at_phase_ends_by_default(tmp_path):
    """Default: cheap pictures every epoch, matplotlib figures only at the end of phase 1 and of training (there
    only for a structure the switch changed), no per-layer figure; a figure interval adds the start and its epochs,
    never a second drawing at one step nor of one structure."""
    logger = PictureRecorder()
    fit_module(tmp_path, make_module(), logger, [StructureVisualizer()], epochs=3)  # phase 1 = epoch 0
    figures = {tag for kind, tag in logger.pictures if kind == "figure"}
    assert figures == {f"structure/{t}" for t in ("overview", "flops_by_type", "flops_by_depth", "width_histograms",
                                                   "footprint_grid")}  # nothing per layer
    assert logger.steps("figure", "") == {(4,)}  # the switch kept phase 1's structure: not drawn again at 12
    assert logger.steps("histogram", "/widths_in") == logger.steps("image", "/footprint") == {(0, 4, 8, 12)}

    logger = PictureRecorder()
    module = make_module(phase1_epochs=2)  # phase 1 ends after epoch 1 (step 8), also on the figure interval
    module.rule.regrowth = None  # its fill at the switch would change the structure (and rightly draw it again)
    fit_module(tmp_path, module, logger, [StructureVisualizer(every_n_epochs=3, figures_every_n_epochs=2)], epochs=4)
    assert logger.steps("figure", "/overview") == {(0, 8)}  # 16: on the interval, but phase 1's structure still
    assert logger.steps("histogram", "/widths_out") == {(0, 8, 12, 16)}  # start, phase end, every 3, end
    assert not any(tag.endswith(("/weights", "/windows")) for _, tag in logger.pictures)


class OwnFreeze(pl.LightningModule):
    """Not a GSMModule (no ``phase1_epochs``): freezes its one GBLR layer itself at the start of epoch 1."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = GBLRLinear(64, 10, sigma=1.0)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == 1:
            self.layer.freeze_structure()


def test_visualizer_finds_the_end_of_phase_1_of_any_module(tmp_path):
    logger = PictureRecorder()
    fit_module(tmp_path, OwnFreeze(), logger, [StructureVisualizer(log_layer_figures=True, log_on_train_start=False)],
               epochs=3)
    # phase 1 ends when the layer is found frozen (first batch of epoch 1, after 4 steps), phase 2 with training
    assert logger.steps("figure", "/windows") == logger.steps("figure", "/weights") == {(4, 12)}  # weights change
    assert logger.steps("figure", "/overview") == {(4,)}  # the structure does not
    assert ("figure", "structure/layer/windows") in logger.pictures
    assert logger.steps("histogram", "") == {(4, 8, 12)}  # every epoch; once at the step phase 1 ended


def test_no_logger_writes_report_to_root_dir(tmp_path, capsys):
    report = StructureReport(filename="layout")
    with pytest.warns(UserWarning, match="no logger"):
        fit(tmp_path, False, [StructureMonitor(), StructureVisualizer(), report], epochs=1)
    assert report.paths == (str(tmp_path / "layout.json"), str(tmp_path / "layout.csv"))
    assert all(os.path.isfile(p) for p in report.paths)
    assert "backbone.0" in capsys.readouterr().out


# ------------------------------------------------------------------------------ pieces


def test_footprint_counts_and_pooling():
    layer = hand_layer()
    want = torch.zeros(12, 10)
    for (wi, wo), (li, lo) in zip([(4, 5), (10, 2), (3, 0)], [(8, 10), (0, 1), (2, 1)]):
        rows, cols = (lo + torch.arange(wo)) % 12, (li + torch.arange(wi)) % 10
        want[rows[:, None], cols[None, :]] += 1
    fp = footprint(layer)
    assert torch.equal(fp, want)
    assert fp.max() == 2  # components 0 and 1 overlap
    layer.freeze_structure()  # drops the inactive third component and zeroes the factors outside the masks
    assert torch.equal(footprint(layer), want)
    assert torch.equal(layer.to_dense() != 0, want > 0)
    pooled = footprint(layer, max_size=6)
    assert pooled.shape == (6, 5)  # aspect ratio kept
    torch.testing.assert_close(pooled, torch.nn.functional.adaptive_avg_pool2d(want[None], (6, 5))[0])
    img = footprint_image(layer, 6)
    assert img.shape == (1, 6, 5) and torch.equal(img[0] > 0, pooled > 0) and img.max() == 1


def test_footprint_grid_layout():
    grid = footprint_grid([torch.ones(1, 4, 8), torch.ones(1, 8, 8), torch.ones(1, 2, 2)], tile=8, pad=1)
    assert grid.shape == (1, 2 * 9 + 1, 2 * 9 + 1)
    assert grid[0, 1:5, 1:9].eq(1).all() and grid[0, 5:9, 1:9].eq(0).all()  # 4x8 scaled to 4x8, rest black
    assert grid[0, 10:18, 1:9].eq(1).all() and grid[0, 0].eq(0.5).all()
    with pytest.raises(ValueError, match="at least one"):
        footprint_grid([])


def test_layer_stats_and_metrics():
    layer = hand_layer()
    st = layer_stats(layer)
    assert st["active"] == 2 and st["components"] == 3 and st["rank"] == 2
    assert st["width_in"] == pytest.approx((0.4 + 1.0) / 2) and st["width_out"] == pytest.approx((5 / 12 + 2 / 12) / 2)
    assert st["width_in_all"] == pytest.approx((0.4 + 1.0 + 0.3) / 3)
    assert st["flops"] == layer.flops() == 4 + 5 + 10 + 2 and st["flops_ratio"] == pytest.approx(21 / 120)
    other = GBLRLinear(20, 8, width_init=0.5)
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(12, 20), other)
    m = structure_metrics(model, prefix="s")
    assert m["s/flops_ratio"] == pytest.approx((21 + other.flops()) / (120 + 160))
    assert m["s/0/width_in"] == st["width_in"] and "s/3/flops" in m and "s/phase" in m and m["s/phase"] == 1
    assert "s/sigma" not in m  # pure Dirichlet (sigma = inf) everywhere
    other.set_sigma(3.0)
    assert structure_metrics(model, prefix="s")["s/sigma"] == 3.0  # over the finite sigmas of learning layers
    assert "s/target" not in m
    assert structure_metrics(nn.Linear(3, 3)) == {}
    assert not any("/0/" in k for k in structure_metrics(model, per_layer=False))


def test_structure_summary_counts_other_linear_layers():
    gblr = GBLRLinear(16, 24, width_init=0.5).freeze_structure()
    model = nn.Sequential(nn.Embedding(5, 16), gblr, nn.Linear(24, 6, bias=False))
    s = structure_summary(model)
    assert structure_table(model) == s["layers"]
    t = s["totals"]["model"]
    assert t["flops_per_token"] == gblr.flops() + 24 * 6 and t["dense_flops_per_token"] == 16 * 24 + 24 * 6
    assert t["params"] == 5 * 16 + gblr.params() + 24 * 6
    assert t["dense_params"] == 5 * 16 + 16 * 24 + 24 + 24 * 6
    text = format_structure_table(s)
    assert "model total" in text and f"{gblr.flops():,}" in text
    s2 = structure_summary(model, example_input=torch.tensor([[0, 1, 2]]))
    assert s2["flop_counter"]["flops"] == 2 * 3 * (gblr.flops() + 24 * 6)

    from gsm_lightning.core.baselines import LowRankLinear

    low = LowRankLinear(6, 8, rank=2)
    s3 = structure_summary(nn.Sequential(model, low))
    assert s3["totals"]["other_structured_layers"] == {"layers": 1, "flops": low.flops(), "dense_flops": 48,
                                                       "params": low.params(), "dense_params": 48 + 8}
    assert s3["totals"]["model"]["flops_per_token"] == gblr.flops() + 24 * 6 + low.flops()
    assert s3["totals"]["model"]["params"] == t["params"] + low.params()


def test_layer_groups():
    cases = {
        "blocks.0.attn.q": "query", "blocks.0.attn.k": "key", "blocks.0.attn.v": "value",
        "encoder.layer.3.attention.self.query": "query", "encoder.layer.3.attention.output.dense": "attn_out",
        "encoder.layer.3.intermediate.dense": "mlp_fc1", "encoder.layer.3.output.dense": "mlp_fc2",
        "transformer.h.1.attn.c_attn": "qkv", "transformer.h.1.attn.c_proj": "attn_out",
        "transformer.h.1.mlp.c_fc": "mlp_fc1", "transformer.h.1.mlp.c_proj": "mlp_fc2",
        "blocks.2.attn.proj": "attn_out", "blocks.2.mlp.fc1": "mlp_fc1", "blocks.2.mlp.fc2": "mlp_fc2",
        "layers.0.self_attn.out_proj": "attn_out", "model.layers.0.mlp.down_proj": "mlp_fc2",
        "blocks.4.token_mlp.fc1": "token_mixing", "blocks.4.channel_mlp.fc2": "channel_mixing",
        "blocks.4.mlp_tokens.fc2": "token_mixing", "blocks.4.mlp_channels.fc1": "channel_mixing",
        "head": "other", "backbone.0": "other", "": "other",
    }
    for name, group in cases.items():
        assert layer_group(name) == group, name
        assert group in LAYER_GROUPS


def test_flops_by_group_and_chart():
    model = nn.Module()
    model.attn = nn.Module()
    model.attn.q = GBLRLinear(16, 16, width_init=0.5)
    model.mlp = nn.Module()
    model.mlp.fc1 = GBLRLinear(16, 32, width_init=0.25)
    model.mlp.fc2 = GBLRLinear(32, 16, width_init=0.25)
    groups = flops_by_group(model)
    assert list(groups) == ["query", "mlp_fc1", "mlp_fc2"]
    assert groups["query"] == {"flops": model.attn.q.flops(), "dense_flops": 256, "layers": 1}
    fig = flops_chart(model)
    bars = fig.axes[0].patches
    assert sorted(b.get_height() for b in bars) == sorted([256, 512, 512] + [g["flops"] for g in groups.values()])


def test_constructor_errors():
    with pytest.raises(ValueError, match="logging_interval"):
        StructureMonitor("batch")
    with pytest.raises(ValueError, match="log_every_n_steps"):
        StructureMonitor("step", log_every_n_steps=0)
    with pytest.raises(ValueError, match="every_n_epochs"):
        StructureVisualizer(every_n_epochs=0)
    with pytest.raises(ValueError, match="max_size"):
        StructureVisualizer(max_size=2)
    with pytest.raises(ValueError, match="layer_figures_every_n_epochs"):
        StructureVisualizer(layer_figures_every_n_epochs=0)
    with pytest.raises(ValueError, match="filename"):
        StructureReport(filename="a/b")
    with pytest.raises(ValueError, match="max_size"):
        footprint(hand_layer(), max_size=0)


@pytest.mark.slow
def test_ddp_two_processes(tmp_path):
    """Two CPU processes (gloo): rank 0 alone writes the report, TensorBoard gets the tags once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = make_module()
    train, val = digits_loaders(n_train=256)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = Trainer(max_epochs=2, logger=logger, accelerator="cpu", devices=2, strategy="ddp_spawn",
                      callbacks=[StructureMonitor(), StructureVisualizer(max_size=32), StructureReport(print_table=False)],
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train, val)
    files = sorted(os.listdir(logger.log_dir))
    assert "structure.json" in files and "structure.csv" in files
    assert sum(f.startswith("events.out") for f in files) == 1
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert [e.value for e in acc.Scalars("structure/phase")] == [1.0, 2.0]
    assert len(acc.Images("structure/footprint_grid")) == 2  # the end of each phase
