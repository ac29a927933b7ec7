"""BudgetLearner: the target path, the exact cut onto it, where the cut falls, the width step, its state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gsm_lightning import GBLRLinear
from gsm_lightning.core.flops import flops_ratio
from gsm_lightning.learn.budget_learner import BudgetLearner, BudgetPath, _Flat


def two_layers(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(GBLRLinear(32, 64, width_init="full"), GBLRLinear(64, 16, width_init="full"))


def test_path_is_cosine_from_start_to_budget_then_held():
    path = BudgetPath(start=1.0, budget=0.2, steps=100)
    assert path(0) == pytest.approx(1.0)
    assert path(50) == pytest.approx(0.6)
    assert path(100) == pytest.approx(0.2)
    assert path(10_000) == pytest.approx(0.2)
    values = [path(t) for t in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert BudgetPath(start=0.1, budget=0.2, steps=100)(0) == 0.2  # starting below the budget: hold the budget
    assert BudgetPath(start=1.0, budget=0.2, steps=0)(0) == 0.2


@pytest.mark.parametrize("weighting", ["uniform", "flops", "energy"])
def test_cut_meets_the_path_exactly_and_no_more(weighting):
    model = two_layers()
    layers = list(model)
    learner = BudgetLearner(budget=0.3, path_steps=0, width_step="adam", cut_weighting=weighting)
    before = flops_ratio(layers)
    out = learner.step(model, lr=1e-3)
    after = flops_ratio(layers)
    assert out["flops_ratio"] == pytest.approx(before)
    assert out["target"] == 0.3 and out["shrink"] == 1.0
    assert after <= 0.3
    # minimal: one grid step less of cut would be above the target (bisection on the exact integer-grid cost)
    assert after > 0.3 - 0.02
    widths = [m.widths.detach().clone() for m in layers]
    out = learner.step(model, lr=1e-3)  # at the budget: nothing more to cut
    assert out["shrink"] == 0.0 and out["cut"] == 0.0
    for m, w in zip(layers, widths):
        torch.testing.assert_close(m.widths.detach(), w)


def test_flops_weighting_cuts_the_costlier_side_faster():
    layer = GBLRLinear(16, 64, width_init=0.5)
    learner = BudgetLearner(budget=0.2, path_steps=0, width_step="adam", cut_weighting="flops")
    w0 = layer.widths.detach().clone()
    learner.step(nn.Sequential(layer), lr=1e-3)
    drop = (w0 - layer.widths.detach()).mean(dim=1).tolist()
    assert drop[1] == pytest.approx(4 * drop[0], rel=0.05)  # output side (64) vs input side (16)
    uniform = GBLRLinear(16, 64, width_init=0.5)
    BudgetLearner(budget=0.2, path_steps=0, width_step="adam", cut_weighting="uniform").step(nn.Sequential(uniform), 1e-3)
    drop = (0.5 - uniform.widths.detach()).mean(dim=1).tolist()
    assert drop[0] == pytest.approx(drop[1], rel=0.05)


def test_energy_weighting_cuts_weak_components_first():
    layer = GBLRLinear(32, 32, num_components=4, width_init=1.0)
    with torch.no_grad():
        layer.weight_in.copy_(torch.ones_like(layer.weight_in))
        layer.weight_out.copy_(torch.ones_like(layer.weight_out))
        layer.weight_out[3].mul_(0.01)  # a weak component
    learner = BudgetLearner(budget=0.125, path_steps=0, width_step="adam", cut_weighting="energy")
    learner.step(nn.Sequential(layer), lr=1e-3)
    w = layer.widths.detach()
    assert float(w[:, 3].max()) == 0.0  # the weak one went first ...
    assert float(w[:, :3].min()) > 0.5  # ... and the strong ones kept most of their width
    # before energy_start_step the cut ignores energies
    layer2 = GBLRLinear(32, 32, num_components=4, width_init=1.0)
    with torch.no_grad():
        layer2.weight_out[3].mul_(0.01)
    BudgetLearner(0.125, 0, width_step="adam", cut_weighting="energy", energy_start_step=5).step(nn.Sequential(layer2), 1e-3)
    torch.testing.assert_close(layer2.widths[:, 3], layer2.widths[:, 0])
    assert float(layer2.widths[:, 3].min()) > 0.4


def test_side_rms_step_is_normalised_per_side_and_clipped():
    layer = GBLRLinear(16, 16, num_components=3, width_init=0.5)
    layer.widths.grad = torch.tensor([[1e-6, 2e-6, -1e-6], [100.0, 0.0, -100.0]])
    learner = BudgetLearner(budget=1.0, path_steps=0, width_step="side_rms", step_clip=3.0, beta2=0.999)
    learner.step(nn.Sequential(layer), lr=0.01)
    moved = (0.5 - layer.widths.detach())
    rms_in = math.sqrt((1 + 4 + 1) / 3) * 1e-6
    # one RMS per side: the tiny input-side gradients move as much as the huge output-side ones would
    torch.testing.assert_close(moved[0], torch.tensor([1e-6, 2e-6, -1e-6]) / rms_in * 0.01, rtol=1e-4, atol=1e-7)
    assert float(moved[1, 1]) == 0 and float(moved[1, 0]) == pytest.approx(-float(moved[1, 2]))
    assert float(moved.abs().max()) <= 3 * 0.01 + 1e-7


def test_model_width_norm_moves_sides_by_their_gain_per_flop():
    """width_norm="model": one RMS for the whole model of the gradient per FLOP (g / (r n_side)), so a layer whose
    widths buy more loss per FLOP moves faster; "side" moves both layers alike whatever their gradients' scale."""
    def moved(norm: str) -> tuple[torch.Tensor, torch.Tensor]:
        a = GBLRLinear(16, 16, num_components=2, width_init=0.5)
        b = GBLRLinear(64, 64, num_components=2, width_init=0.5)
        a.widths.grad = torch.full_like(a.widths, -1.0)   # 1/16 per unit of FLOPs
        b.widths.grad = torch.full_like(b.widths, -0.4)   # 0.4/64 per FLOP: 10x less gain per FLOP than a
        BudgetLearner(budget=1.0, path_steps=0, width_norm=norm, step_clip=100.0).step(nn.Sequential(a, b), lr=0.01)
        return a.widths.detach() - 0.5, b.widths.detach() - 0.5

    a, b = moved("side")
    torch.testing.assert_close(a, b)  # each side over its own RMS: the same normalised step
    a, b = moved("model")
    assert bool((a > 0).all()) and bool((b > 0).all())  # both grow (negative gradients)
    torch.testing.assert_close(a / b, torch.full_like(a, 10.0), rtol=1e-4, atol=0)
    # the step is normalised by the model-wide RMS of the per-FLOP gradients (bias-corrected first step)
    rms = math.sqrt(((1 / 16) ** 2 + (0.4 / 64) ** 2) / 2)
    torch.testing.assert_close(a, torch.full_like(a, 0.01 * (1 / 16) / rms), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="unknown width_norm"):
        BudgetLearner(budget=0.5, path_steps=1, width_norm="layer")


