"""The one-sided split of the GBLR product (core/split_product.py) against the full product as oracle."""

import pytest
import torch
import torch.nn.functional as F

from gsm_lightning.core import split_product as sp
from gsm_lightning.core.layer import GBLRLinear
from gsm_lightning.core.masks import boxcar_mask, boxcar_sums
from gsm_lightning.core.split_product import side_split, split_product


def _factors(k, r, n_in, n_out, grid, dtype=torch.float64):
    """Factors whose rows are 0 where the grid widths say a side is empty (as masked factors are)."""
    v = torch.randn(k * r, n_in, dtype=dtype)
    u = torch.randn(k * r, n_out, dtype=dtype)
    v[(grid[0] == 0).repeat_interleave(r)] = 0
    u[(grid[1] == 0).repeat_interleave(r)] = 0
    return v.requires_grad_(), u.requires_grad_()


def test_side_split_groups_rows_of_each_component():
    grid = torch.tensor([[3, 0, 2, 0, 1], [1, 4, 0, 0, 2]])
    split = side_split(grid, rank=2)
    assert split.both.tolist() == [0, 1, 8, 9]
    assert split.out_only.tolist() == [2, 3]
    assert split.in_only.tolist() == [4, 5]
    assert side_split(torch.tensor([[1, 0], [2, 0]]), rank=1) is None  # nothing one-sided: the full product


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("with_bias", [True, False])
def test_split_product_matches_full_product_and_its_gradients(rank, with_bias):
    torch.manual_seed(0)
    grid = torch.tensor([[2, 0, 0, 3, 1, 0, 4], [1, 3, 2, 0, 1, 0, 2]])
    v, u = _factors(7, rank, 11, 9, grid)
    bias = torch.randn(9, dtype=torch.float64, requires_grad=True) if with_bias else None
    x = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True)
    inputs = [t for t in (x, v, u, bias) if t is not None]
    split = side_split(grid, rank)
    y = split_product(x, v, u, split, bias)
    ref = F.linear(F.linear(x, v), u.t(), bias)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(y, inputs, g)
    want = torch.autograd.grad(ref, inputs, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # the one-sided rows' gradients are the non-trivial part: not all zero
    assert got[1][split.out_only].abs().sum() > 0 and got[2][split.in_only].abs().sum() > 0


def test_split_product_second_derivative_is_the_full_products():
    torch.manual_seed(1)
    grid = torch.tensor([[2, 0, 3], [1, 2, 0]])
    v, u = _factors(3, 1, 6, 5, grid)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    split = side_split(grid, 1)

    def grad_norm(fn):
        (gv,) = torch.autograd.grad(fn().pow(2).sum(), [v], create_graph=True)
        return torch.autograd.grad(gv.pow(2).sum(), [x, u])

    got = grad_norm(lambda: split_product(x, v, u, split))
    want = grad_norm(lambda: F.linear(F.linear(x, v), u.t()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _one_sided_layer(n_in=40, n_out=48, dtype=torch.float64):
    torch.manual_seed(2)
    layer = GBLRLinear(n_in, n_out, num_components=24, sigma=None, dtype=dtype)
    with torch.no_grad():
        layer.widths.zero_()
        layer.widths[:, :5] = torch.rand(2, 5, dtype=dtype) * 0.5 + 0.2  # both sides
        layer.widths[1, 5:15] = 1.0  # output side only: the calibrated conversion's spare components
        layer.widths[0, 15:19] = 0.3  # input side only
    layer.invalidate_cache()  # 19..23 empty on both sides
    return layer


def _step(layer, x, split: bool):
    layer.zero_grad()
    x = x.clone().requires_grad_()
    if not split:
        layer._side_split = lambda: None
    try:
        y = layer(x)
        y.sin().sum().backward()
    finally:
        layer.__dict__.pop("_side_split", None)
    return y.detach(), [x.grad] + [p.grad for p in (layer.weight_in, layer.weight_out, layer.widths, layer.locations,
                                                     layer.bias)]


def test_layer_takes_the_split_and_keeps_every_gradient(monkeypatch):
    layer = _one_sided_layer()
    layer.window_tol = None  # the full product, not the windowed one
    layer.window_min_macs = 0  # a small product: split anyway (by default only products of 200M multiply-adds)
    calls = []
    real = sp.split_product
    monkeypatch.setattr("gsm_lightning.core.layer.split_product",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(3, 7, 40, dtype=torch.float64)
    y_split, g_split = _step(layer, x, split=True)
    assert calls, "the layer did not take the split product"
    n_calls = len(calls)
    y_full, g_full = _step(layer, x, split=False)
    assert len(calls) == n_calls
    torch.testing.assert_close(y_split, y_full, rtol=0, atol=1e-12)
    for a, b in zip(g_split, g_full):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    # the spare components' input widths get their gradient (what lets them grow back)
    assert g_split[3][0, 5:15].abs().min() > 0


def test_split_follows_the_widths_and_is_not_used_frozen_or_compiled():
    layer = _one_sided_layer()
    first = layer._side_split()
    assert first is not None and first.out_only.numel() == 10 and first.in_only.numel() == 4
    assert layer._side_split() is first  # cached
    with torch.no_grad():
        layer.widths[0, 5:15] = 0.5  # the spare components grow an input side
    second = layer._side_split()
    assert second is not first and second.out_only.numel() == 0
    layer.freeze_structure()
    assert layer._side_split() is None


def test_cost_model_prefers_the_split_over_the_dense_product_where_it_is_cheaper():
    # MiniLM-like 384x384 layer at 30 %: 57 components on both sides, 327 spare ones on the output side only
    layer = GBLRLinear(384, 384, sigma=None)
    with torch.no_grad():
        layer.widths.zero_()
        layer.widths[1] = 1.0
        layer.widths[:, :57] = 1.0
    layer.invalidate_cache()
    split = layer._side_split()
    kr = layer.live_components().numel() if layer.live_components() is not None else 384
    assert not layer._use_dense(1280, kr, None, split)
    assert layer._use_dense(1280, kr, None, None)  # without the split the dense product was cheaper


def test_small_products_keep_the_full_product(monkeypatch):
    layer = _one_sided_layer()
    calls = []
    monkeypatch.setattr("gsm_lightning.core.layer.split_product", lambda *a, **k: calls.append(1))
    layer(torch.randn(3, 40, dtype=torch.float64))  # 3 tokens: far under window_min_macs
    assert not calls


def test_boxcar_sums_match_masked_sums():
    torch.manual_seed(3)
    n = 37
    values = torch.rand(4, 9, n)
    width = torch.tensor([0.0, 1.0, 0.5, 0.03, 0.97, 0.2, 0.6, 1.0, 0.01]).expand(4, 9)
    location = torch.rand(4, 9)
    location[:, 0] = 0.999  # rounds to n: the same position as 0
    want = (values * boxcar_mask(width, location, n)).sum(-1)
    torch.testing.assert_close(boxcar_sums(values, width, location), want, rtol=1e-5, atol=1e-6)
    ints = boxcar_sums(values, torch.tensor([[3, 0, 37]]).expand(4, 3), torch.tensor([[35, 4, 10]]).expand(4, 3))
    torch.testing.assert_close(ints[:, 0], values[:, 0, [35, 36, 0]].sum(-1))  # wraps around
    assert (ints[:, 1] == 0).all()
    torch.testing.assert_close(ints[:, 2], values[:, 2].sum(-1))
