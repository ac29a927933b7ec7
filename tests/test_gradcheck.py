"""Finite-difference gradient checks (float64) of the Gaudi masks and of GBLRLinear, at several sigma values.

The forward pass rounds widths and locations to the grid with a straight-through estimator, which is piecewise
constant, so finite differences of the layer in the structure are not defined there.  On grid points the STE
forward equals the smooth (unrounded) function, and the STE gradient must equal the smooth function's gradient:
that is checked against ``gradcheck`` of the smooth function."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from gsm_lightning import GBLRLinear
from gsm_lightning.core.masks import gaudi_mask

SIGMAS = [1.0, 7.5, 100.0, None]


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("n", [16, 17])
def test_gaudi_mask_gradcheck(sigma, n):
    g = torch.Generator().manual_seed(0)
    w = (0.1 + 0.8 * torch.rand(2, 3, generator=g, dtype=torch.float64)).requires_grad_()
    loc = torch.rand(2, 3, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: gaudi_mask(a, b, n, sigma, ste=False), (w, loc), eps=1e-6, atol=1e-6)


def _grid_layer(sigma, seed=0, n_in=12, n_out=10):
    torch.manual_seed(seed)
    layer = GBLRLinear(n_in, n_out, num_components=4, sigma=sigma, width_init=0.5, location_init="random").double()
    with torch.no_grad():  # widths and locations exactly on the grid: STE forward == smooth forward
        n = torch.tensor([[n_in], [n_out]], dtype=torch.float64)
        layer.widths.copy_(torch.round(layer.widths * n) / n)
        layer.locations.copy_(torch.round(layer.locations * n) / n)
    return layer


@pytest.mark.parametrize("sigma", SIGMAS)
def test_layer_gradcheck_factors_and_bias(sigma):
    layer = _grid_layer(sigma)
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    names = ("weight_in", "weight_out", "bias")
    params = tuple(getattr(layer, k).detach().clone().requires_grad_() for k in names)

    def f(x, *p):
        return functional_call(layer, dict(zip(names, p)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_layer_structure_gradient_equals_smooth_function_gradient(sigma):
    layer = _grid_layer(sigma, seed=1)
    x = torch.randn(6, 12, dtype=torch.float64)
    out = layer(x)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()

    def smooth(w, loc):
        m_in = gaudi_mask(w[0], loc[0], layer.in_features, sigma, ste=False)
        m_out = gaudi_mask(w[1], loc[1], layer.out_features, sigma, ste=False)
        v = (layer.weight_in.detach() * m_in.unsqueeze(1)).flatten(0, 1)
        u = (layer.weight_out.detach() * m_out.unsqueeze(1)).flatten(0, 1)
        return ((x @ v.t() @ u + layer.bias.detach()) * weights).sum()

    w = layer.widths.detach().clone().requires_grad_()
    loc = layer.locations.detach().clone().requires_grad_()
    torch.testing.assert_close(smooth(w, loc), (out * weights).sum().detach())
    assert torch.autograd.gradcheck(smooth, (w, loc), eps=1e-7, atol=1e-5)
    gw, gl = torch.autograd.grad(smooth(w, loc), (w, loc))
    torch.testing.assert_close(layer.widths.grad, gw)
    torch.testing.assert_close(layer.locations.grad, gl)
    assert float(gw.abs().sum()) > 0 and float(gl.abs().sum()) > 0
