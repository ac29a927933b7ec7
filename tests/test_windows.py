"""The windowed product (issue 26): each component computed only on the tiles its masks reach.

Oracles: the full product (``window_tol=None``) for outputs and every gradient, autograd's derivatives of the masks
for the margins, and a brute-force loop over components and positions for the tiles each component meets."""

from __future__ import annotations

import math

import pytest
import torch

from gsm_lightning.core.layer import GBLRLinear
from gsm_lightning.core.masks import gaudi_mask
from gsm_lightning.core.windows import measured_margin, window_margin, window_plan, windowed_product


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _layer(n_in: int, n_out: int, sigma: float | None, width: float = 0.24, seed: int = 0, rank: int = 1,
           frozen: bool = False) -> GBLRLinear:
    torch.manual_seed(seed)
    layer = GBLRLinear(n_in, n_out, sigma=sigma, location_init="random", width_init=width, rank_per_component=rank)
    with torch.no_grad():  # a spread of widths: some components empty on one side, some full, the rest partial
        k = layer.num_components
        layer.widths.mul_(torch.rand(2, k) * 2).clamp_(0, 1)
        layer.widths[0, : k // 10] = 0.0
        layer.widths[1, k // 10: k // 5] = 1.0
    layer.invalidate_cache()
    layer.window_min_macs = 0
    if frozen:
        layer.freeze_structure()
    return layer


def _step(layer: GBLRLinear, x: torch.Tensor, tol: float | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    layer.window_tol = tol
    layer.invalidate_cache()
    x = x.clone().requires_grad_(True)
    for p in layer.parameters():
        p.grad = None
    y = layer(x)
    weight = torch.sin(torch.arange(layer.out_features, dtype=y.dtype))
    (y * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), {**grads, "x": x.grad.clone()}


@pytest.mark.parametrize("n", [192, 768, 3072])
@pytest.mark.parametrize("sigma", [10.0, 30.0, 100.0])
def test_margin_bounds_mask_and_derivatives_at_other_widths(n, sigma):
    """Beyond the margin, the mask and its width/location derivatives per grid step are below the tolerance (x2) for
    widths and locations other than the two it is measured at (autograd's derivatives, off-grid positions)."""
    tol = 1e-5
    d = window_margin(n, sigma, tol)
    if d >= n:
        pytest.skip("no margin short of the whole side at this sigma")
    g = torch.Generator().manual_seed(n)
    widths = torch.randint(0, n - 2 * d, (12,), generator=g)
    locs = torch.randint(0, n, (12,), generator=g)
    w = widths.double() / n
    loc = locs.double() / n
    ones = torch.ones(12, dtype=torch.float64)
    # mask k depends on component k only: one forward-mode pass gives every component's derivative (K, n)
    m, jw = torch.func.jvp(lambda a: gaudi_mask(a, loc.detach(), n, sigma), (w.detach(),), (ones,))
    _, jl = torch.func.jvp(lambda a: gaudi_mask(w.detach(), a, n, sigma), (loc.detach(),), (ones,))
    pos = torch.arange(n)
    for k in range(12):
        off = (pos - locs[k]) % n
        inside = off < widths[k] + d
        inside |= off >= n - d  # within d before the window
        outside = ~inside
        assert m[k][outside].abs().max() <= 2 * tol
        assert jw[k][outside].abs().max() / n <= 2 * tol
        assert jl[k][outside].abs().max() / n <= 2 * tol


def test_margin_limits():
    assert window_margin(768, 1.0, 1e-5) == 768  # sigma small against n: the tails cover the side
    assert window_margin(768, math.inf, 1e-5) == 768  # learning at sigma = inf: the width derivative is not local
    assert window_margin(64, 100.0, 1e-5) == 64  # sigma near n / 2: the truncated spectrum rings
    assert 0 < window_margin(3072, 10.0, 1e-5) < 3072 // 4
    # the grid's two neighbours bound the margin in between
    s = 12.3
    lo, hi = 2 ** (math.floor(math.log2(s) * 32) / 32), 2 ** (math.ceil(math.log2(s) * 32) / 32)
    assert window_margin(768, s, 1e-5) == max(measured_margin(768, lo, 1e-5), measured_margin(768, hi, 1e-5))
    assert window_margin(768, 30.0, 1e-4) <= window_margin(768, 30.0, 1e-6)


def test_plan_matches_brute_force_cover():
    g = torch.Generator().manual_seed(1)
    n_in, n_out, k, r, tile = 200, 130, 9, 2, 32
    widths = torch.stack([torch.randint(0, n_in + 1, (k,), generator=g), torch.randint(0, n_out + 1, (k,), generator=g)])
    locs = torch.stack([torch.randint(0, n_in, (k,), generator=g), torch.randint(0, n_out, (k,), generator=g)])
    widths[0, 0], widths[1, 1] = 0, n_out
    margins = (5, 11)
    plan = window_plan(widths, locs, n_in, n_out, r, margins, tile)
    macs = 0
    for side, (n, rows) in enumerate(((n_in, plan.rows_in), (n_out, plan.rows_out))):
        assert len(rows) == -(-n // tile)
        for t, got in enumerate(rows):
            expect = []
            for c in range(k):
                w, lo = int(widths[side, c]), int(locs[side, c]) - margins[side]
                window = {(lo + j) % n for j in range(w + 2 * margins[side])} if w + 2 * margins[side] < n \
                    else set(range(n))
                if window & set(range(t * tile, min((t + 1) * tile, n))):
                    expect += [c * r + i for i in range(r)]
                    macs += r * (min((t + 1) * tile, n) - t * tile)
            assert (got.tolist() if got is not None else []) == expect
    assert plan.macs == macs and plan.full_macs == k * r * (n_in + n_out)


@pytest.mark.parametrize("rank", [1, 2])
def test_frozen_layer_is_exact(rank):
    """A frozen layer's boxcars have no tails: the windowed product is the full one up to float order, and so are
    the gradients of the input, factors and bias (what phase 2 trains)."""
    layer = _layer(384, 320, 30.0, rank=rank, frozen=True)
    x = torch.randn(2, 60, 384, dtype=torch.float64)
    layer.double()
    y_full, g_full = _step(layer, x, None)
    y_win, g_win = _step(layer, x, 1e-5)
    plan = layer._window_cache[1]
    assert plan is not None and plan.fraction < 0.7
    assert y_win.shape == (2, 60, 320)
    assert _rel(y_win, y_full) < 1e-12
    assert set(g_win) == set(g_full)
    for name in g_full:
        assert _rel(g_win[name], g_full[name]) < 1e-12, name


@pytest.mark.parametrize("sigma", [10.0, 30.0, 100.0])
def test_learning_layer_matches_the_full_product_within_tolerance(sigma):
    """Phase 1 (not frozen): outputs and every gradient (widths and locations included) equal the full product's
    within the stated tolerance: relative error <= 1e-4 for outputs, factors and input, <= 1e-3 for widths and
    locations (the masks' values and derivatives left out are each <= window_tol = 1e-5 per grid step)."""
    layer = _layer(768, 1536, sigma)
    layer.double()
    x = torch.randn(512, 768, dtype=torch.float64)
    y_full, g_full = _step(layer, x, None)
    y_win, g_win = _step(layer, x, 1e-5)
    plan = layer._window_cache[1]
    assert plan is not None and plan.fraction < 0.7
    assert _rel(y_win, y_full) < 1e-4
    for name in g_full:
        assert _rel(g_win[name], g_full[name]) < (1e-3 if name in ("widths", "locations") else 1e-4), name
    # a looser tolerance saves more and errs more, a tighter one the reverse
    layer.window_tol = 1e-3
    layer.invalidate_cache()
    layer(x)
    assert layer._window_cache[1] is None or layer._window_cache[1].macs <= plan.macs


def test_full_product_where_windows_do_not_pay():
    layer = _layer(768, 1536, 1.0)  # sigma 1: the tails cover every side
    x = torch.randn(256, 768)
    layer(x)
    assert layer._window_cache is None  # never planned: the margins alone rule it out
    small = GBLRLinear(96, 96, sigma=30.0, width_init=0.2)  # under 2 tiles per side
    small(torch.randn(64, 96))
    assert small._window_cache is None
    big = _layer(768, 1536, 30.0)
    big.window_min_macs = 1 << 24
    big(torch.randn(4, 768))  # few tokens: below window_min_macs
    assert big._window_cache is None
    for mode in ("lowrank", "dense"):
        big.forward_mode = mode
        big(torch.randn(512, 768))
        assert big._window_cache is None
    wide = _layer(768, 1536, 30.0, width=0.9)
    wide(torch.randn(512, 768))
    assert wide._window_cache[1] is None  # nearly every tile is met: the plan saves too little


def test_plan_follows_the_structure_and_empty_components():
    """The cached plan is rebuilt when an optimizer step moves the widths, and the components the budget learner
    emptied on both sides are left out before the windows are planned."""
    layer = _layer(768, 1536, 30.0)
    x = torch.randn(256, 768)
    opt = torch.optim.SGD(layer.parameters(), lr=1e-2)
    for _ in range(2):
        layer.window_tol = 1e-5
        y = layer(x)
        first = layer._window_cache
        assert layer(x) is not None and layer._window_cache is first  # no change, same plan
        y.square().mean().backward()
        opt.step()
        opt.zero_grad()
        layer.window_tol = None
        ref = layer(x).detach()
        layer.window_tol = 1e-5
        assert _rel(layer(x).detach(), ref) < 1e-4  # a fresh plan for the moved structure
        assert layer._window_cache is not first
    with torch.no_grad():
        layer.widths[:, ::2] = 0.0
    layer.invalidate_cache()
    live = layer.live_components()
    layer(x)
    plan = layer._window_cache[1]
    rows = torch.cat([r for r in plan.rows_in if r is not None])
    assert int(rows.max()) < live.numel() * layer.rank_per_component  # rows index the live components only


def test_windowed_product_shapes_and_empty_tiles():
    v = torch.zeros(3, 130)
    u = torch.zeros(3, 200)
    v[:, :10] = torch.randn(3, 10)
    u[:, 150:160] = torch.randn(3, 10)
    widths = torch.tensor([[10, 10, 10], [10, 10, 10]])
    locs = torch.tensor([[0, 0, 0], [150, 150, 150]])
    plan = window_plan(widths, locs, 130, 200, 1, (0, 0), 64)
    assert plan.rows_in[1] is None and plan.rows_out[0] is None
    x = torch.randn(5, 7, 130)
    bias = torch.randn(200)
    out = windowed_product(x, v, u, plan, bias)
    assert out.shape == (5, 7, 200)
    assert torch.allclose(out, x @ v.t() @ u + bias, atol=1e-5)


def test_window_settings_are_checked():
    with pytest.raises(ValueError, match="window_tol must be a number in"):
        GBLRLinear(8, 8, window_tol=0.0)
    with pytest.raises(ValueError, match="window_tol must be a number in"):
        GBLRLinear(8, 8, window_tol="1e-5")
    with pytest.raises(ValueError, match="window_tile must be an integer >= 1 or None"):
        GBLRLinear(8, 8, window_tile=0)
    assert GBLRLinear(8, 8, window_tol=None).window_tol is None


@pytest.mark.parametrize("init", ["random", "pretrained"])
def test_window_settings_reach_converted_layers(init):
    """``layer_kwargs`` (``conversion.layer_kwargs`` in a config) set the windows of every converted layer."""
    from torch import nn

    from gsm_lightning.core.conversion import gsmify
    from gsm_lightning.core.layer import gblr_layers

    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    gsmify(model, budget=0.5, init=init, fit_steps=0, window_tol=None, window_tile=32)
    assert [(m.window_tol, m.window_tile) for _, m in gblr_layers(model)] == [(None, 32), (None, 32)]
