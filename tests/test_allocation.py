"""Measured allocation (``core/allocation.py``, ``MeasuredAllocation``): the curves are the model's output error of
each layer's whitened truncation, computed independently here; the greedy on them is optimal where it must be (unit
steps, convex curves: brute force); GSMModule and the low-rank baseline convert at the budgets it chooses."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from gsm_lightning.core.allocation import allocate_from_curves, layer_gains, layer_sensitivity, ranks_to_ratios
from gsm_lightning.core.baselines import allocate_ranks_greedy, baselinify, rank_for_budget
from gsm_lightning.core.calibration import collect_input_stats
from gsm_lightning.core.conversion import gsmify
from gsm_lightning.core.conversion_spec import Calibration, Conversion, MeasuredAllocation
from gsm_lightning.core.whitening import whitened_low_rank, whitened_singular_values
from gsm_lightning.training.module import GSMModule

from .helpers import adamw


class TwoBranch(nn.Module):
    """y = head(relu(a(x))) + 0.01 * b(x): ``b`` barely reaches the output, ``a`` and ``head`` do."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.a(x))) + 0.01 * self.b(x)


def batches(n: int = 3, d: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(d, d, generator=g)  # correlated inputs: whitening matters
    return [torch.randn(32, d, generator=g) @ mix for _ in range(n)]


def test_curves_are_the_output_error_of_each_whitened_truncation_alone():
    model, data = TwoBranch(), batches()
    names = ["a", "b", "head"]
    stats = collect_input_stats(model, data, layers=names)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    curves = layer_sensitivity(model, stats, data, grid=[0.25, 0.5, 1.0])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # restored bit for bit
    assert model.training  # and its mode
    ref = torch.cat([model.eval()(x) for x in data]).double()
    for name in names:
        assert [r for r, _ in curves[name]] == [2, 4, 8]  # 16x16: rank = floor(ratio * 256 / 32)
        for rank, err in curves[name]:
            probe = TwoBranch()
            u, v = whitened_low_rank(probe.get_submodule(name).weight.detach(), stats[name], rank)
            probe.get_submodule(name).weight.data.copy_(u @ v.t())
            with torch.no_grad():
                out = torch.cat([probe.eval()(x) for x in data]).double()
            assert err == pytest.approx(float((out - ref).pow(2).sum() / ref.pow(2).sum()), rel=1e-6)
    # the branch scaled by 0.01 costs the output about 1e-4 times what the main path does
    assert curves["b"][0][1] < 1e-2 * min(curves["a"][0][1], curves["head"][0][1])


def brute_force(curves, shapes, budget):
    total = budget * sum(o * i for o, i in shapes.values())
    best = None
    names = list(curves)
    for choice in itertools.product(*(curves[n] for n in names)):
        cost = sum(r * sum(shapes[n]) for n, (r, _) in zip(names, choice))
        if cost <= total + 1e-9:
            err = sum(e for _, e in choice)
            if best is None or err < best[0] - 1e-12:
                best = (err, {n: r for n, (r, _) in zip(names, choice)})
    return best


@pytest.mark.parametrize("seed", range(6))
def test_greedy_on_convex_unit_step_curves_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = {f"l{i}": (12, 12) for i in range(4)}
    curves = {}
    for n in shapes:  # decreasing, convex: gains shrink with every step
        gains = sorted(torch.rand(5, generator=g).tolist(), reverse=True)
        scale = float(torch.rand((), generator=g)) * 3 + 0.1
        err = [scale * sum(gains[k:]) for k in range(5)]
        curves[n] = [(k + 1, e) for k, e in enumerate(err)]
    for budget in (0.2, 0.3, 0.45):
        ranks = allocate_from_curves(curves, shapes, budget)
        err, _ = brute_force(curves, shapes, budget)
        assert sum(dict(curves[n])[r] for n, r in ranks.items()) == pytest.approx(err)
        assert sum(r * 24 for r in ranks.values()) <= budget * 4 * 144 + 1e-9


def test_greedy_jumps_over_a_flat_stretch_and_errors():
    shapes = {"flat": (10, 10), "other": (10, 10)}
    curves = {"flat": [(1, 1.0), (2, 1.0), (3, 0.0)], "other": [(1, 0.3), (2, 0.2), (3, 0.1)]}
    # 6 units of rank fit (budget 0.6 * 200 / 20): the flat layer's drop is worth taking in one move of 2 steps
    assert allocate_from_curves(curves, shapes, 0.6) == {"flat": 3, "other": 3}
    assert allocate_from_curves(curves, shapes, 0.2) == {"flat": 1, "other": 1}
    with pytest.raises(ValueError, match="does not pay for the cheapest measured point"):
        allocate_from_curves(curves, shapes, 0.1)
    with pytest.raises(ValueError, match="budget must be a number in"):
        allocate_from_curves(curves, shapes, 0)
    with pytest.raises(ValueError, match="no shape for"):
        allocate_from_curves(curves, {"flat": (10, 10)}, 0.5)
    assert ranks_to_ratios({"flat": 3}, shapes) == {"flat": pytest.approx(0.6)}
    assert rank_for_budget(10, 10, ranks_to_ratios({"flat": 3}, shapes)["flat"]) == 3  # round trip


def test_sensitivity_bad_input_is_named():
    model, data = TwoBranch(), batches()
    stats = collect_input_stats(model, data, layers=["a"])
    with pytest.raises(ValueError, match=r"grid must be non-empty FLOPs ratios in \(0, 1\]"):
        layer_sensitivity(model, stats, data, grid=[0.0, 0.5])
    with pytest.raises(ValueError, match="batches is empty"):
        layer_sensitivity(model, stats, [], grid=[0.5])
    gsmify(model, budget=0.5, include=["a"], init="pretrained", fit_steps=0)
    with pytest.raises(ValueError, match="measure the dense model"):
        layer_sensitivity(model, stats, data, grid=[0.5])


def test_layer_budgets_convert_each_layer_at_its_own_ratio():
    model, data = TwoBranch(), batches()
    stats = collect_input_stats(model, data, layers=["a", "b", "head"])
    budgets = {"a": 0.75, "b": 0.125, "head": 0.5}
    lowrank = TwoBranch()
    report = baselinify(lowrank, "lowrank", 0.5, include=["a", "b", "head"], init="pretrained", calibration=stats,
                        layer_budgets=budgets)
    assert {r.name: r.num_components for r in report.layers} == {"a": 6, "b": 1, "head": 4}
    g = TwoBranch()
    gsmify(g, budget=0.5, include=["a", "b", "head"], init="pretrained", fit_steps=0, calibration=stats,
           layer_budgets=budgets)
    for name, ratio in budgets.items():
        assert g.get_submodule(name).flops_ratio() == pytest.approx(ratio, abs=1 / 16)
        # GBLR starts from the whitened SVD at that budget: the same weight as the low-rank layer
        assert torch.allclose(g.get_submodule(name).to_dense(), lowrank.get_submodule(name).to_dense(), atol=1e-4)
    with pytest.raises(ValueError, match="layer_budgets names layers that are not converted"):
        gsmify(TwoBranch(), budget=0.5, include=["a"], init="pretrained", layer_budgets={"b": 0.5})
    with pytest.raises(ValueError, match=r"layer_budgets must be FLOPs ratios in \(0, 1\]"):
        baselinify(TwoBranch(), "lowrank", 0.5, include=["a"], layer_budgets={"a": 1.5})
    with pytest.raises(ValueError, match="needs init='pretrained'"):
        gsmify(TwoBranch(), budget=0.5, include=["a"], init="random", layer_budgets={"a": 0.5})
    with pytest.raises(ValueError, match="use it with allocation='uniform'"):
        baselinify(TwoBranch(), "lowrank", 0.5, include=["a"], allocation="global", layer_budgets={"a": 0.5})


def test_gains_fit_the_measured_errors_and_weight_the_greedy():
    model, data = TwoBranch(), batches()
    names = ["a", "b", "head"]
    stats = collect_input_stats(model, data, layers=names)
    weights = {n: model.get_submodule(n).weight.detach() for n in names}
    one = layer_sensitivity(model, stats, data, grid=[0.5])
    gains = layer_gains(one, weights, stats)
    for n in names:  # one point: the gain reproduces it exactly
        (rank, err), = one[n]
        tail = float(whitened_singular_values(weights[n], stats[n]).pow(2)[rank:].sum())
        assert gains[n] * tail == pytest.approx(err, rel=1e-9)
    many = layer_sensitivity(model, stats, data, grid=[0.25, 0.5, 0.75])
    g = layer_gains(many, weights, stats)["a"]
    tails = [float(whitened_singular_values(weights["a"], stats["a"]).pow(2)[r:].sum()) for r, _ in many["a"]]
    assert g == pytest.approx(sum(t * e for t, (_, e) in zip(tails, many["a"])) / sum(t * t for t in tails))
    assert gains["b"] < 1e-2 * min(gains["a"], gains["head"])
    plain = allocate_ranks_greedy(weights, stats, 0.4)
    weighted = allocate_ranks_greedy(weights, stats, 0.4, gains=gains)
    assert weighted["b"] == 1 and weighted["b"] < plain["b"]
    assert allocate_ranks_greedy(weights, stats, 0.4, gains={n: 1.0 for n in names}) == plain  # unit gains change nothing
    with pytest.raises(ValueError, match="no gain for layer 'b'"):
        allocate_ranks_greedy(weights, stats, 0.4, gains={"a": 1.0})
    # a layer exact at its measured rank (zero tail) gets the median gain of the others
    exact = layer_gains({"a": one["a"], "b": one["b"], "z": [(16, 0.0)]}, {**weights, "z": weights["a"]},
                        {**stats, "z": stats["a"]})
    assert exact["z"] == sorted([gains["a"], gains["b"]])[1]


@pytest.mark.parametrize("method,grid", [("gblr", None), ("lowrank", None), ("gblr", [0.125, 0.25, 0.5, 0.75, 1.0]),
                                         ("lowrank", [0.125, 0.25, 0.5, 0.75, 1.0])])
def test_module_converts_at_the_measured_allocation(method, grid):
    data = [(x, torch.zeros(len(x), dtype=torch.long)) for x in batches()]
    conv = Conversion(method=method, include=["a", "b", "head"], init="pretrained", fit_steps=0,
                      calibration=Calibration(batches=3), allocation={"batches": 2, "grid": grid})
    m = GSMModule(TwoBranch(), num_classes=16, budget=0.4, conversion=conv, phase1_epochs=1, optimizer=adamw())
    m.convert(data)
    # the same allocation by hand, on the dense model
    ref = TwoBranch()
    stats = collect_input_stats(ref, [x for x, _ in data], layers=["a", "b", "head"])
    curves = layer_sensitivity(ref, stats, [x for x, _ in data[:2]], grid=grid or [0.4])
    if grid is None:
        weights = {n: ref.get_submodule(n).weight.detach() for n in curves}
        ranks = allocate_ranks_greedy(weights, stats, 0.4, gains=layer_gains(curves, weights, stats))
    else:
        ranks = allocate_from_curves(curves, {n: (16, 16) for n in curves}, 0.4)
    assert ranks["b"] == 1 and ranks["a"] > 1  # the branch that barely reaches the output gets the least
    flops = {r.name: r.flops for r in m.report.layers}
    for name, rank in ranks.items():
        assert flops[name] <= rank * 32 and (method == "gblr" or flops[name] == rank * 32)
    assert sum(flops.values()) <= 0.4 * 3 * 256 + 1e-9
    assert m.conversion.config()["allocation"] == {"batches": 2, "grid": grid}


def test_measured_allocation_settings_are_checked():
    assert isinstance(Conversion(init="pretrained", calibration={"batches": 2}, allocation="measured").allocation,
                      MeasuredAllocation)
    with pytest.raises(ValueError, match="needs method 'gblr' or 'lowrank' with calibration"):
        Conversion(method="monarch", init="pretrained", calibration={"batches": 2}, allocation="measured")
    with pytest.raises(ValueError, match="without calibration"):
        Conversion(init="pretrained", allocation="measured")
    with pytest.raises(ValueError, match="allocation batches must be an integer >= 1"):
        MeasuredAllocation(batches=0)
    with pytest.raises(ValueError, match="allocation grid must be None or a non-empty list"):
        MeasuredAllocation(grid=[1.5])
    with pytest.raises(ValueError, match="unknown allocation"):
        Conversion(allocation="greedy")
    assert MeasuredAllocation().grid is None and MeasuredAllocation(grid=(0.5, 1)).grid == [0.5, 1.0]


@pytest.mark.parametrize("value,batches,grid", [("measured", 2, None), ("{batches: 3, grid: [0.25, 0.5]}", 3, [0.25, 0.5])])
def test_cli_config_builds_a_measured_allocation(value, batches, grid, tmp_path):
    from pathlib import Path

    from gsm_lightning.cli import build_cli

    config = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    cli = build_cli(["--config", str(config), "--model.conversion.init", "pretrained",
                     "--model.conversion.calibration", "{batches: 4}", "--model.conversion.allocation", value,
                     "--trainer.default_root_dir", str(tmp_path)], run=False)
    allocation = cli.model.conversion.allocation
    assert isinstance(allocation, MeasuredAllocation) and (allocation.batches, allocation.grid) == (batches, grid)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = TwoBranch()
        shard = batches(5)[:3] if rank == 0 else batches(5)[3:]  # uneven shards: 3 and 2 batches
        stats = collect_input_stats(model, shard, layers=["a", "b", "head"])
        curves = layer_sensitivity(model, stats, shard, grid=[0.25, 0.5])
        torch.save(curves, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_curves_equal_one_process_on_the_union(tmp_path):
    from .test_calibration import _free_port

    torch.multiprocessing.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                                          start_method="fork")
    model, data = TwoBranch(), batches(5)
    single = layer_sensitivity(model, collect_input_stats(model, data, layers=["a", "b", "head"]), data,
                               grid=[0.25, 0.5])
    for rank in (0, 1):  # both ranks measure the same curves (so choose the same budgets), those of the union
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == single.keys()
        for name, points in single.items():
            assert [r for r, _ in got[name]] == [r for r, _ in points]
            assert [e for _, e in got[name]] == pytest.approx([e for _, e in points], rel=1e-9)


def test_conversion_layer_budgets_for_a_fixed_baseline_any_init_and_checkpoint_skeleton():
    budgets = {"a": 0.75, "b": 0.125}
    conv = Conversion(method="lowrank", include=["a", "b", "head"], init="random", layer_budgets=budgets)
    m = GSMModule(TwoBranch(), num_classes=16, budget=0.5, conversion=conv, optimizer=adamw())
    assert {r.name: r.num_components for r in m.report.layers} == {"a": 6, "b": 1, "head": 4}
    # a checkpoint skeleton (no data) has the same shapes: explicit budgets need no calibration
    skeleton = TwoBranch()
    Conversion(method="lowrank", include=["a", "b", "head"], init="random", layer_budgets=budgets).apply(
        skeleton, 0.5, skeleton=True)
    assert {k: v.shape for k, v in skeleton.state_dict().items()} == {k: v.shape for k, v in m.backbone.state_dict().items()}
    with pytest.raises(ValueError, match="GBLR's random init learns its allocation"):
        Conversion(method="gblr", init="random", layer_budgets=budgets)
    with pytest.raises(ValueError, match="use it with allocation='uniform'"):
        Conversion(method="lowrank", init="pretrained", allocation="global", layer_budgets=budgets)


def test_a_per_layer_budget_of_one_costs_at_most_dense():
    # budget=1.0 alone is lossless by convention (a full SVD: 2x dense for a square layer); a layer the allocation
    # gives all of its FLOPs must not take more than that
    model, data = TwoBranch(), batches()
    stats = collect_input_stats(model, data, layers=["a", "b"])
    g = TwoBranch()
    gsmify(g, budget=0.5, include=["a", "b"], init="pretrained", fit_steps=0, calibration=stats,
           layer_budgets={"a": 1.0})
    # at most dense; one component under the 8 that cost exactly dense (the fit sits a hair below budget 1)
    assert 7 * 32 <= g.a.flops() <= 256
    lossless = TwoBranch()
    gsmify(lossless, budget=1.0, include=["a"], init="pretrained", fit_steps=0, calibration=stats)
    assert lossless.a.flops() > 256  # the convention this guards against


def test_dense_method_drops_the_conversion_options_with_a_warning():
    """``--model.conversion.method dense`` on a calibrated, measured config is its dense comparator: no calibration
    pass, no conversion, a warning naming what was dropped."""
    with pytest.warns(UserWarning, match="calibration, allocation ignored"):
        conv = Conversion(method="dense", init="pretrained", calibration={"batches": 2}, allocation={"batches": 2})
    assert conv.calibration is None and conv.allocation == "uniform" and conv.layer_budgets is None
    with pytest.warns(UserWarning, match="layer_budgets ignored"):
        Conversion(method="dense", layer_budgets={"a": 0.5})
    with pytest.raises(ValueError, match="unknown allocation"):
        Conversion(method="dense", allocation="greedy")
    model = TwoBranch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning):
        m = GSMModule(model, num_classes=16, budget=0.4, optimizer=adamw(),
                      conversion=Conversion(method="dense", init="pretrained", calibration={"batches": 2},
                                            allocation="measured"))
    assert m.converted and m.conversion.config()["calibration"] is None  # nothing waits for calibration data
    assert all(torch.equal(before[k], v) for k, v in m.backbone.state_dict().items())