def test_adam_width_step_leaves_widths_to_the_optimizer():
    layer = GBLRLinear(16, 16, width_init=0.5)
    layer.widths.grad = torch.ones_like(layer.widths)
    learner = BudgetLearner(budget=1.0, path_steps=0, width_step="adam")
    assert not learner.moves_widths
    w0 = layer.widths.detach().clone()
    learner.step(nn.Sequential(layer), lr=0.01)
    torch.testing.assert_close(layer.widths.detach(), w0)


def test_state_dict_round_trip_continues_identically():
    def run(split: bool) -> torch.Tensor:
        model = two_layers(seed=3)
        learner = BudgetLearner(budget=0.3, path_steps=10, width_step="side_rms", cut_weighting="energy")
        for step in range(8):
            torch.manual_seed(100 + step)
            for m in model:
                m.widths.grad = torch.randn_like(m.widths) * 0.1
            if split and step == 4:
                state = learner.state_dict()
                learner = BudgetLearner(budget=0.3, path_steps=10, width_step="side_rms", cut_weighting="energy")
                learner.load_state_dict(state)
            learner.step(model, lr=0.01)
        return torch.cat([m.widths.detach().flatten() for m in model])

    torch.testing.assert_close(run(False), run(True), rtol=0, atol=0)


def test_path_reaches_budget_by_its_end():
    model = two_layers()
    learner = BudgetLearner(budget=0.25, path_steps=20, width_step="adam", cut_weighting="flops")
    start = flops_ratio(list(model))
    ratios = [learner.step(model, lr=1e-3)["target"] for _ in range(25)]
    assert ratios[0] == pytest.approx(start)
    assert ratios[-1] == 0.25
    assert flops_ratio(list(model)) <= 0.25
    assert all(a >= b for a, b in zip(ratios, ratios[1:]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(budget=0.0, path_steps=1), "budget"),
    (dict(budget=0.3, path_steps=-1), "path_steps"),
    (dict(budget=0.3, path_steps=1, width_step="sgd"), "width_step"),
    (dict(budget=0.3, path_steps=1, cut_weighting="norm"), "cut_weighting"),
    (dict(budget=0.3, path_steps=1, energy_clip=(2.0, 3.0)), "energy_clip"),
    (dict(budget=0.3, path_steps=1, energy_power=0.0), "energy_power"),
    (dict(budget=0.3, path_steps=1, cost_power=1.5), "cost_power"),
    (dict(budget=0.3, path_steps=1, cost_power=-0.1), "cost_power"),
    (dict(budget=0.3, path_steps=1, cost_power=True), "cost_power"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BudgetLearner(**kwargs)


def test_energy_power_sharpens_the_cut_toward_the_weaker_component():
    """Two components, one with half the energy of the other (ratio 0.0625, budget 0.05): the weaker one is cut
    2x faster at power 1 and 4x faster at power 2, since the cut per component is ``tau * side * weight``."""
    def drops(power):
        layer = GBLRLinear(64, 64, num_components=2, width_init=1.0)
        with torch.no_grad():
            layer.weight_in.fill_(1.0)
            layer.weight_out.fill_(1.0)
            layer.weight_out[1].mul_(0.5)  # half the energy of component 0
        BudgetLearner(budget=0.05, path_steps=0, width_step="adam", cut_weighting="energy",
                      energy_power=power).step(nn.Sequential(layer), 1e-3)
        drop = 1.0 - layer.widths.detach()
        return float(drop[:, 1].mean() / drop[:, 0].mean())
    assert drops(1.0) == pytest.approx(2.0, rel=0.1)
    assert drops(2.0) == pytest.approx(4.0, rel=0.1)


@pytest.mark.parametrize("cost_power", [0.0, 0.4, 1.0])
def test_cost_power_cuts_a_narrow_block_of_the_same_entries_slower(cost_power):
    """A full-width component and a quarter-width block with the same entries (1 everywhere in their windows): the
    block holds 1/4 of the energy (``||v|| ||u||``: 64 against 16) for 1/4 of the FLOPs (128 against 32 grid units).
    Its energy weight over the wide one's is ``(4 / 4 ** cost_power) ** energy_power``: 16x faster at 0 (the old
    cut), 4x at 0.5, the same speed at 1 (``"density"``)."""
    layer = GBLRLinear(64, 64, num_components=2, width_init=1.0)
    with torch.no_grad():
        layer.widths.copy_(torch.tensor([[1.0, 0.25], [1.0, 0.25]]))
        layer.locations.zero_()
        layer.weight_in.fill_(1.0)
        layer.weight_out.fill_(1.0)
    before = layer.widths.detach().clone()
    BudgetLearner(budget=0.035, path_steps=0, width_step="adam", cut_weighting="energy",  # from 160/4096 = 0.039
                  cost_power=cost_power).step(nn.Sequential(layer), 1e-3)
    drop = before - layer.widths.detach()
    assert float(drop.min()) > 0  # both cut, neither to zero: the ratio below is the weights'
    assert float(layer.widths.min()) > 0
    assert float(drop[:, 1].mean() / drop[:, 0].mean()) == pytest.approx((4 / 4 ** cost_power) ** 2, rel=0.05)


def test_cost_power_matches_the_written_out_weight():
    torch.manual_seed(0)
    layer = GBLRLinear(48, 80, num_components=6, rank_per_component=2)
    with torch.no_grad():
        layer.widths.uniform_(0.1, 1.0)
        layer.locations.uniform_(0.0, 1.0)
    for cost_power in (0.0, 0.3, 1.0):
        got = BudgetLearner._energy_weights([layer], _Flat([layer]), 0.1, 100.0, cost_power=cost_power)
        want = _energy_weight_reference(layer, 0.1, 100.0, cost_power)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_dual_tracking_raises_its_threshold_while_above_the_path_and_relaxes_below():
    model = two_layers()
    learner = BudgetLearner(budget=0.3, path_steps=0, width_step="adam", cut_weighting="uniform", tracking="dual",
                            dual_gain=0.01)
    ratio0 = flops_ratio(list(model))
    out = learner.step(model, lr=1e-3)
    assert out["cut"] == pytest.approx(0.01 * (ratio0 - 0.3))  # tau after one feedback step
    taus = [learner.step(model, lr=1e-3)["cut"] for _ in range(200)]
    assert max(taus) > taus[0]  # integrates the error while above ...
    assert flops_ratio(list(model)) <= 0.3 + 0.05  # ... and brings the ratio down to about the target
    assert learner.state_dict()["dual_tau"] == pytest.approx(learner.dual_tau)


def test_density_weighting_cuts_a_wide_component_of_little_energy_per_flop_first():
    # Two components with equal energy; one spends twice the FLOPs on it.
    layer = GBLRLinear(64, 64, num_components=2, width_init=1.0)
    with torch.no_grad():
        layer.widths.copy_(torch.tensor([[0.25, 0.5], [0.25, 0.5]]))
        layer.weight_in.zero_()
        layer.weight_out.zero_()
        layer.weight_in[0, 0, :16] = 1.0
        layer.weight_out[0, 0, :16] = 1.0
        layer.weight_in[1, 0, :32] = 0.5 ** 0.5
        layer.weight_out[1, 0, :32] = 0.5 ** 0.5
    energy = BudgetLearner._energy_weights([layer], _Flat([layer]), 0.1, 100.0)
    density = BudgetLearner._energy_weights([layer], _Flat([layer]), 0.1, 100.0, cost_power=1.0)
    assert float(energy[0]) == pytest.approx(float(energy[1]))
    assert float(density[1]) == pytest.approx(2 * float(density[0]))  # the wide one is cut twice as fast


def _energy_weight_reference(layer: GBLRLinear, lo: float, hi: float, cost_power: float) -> torch.Tensor:
    """The energy weight of one layer, written out per component with Python loops."""
    k_all = layer.num_components
    e = []
    for k in range(k_all):
        sides = []
        for side, (w, n) in enumerate(((layer.weight_in, layer.in_features), (layer.weight_out, layer.out_features))):
            width = round(float(layer.widths[side, k].clamp(0, 1)) * n)
            start = round(float(layer.locations[side, k]) * n)
            cols = [(start + j) % n for j in range(width)]
            sides.append(float(w[k][:, cols].double().pow(2).sum().sqrt()) if cols else 0.0)
        cost = round(float(layer.widths[0, k].clamp(0, 1)) * layer.in_features) + round(
            float(layer.widths[1, k].clamp(0, 1)) * layer.out_features)
        active = min(round(float(layer.widths[0, k].clamp(0, 1)) * layer.in_features),
                     round(float(layer.widths[1, k].clamp(0, 1)) * layer.out_features)) > 0
        energy = sides[0] * sides[1] / max(cost, 1) ** cost_power
        e.append((energy, active and energy > 0))
    live = [x for x, a in e if a]
    mean = sum(live) / len(live) if live else 0.0
    return torch.tensor([min(max(mean / x, lo), hi) if a else hi for x, a in e], dtype=torch.float64)


@pytest.mark.parametrize("cost_power", [0.0, 1.0])
def test_energy_weights_of_layers_grouped_by_shape_match_the_per_component_reference(cost_power):
    torch.manual_seed(0)
    layers = [GBLRLinear(12, 20, num_components=6, location_init="random"), GBLRLinear(20, 12, num_components=5),
              GBLRLinear(12, 20, num_components=6, location_init="random", rank_per_component=2),
              GBLRLinear(12, 20, num_components=6, location_init="random")]
    with torch.no_grad():
        for m in layers:
            m.widths.copy_(torch.rand_like(m.widths))
        layers[0].widths[1, 2] = 0.0  # an inactive component
        layers[3].widths.zero_()  # a layer with none active
    weights = BudgetLearner._energy_weights(layers, _Flat(layers), 0.1, 100.0, cost_power)
    want = torch.cat([_energy_weight_reference(m, 0.1, 100.0, cost_power) for m in layers])
    torch.testing.assert_close(weights.double(), want, rtol=1e-5, atol=1e-6)
    assert weights[2] == 100.0 and (weights[-6:] == 100.0).all()


def test_side_width_step_of_all_layers_at_once_matches_the_per_layer_formula():
    """w -= lr clip(g / rms_side, +-clip), one running mean square of g per layer side (bias-corrected), written out
    per layer; a layer without a gradient keeps its widths and gets no state."""
    torch.manual_seed(1)
    net = nn.Sequential(GBLRLinear(8, 12, num_components=4), GBLRLinear(12, 8, num_components=3),
                        GBLRLinear(8, 8, num_components=2))
    learner = BudgetLearner(budget=1.0, path_steps=0, step_clip=1.5, beta2=0.9)
    want = {i: net[i].widths.detach().clone() for i in range(3)}
    ms = {0: torch.zeros(2), 1: torch.zeros(2)}
    for t in range(3):
        for i in (0, 1):
            net[i].widths.grad = torch.randn(2, net[i].num_components) * (10.0 if i else 0.01)
            ms[i] = 0.9 * ms[i] + 0.1 * net[i].widths.grad.pow(2).mean(1)
            rms = (ms[i] / (1 - 0.9 ** (t + 1))).sqrt()
            want[i] = (want[i] - 0.01 * (net[i].widths.grad / rms[:, None]).clamp(-1.5, 1.5)).clamp(0, 1)
        learner.step(net, 0.01, cut=False)
        for i in range(3):
            torch.testing.assert_close(net[i].widths.detach(), want[i], rtol=0, atol=1e-6)
    assert sorted(learner.mean_sq) == ["0", "1"]
    torch.testing.assert_close(learner.mean_sq["1"], ms[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numpy_component_cost_is_the_torch_one_bit_for_bit(dtype):
    from gsm_lightning.core.flops import component_grid_cost, np_component_grid_cost

    gen = torch.Generator().manual_seed(3)
    widths = torch.rand(2, 5, 300, generator=gen, dtype=dtype) * 1.4 - 0.2  # also outside [0, 1]
    widths[..., ::7] = 0.5 / 64  # half a grid step: rounds to even
    n_in = torch.randint(1, 200, (300,), generator=gen).to(dtype)
    n_out = torch.full((300,), 64.0, dtype=dtype)
    rank = torch.randint(1, 4, (300,), generator=gen).to(dtype)
    want = component_grid_cost(widths.transpose(0, 1), n_in, n_out, rank)  # (5, 2, K) -> (5, K)
    got = np_component_grid_cost(widths.numpy(), n_in.numpy(), n_out.numpy(), rank.numpy())
    assert got.dtype == want.numpy().dtype and np.array_equal(got, want.numpy())


def _energetic_pair(seed: int = 0) -> nn.Sequential:
    """Two layers of full widths whose factors differ a lot in scale across components: the global energy cut takes
    far more from one layer than from the other."""
    torch.manual_seed(seed)
    model = nn.Sequential(GBLRLinear(24, 40, num_components=8, width_init="full"),
                          GBLRLinear(40, 24, num_components=8, width_init="full"))
    with torch.no_grad():
        model[0].weight_out.mul_(torch.logspace(-2, 0, 8)[:, None, None])  # mostly weak components
        model[1].weight_out.mul_(3.0)
    return model


def _layer_ratio(layer: GBLRLinear) -> float:
    return flops_ratio([layer])


def test_layer_allocation_cuts_every_layer_onto_the_path_on_its_own():
    """``allocation="layer"``: each layer ends at the target (within one grid step of one component), where the global
    cut of the same model leaves the two layers far apart; each layer's widths are those the global cut gives when the
    layer is alone (the independent oracle: one layer, one cut)."""
    glob = _energetic_pair()
    BudgetLearner(budget=0.3, path_steps=0, width_step="adam").step(glob, lr=1e-3)
    shares = [_layer_ratio(m) for m in glob]
    assert abs(shares[0] - shares[1]) > 0.1, shares  # the global cut moves FLOPs between the layers here

    per_layer = _energetic_pair()
    out = BudgetLearner(budget=0.3, path_steps=0, width_step="adam", allocation="layer").step(per_layer, lr=1e-3)
    assert out["shrink"] == 1.0 and out["target"] == 0.3
    for m in per_layer:
        step = m.rank_per_component * (m.in_features + m.out_features) / m.dense_flops()
        assert 0.3 - step < _layer_ratio(m) <= 0.3
    alone = _energetic_pair()
    for m in alone:
        BudgetLearner(budget=0.3, path_steps=0, width_step="adam").step(nn.Sequential(m), lr=1e-3)
    for a, b in zip(per_layer, alone):
        torch.testing.assert_close(a.int_widths(), b.int_widths(), rtol=0, atol=0)


def test_layer_allocation_leaves_a_layer_already_under_the_path_alone():
    model = _energetic_pair()
    with torch.no_grad():
        model[1].widths.fill_(0.1)
    w1 = model[1].widths.detach().clone()
    learner = BudgetLearner(budget=0.3, path_steps=0, width_step="adam", allocation="layer")
    learner.step(model, lr=1e-3)
    torch.testing.assert_close(model[1].widths.detach(), w1, rtol=0, atol=0)
    assert _layer_ratio(model[0]) <= 0.3 and "allocation='layer'" in repr(learner)


@pytest.mark.parametrize("kwargs, match", [
    (dict(allocation="type"), "allocation"),
    (dict(allocation="layer", tracking="dual"), "tracking='project'"),
])
def test_bad_allocation_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BudgetLearner(budget=0.3, path_steps=1, **kwargs)


def _full_bisection_fits(widths, weights, n_in, n_out, rank, dense, target):
    """Whether the total grid cost of every component fits, at each of several thresholds (torch)."""
    from gsm_lightning.core.flops import grid_cost

    def fits_many(taus):
        t = torch.tensor(taus, dtype=widths.dtype)[:, None, None]
        return [c / dense <= target for c in grid_cost(widths - t * weights, n_in, n_out, rank).tolist()]

    return fits_many


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cut_threshold_is_the_full_bisection_bit_for_bit(dtype):
    """The bracket-shrinking cut (components that cost the same at both ends leave the problem, NumPy batches) returns
    exactly the threshold of the plain sequential bisection over the full grid cost in torch, on random multi-layer
    problems."""
    from gsm_lightning.core.flops import bisect_threshold, cut_threshold, grid_cost

    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        sizes = [(int(a), int(b), int(k), int(r)) for a, b, k, r in torch.randint(1, 200, (3, 4), generator=gen)]
        sizes = [(a, b, 1 + k % 40, 1 + r % 3) for a, b, k, r in sizes]
        n_in = torch.cat([torch.full((k,), float(a)) for a, _, k, _ in sizes]).to(dtype)
        n_out = torch.cat([torch.full((k,), float(b)) for _, b, k, _ in sizes]).to(dtype)
        rank = torch.cat([torch.full((k,), float(r)) for *_, k, r in sizes]).to(dtype)
        widths = torch.rand(2, n_in.numel(), generator=gen, dtype=dtype)
        widths[:, torch.rand(n_in.numel(), generator=gen) < 0.2] = 0.0  # some inactive components
        weights = torch.rand(2, n_in.numel(), generator=gen, dtype=dtype) * 3 + 0.05
        if trial % 3 == 0:
            weights[:, ::5] = 1.0  # ties between components
        dense = float((n_in * n_out).sum())
        target = float(torch.rand((), generator=gen)) * float(grid_cost(widths, n_in, n_out, rank)) / dense
        hi = float((widths / weights).max()) + 1e-6
        fits_many = _full_bisection_fits(widths, weights, n_in, n_out, rank, dense, target)
        fits = lambda c, dense=dense, target=target: c / dense <= target  # noqa: E731
        for iters in (0, 3, 40):
            want = bisect_threshold(lambda tau, f=fits_many: f([tau])[0], 0.0, hi, iters)
            assert cut_threshold(widths, weights, n_in, n_out, rank, fits, hi, iters) == want, (trial, iters)
            assert cut_threshold(widths, weights, n_in, n_out, rank, fits, iters=iters) == want  # hi by default
        # the threshold is the smallest cut that fits: a hair less does not (when the bisection resolved it)
        assert fits_many([want]) == [True]
        if want > 1e-9 * hi:
            assert fits_many([want - 1e-6 * hi]) == [False]


def _layer_taus_reference(flat, weights, target, layer_ratio, iters=40):
    """The per-layer bisection written with torch ops (the implementation before the NumPy one), as the oracle."""
    big = torch.where(weights > 0, flat.widths / weights.clamp_min(1e-30), torch.zeros_like(weights)).amax(0)
    hi = torch.zeros(len(flat.sizes), dtype=big.dtype).scatter_reduce_(0, flat.segment, big, "amax") + 1e-6
    lo = torch.zeros_like(hi)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        fits = BudgetLearner._layer_ratios(flat, flat.widths - mid.index_select(0, flat.segment) * weights) <= target
        hi, lo = torch.where(fits, mid, hi), torch.where(fits, lo, mid)
    return torch.where(layer_ratio > target, hi, torch.zeros_like(hi))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_taus_are_the_torch_bisection_bit_for_bit(dtype):
    torch.manual_seed(0)
    for trial in range(6):
        layers = [GBLRLinear(int(a), int(b), num_components=int(k), rank_per_component=int(r)).to(dtype)
                  for a, b, k, r in zip(torch.randint(4, 90, (4,)), torch.randint(4, 90, (4,)), torch.randint(1, 30, (4,)),
                                        torch.randint(1, 3, (4,)))]
        with torch.no_grad():
            for m in layers:
                m.widths.copy_(torch.rand_like(m.widths))
        flat = _Flat(layers)
        weights = torch.rand_like(flat.widths) * 2 + 0.05
        layer_ratio = BudgetLearner._layer_ratios(flat, flat.widths)
        target = float(layer_ratio.median()) * (0.5 + 0.1 * trial)
        want = _layer_taus_reference(flat, weights, target, layer_ratio)
        got = BudgetLearner._solve_layer_taus(flat, weights, target, layer_ratio)
        assert got.dtype == want.dtype and torch.equal(got, want), (trial, got, want)
        assert (got > 0).sum() == (layer_ratio > target).sum()  # the layers above the target, and only they, are cut
