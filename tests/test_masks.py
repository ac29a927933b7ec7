"""Gaudi masks: exact boxcars on the grid, mask mass, Gaussian smoothing, gradients, batching."""

from __future__ import annotations

import math
import random

import pytest
import torch

from gsm_lightning.core.masks import boxcar_mask, gaudi_mask, gaudi_spectrum, quantize_ste, to_grid


def reference_boxcar(widths: list[int], locations: list[int], n: int) -> torch.Tensor:
    """Cyclic boxcars written out element by element: m[j] = 1 iff (j - L) mod n < W."""
    out = torch.zeros(len(widths), n, dtype=torch.float64)
    for c, (w, loc) in enumerate(zip(widths, locations)):
        for j in range(n):
            out[c, j] = 1.0 if (j - loc) % n < w else 0.0
    return out


def random_cases(seed: int = 0, count: int = 40) -> list[tuple[int, list[int], list[int]]]:
    """(n, integer widths, integer locations) with n = 1, odd and even n, and W = 0 / W = n always present."""
    rng = random.Random(seed)
    ns = [1, 2, 3, 4, 5, 7, 8, 9, 16, 31, 64, 97, 128, 768] + [rng.randint(1, 300) for _ in range(count)]
    cases = []
    for n in ns:
        k = rng.randint(1, 12)
        widths = [0, n] + [rng.randint(0, n) for _ in range(k)]
        locations = [rng.randint(0, n - 1) for _ in widths]
        cases.append((n, widths, locations))
    return cases


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_integer_widths_give_exact_cyclic_boxcar(dtype: torch.dtype, atol: float) -> None:
    for n, widths, locations in random_cases():
        ref = reference_boxcar(widths, locations, n)
        w = torch.tensor(widths, dtype=dtype) / n
        loc = torch.tensor(locations, dtype=dtype) / n
        for ste in (True, False):
            m = gaudi_mask(w, loc, n, sigma=None, ste=ste)
            assert m.shape == (len(widths), n)
            assert m.dtype == dtype
            torch.testing.assert_close(m.double(), ref, atol=atol, rtol=0, msg=f"n={n} ste={ste}")
        # the hard boxcar accepts integer counts and fractions alike
        torch.testing.assert_close(boxcar_mask(torch.tensor(widths), torch.tensor(locations), n, torch.float64), ref)
        torch.testing.assert_close(boxcar_mask(w, loc, n, torch.float64), ref)


def test_location_is_cyclic_and_shift_moves_the_mask() -> None:
    n = 20
    w = torch.tensor([7 / n])
    base = gaudi_mask(w, torch.tensor([0.0]), n, ste=False)
    for shift in (1, 5, 13, 19):
        shifted = gaudi_mask(w, torch.tensor([shift / n]), n, ste=False)
        torch.testing.assert_close(shifted, torch.roll(base, shift, dims=-1), atol=1e-5, rtol=0)
        # l and l + 1 (and l - 1) describe the same mask
        torch.testing.assert_close(gaudi_mask(w, torch.tensor([shift / n + 1.0]), n, ste=False), shifted, atol=1e-4, rtol=0)
        torch.testing.assert_close(gaudi_mask(w, torch.tensor([shift / n - 1.0]), n, ste=False), shifted, atol=1e-4, rtol=0)