class Blocks(nn.Module):
    """Residual blocks in a ModuleList (the residual added in place), for the block replay of layer_sensitivity."""

    def __init__(self, d: int = 16, depth: int = 4, reverse: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(d, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d)) for _ in range(depth))
        self.reverse = reverse
        self.calls = 0  # block computations (a replayed block does not run its layers)
        for block in self.blocks:
            block[1].register_forward_hook(lambda *a: setattr(self, "calls", self.calls + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in (reversed(self.blocks) if self.reverse else self.blocks):
            h += block(h)  # in place: a replayed output must be a copy
        return h


@pytest.mark.parametrize("reverse", [False, True])
def test_block_replay_gives_the_full_models_curves_with_fewer_block_runs(monkeypatch, reverse):
    from gsm_lightning.core import allocation

    data = batches()
    names = ["inp"] + [f"blocks.{i}.{j}" for i in range(4) for j in (0, 2)]
    model = Blocks(reverse=reverse)
    stats = collect_input_stats(model, data, layers=names)
    model.calls = 0
    replayed = layer_sensitivity(model, stats, data, grid=[0.25, 0.5])
    calls_replayed = model.calls
    monkeypatch.setattr(allocation._BlockReplay, "find", staticmethod(lambda model, names: None))
    model.calls = 0
    full = layer_sensitivity(model, stats, data, grid=[0.25, 0.5])
    assert replayed == full  # bit for bit
    if reverse:  # blocks called out of their index order: no replay
        assert calls_replayed == model.calls
    else:
        assert calls_replayed < 0.75 * model.calls
    assert all(err > 0 for curve in full.values() for _, err in curve)