def test_ste_rounds_to_grid_and_passes_gradient() -> None:
    n = 10
    x = torch.tensor([0.0, 0.04, 0.06, 0.33, 0.97, 1.0], requires_grad=True)
    q = quantize_ste(x, n)
    torch.testing.assert_close(q.detach(), torch.round(x.detach() * n) / n)
    q.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))
    assert to_grid(x, n).tolist() == [0, 0, 1, 3, 10, 10]
    # with ste=True, off-grid widths/locations give the boxcar of the rounded values
    w = torch.tensor([0.33, 0.56, 0.04])
    loc = torch.tensor([0.26, 0.91, 0.5])
    ref = reference_boxcar([3, 6, 0], [3, 9, 5], n)
    torch.testing.assert_close(gaudi_mask(w, loc, n).double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sigma", [None, 100.0, 3.0, 1.0])
def test_mask_mass_equals_width(sigma: float | None) -> None:
    for n, widths, locations in random_cases(seed=1, count=10):
        w_int = torch.tensor(widths, dtype=torch.float64)
        m = gaudi_mask(w_int / n, torch.tensor(locations, dtype=torch.float64) / n, n, sigma=sigma)
        torch.testing.assert_close(m.sum(-1), w_int, atol=1e-8, rtol=0)
        # non-integer widths without rounding: the mass is w * n exactly (the DC bin is w)
        w = torch.rand(7, dtype=torch.float64)
        loc = torch.rand(7, dtype=torch.float64)
        m = gaudi_mask(w, loc, n, sigma=sigma, ste=False)
        torch.testing.assert_close(m.sum(-1), w * n, atol=1e-8, rtol=0)


def test_gaussian_is_a_circular_blur_and_large_sigma_tends_to_boxcar() -> None:
    n = 64
    widths, locations = [0, 5, 17, 32, 64, 40], [0, 3, 60, 10, 7, 50]
    ref = reference_boxcar(widths, locations, n)
    w = torch.tensor(widths, dtype=torch.float64) / n
    loc = torch.tensor(locations, dtype=torch.float64) / n
    # sigma multiplies the spectrum of the boxcar by exp(-k^2 / (2 sigma^2)) (a periodic Gaussian blur)
    for sigma in (1.0, 7.5):
        k = torch.arange(n // 2 + 1, dtype=torch.float64)
        blurred = torch.fft.irfft(torch.fft.rfft(ref, norm="forward") * torch.exp(-k**2 / (2 * sigma**2)), n=n, norm="forward")
        torch.testing.assert_close(gaudi_mask(w, loc, n, sigma=sigma), blurred, atol=1e-10, rtol=0)
    err = {s: (gaudi_mask(w, loc, n, sigma=s) - ref).abs().max().item() for s in (1.0, 10.0, 100.0, 1e4)}
    assert err[1e4] < 1e-3, err
    assert err[1.0] > 0.2, err  # clearly blurred
    assert err[1.0] > err[10.0] > err[100.0] > err[1e4]
    # sigma=None and sigma=inf are the pure Dirichlet mask
    torch.testing.assert_close(gaudi_mask(w, loc, n, sigma=math.inf), gaudi_mask(w, loc, n, sigma=None))


def test_width_gradient_nonzero_at_zero_width_and_location_gradient_finite() -> None:
    n = 16
    probe = torch.randn(n, dtype=torch.float64)
    for sigma in (None, 1.0, 50.0):
        w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
        loc = torch.rand(5, dtype=torch.float64, requires_grad=True)
        (gaudi_mask(w, loc, n, sigma=sigma) * probe).sum().backward()
        assert torch.isfinite(w.grad).all() and torch.isfinite(loc.grad).all()
        assert (w.grad.abs() > 1e-6).all(), w.grad  # a pruned component can grow back
        # partial widths: the location gradient is finite and not identically zero
        w = torch.full((5,), 0.3, dtype=torch.float64, requires_grad=True)
        loc = torch.rand(5, dtype=torch.float64, requires_grad=True)
        (gaudi_mask(w, loc, n, sigma=sigma) * probe).sum().backward()
        assert torch.isfinite(loc.grad).all() and (loc.grad.abs() > 1e-6).any()


def test_spectrum_gradients_match_closed_forms() -> None:
    """dM/dw = exp(-2 pi i k w) exp(i pi k/n - 2 pi i k l - k^2/(2 s^2)) / sinc(k/n), dM/dl = -2 pi i k M."""
    n, sigma = 12, 4.0
    k = torch.arange(n // 2 + 1, dtype=torch.float64)
    for w0, l0 in ((0.0, 0.3), (0.25, 0.8), (0.61, 0.05), (1.0, 0.5)):
        w = torch.tensor([w0], dtype=torch.float64)
        loc = torch.tensor([l0], dtype=torch.float64)

        def spec_parts(w_: torch.Tensor, l_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            s = gaudi_spectrum(w_, l_, n, sigma)[0]
            return s.real, s.imag

        (drw, drl), (diw, dil) = torch.autograd.functional.jacobian(spec_parts, (w, loc))
        dm_dw = torch.complex(drw[:, 0], diw[:, 0])
        dm_dl = torch.complex(drl[:, 0], dil[:, 0])
        expected_dw = (torch.exp(-2j * math.pi * k * w0) * torch.exp(1j * math.pi * k / n - 2j * math.pi * k * l0 - k**2 / (2 * sigma**2))
                       / torch.sinc(k / n))
        expected_dl = -2j * math.pi * k * gaudi_spectrum(w, loc, n, sigma)[0]
        torch.testing.assert_close(dm_dw, expected_dw, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(dm_dl, expected_dl, atol=1e-10, rtol=1e-10)


def test_masks_are_batched_and_match_per_component() -> None:
    n = 24
    w = torch.rand(3, 2, 5)
    loc = torch.rand(3, 2, 5)
    for sigma, ste in ((None, True), (2.0, False), (30.0, True)):
        m = gaudi_mask(w, loc, n, sigma=sigma, ste=ste)
        assert m.shape == (3, 2, 5, n)
        for idx in torch.cartesian_prod(torch.arange(3), torch.arange(2), torch.arange(5)).tolist():
            a, b, c = idx
            single = gaudi_mask(w[a, b, c].reshape(1), loc[a, b, c].reshape(1), n, sigma=sigma, ste=ste)[0]
            torch.testing.assert_close(m[a, b, c], single)
    hard = boxcar_mask(w, loc, n)
    assert hard.shape == (3, 2, 5, n)
    torch.testing.assert_close(hard, gaudi_mask(w, loc, n), atol=1e-4, rtol=0)
    # no components at all
    assert gaudi_mask(torch.zeros(0), torch.zeros(0), n).shape == (0, n)


def test_bad_inputs_raise() -> None:
    w, loc = torch.rand(3), torch.rand(3)
    with pytest.raises(ValueError, match="same shape"):
        gaudi_mask(w, torch.rand(4), 8)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="sigma"):
            gaudi_mask(w, loc, 8, sigma=bad)
    with pytest.raises(ValueError, match="n must be >= 1"):
        gaudi_mask(w, loc, 0)


# ------------------------------------------------------------ the closed-form autograd node against the op graph
@pytest.mark.parametrize("n", [1, 2, 3, 8, 17, 64, 191])
@pytest.mark.parametrize("sigma", [1.0, 12.0, None])
@pytest.mark.parametrize("ste", [True, False])
def test_fused_mask_matches_the_op_by_op_graph_in_value_and_gradient(n: int, sigma: float | None, ste: bool) -> None:
    """gaudi_mask in eager mode is one autograd node with hand-written derivatives (_GaudiMaskFn); the graph of
    gaudi_spectrum + irfft (what torch.compile and torch.func trace) is the independent reference, in float64."""
    from gsm_lightning.core.masks import _gaudi_mask_graph, _GaudiMaskFn

    g = torch.Generator().manual_seed(n)
    w = torch.rand(2, 5, generator=g, dtype=torch.float64).requires_grad_()
    loc = (2 * torch.rand(2, 5, generator=g, dtype=torch.float64) - 0.5).requires_grad_()  # also outside [0, 1)
    probe = torch.randn(2, 5, n, generator=g, dtype=torch.float64)
    fused = gaudi_mask(w, loc, n, sigma, ste=ste)
    assert fused.grad_fn is not None and type(fused.grad_fn).__name__ == _GaudiMaskFn.__name__ + "Backward"
    ref = _gaudi_mask_graph(w, loc, n, sigma, ste)
    torch.testing.assert_close(fused, ref, atol=1e-12, rtol=0)
    got = torch.autograd.grad((fused * probe).sum(), (w, loc))
    want = torch.autograd.grad((ref * probe).sum(), (w, loc))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_fused_mask_in_float32_keeps_the_phase_exact_on_the_grid() -> None:
    """With ste the phase is computed from the integer grid positions (k m mod 2n, exact), so the float32 boxcars
    at n = 4096 are closer to exact than the op graph's, whose float32 product k * l is off by about k ulp."""
    from gsm_lightning.core.masks import _gaudi_mask_graph

    n = 4096
    gen = torch.Generator().manual_seed(1)
    widths, locs = torch.randint(0, n + 1, (16,), generator=gen), torch.randint(0, n, (16,), generator=gen)
    w, loc = widths.float() / n, locs.float() / n
    m = gaudi_mask(w, loc, n, None)
    assert m.dtype == torch.float32
    exact = boxcar_mask(widths, locs, n)
    err = (m - exact).abs().max().item()
    graph_err = (_gaudi_mask_graph(w, loc, n, None, True) - exact).abs().max().item()
    assert err < 5e-5 and err < graph_err / 2, (err, graph_err)


def test_fused_mask_passes_the_gradient_of_the_right_dtype_only_where_asked() -> None:
    w = torch.rand(3, requires_grad=True)
    loc = torch.rand(3, dtype=torch.float64)  # no gradient asked, another dtype
    m = gaudi_mask(w, loc, 9, 4.0)
    assert m.dtype == torch.float64
    (gw,) = torch.autograd.grad(m.sum(), (w,))
    assert gw.dtype == torch.float32 and torch.isfinite(gw).all()


def test_fused_mask_has_the_op_graphs_second_derivative() -> None:
    """With create_graph the closed-form node hands the gradient to the op graph, so higher derivatives are those
    of the op graph (not silently 0), also mixed with other terms of the same input.  (In the width the op graph's
    second derivative is NaN, from torch.sinc's at 0, as it always was; the location's is finite.)"""
    from gsm_lightning.core.masks import _gaudi_mask_graph

    w = torch.rand(3, dtype=torch.float64)
    loc = torch.rand(3, dtype=torch.float64, requires_grad=True)
    second = []
    for fn in (gaudi_mask, _gaudi_mask_graph):
        m = fn(w, loc, 8, 2.0, False)
        (g,) = torch.autograd.grad(m.pow(2).sum() + loc.pow(3).sum(), (loc,), create_graph=True)
        second.append(torch.autograd.grad(g.sum(), (loc,))[0])
    assert torch.isfinite(second[1]).all() and (second[1] - 6 * loc).abs().max() > 1e-3  # the mask's part is there
    torch.testing.assert_close(second[0], second[1])
