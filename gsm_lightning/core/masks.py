"""Gaussian-Dirichlet ("Gaudi") masks, in plain PyTorch.

A mask of a side of length ``n`` is described by a width fraction ``w`` and a
location fraction ``l`` in [0, 1] (the location is cyclic).  Its real spectrum
has the closed form (rfft bins ``k = 0..n//2``)::

    M[k] = w sinc(k w) / sinc(k / n) * exp(-k^2 / (2 sigma^2))
           * exp(i (-2 pi k l + pi k (1/n - w)))

and the mask is ``irfft(M, n, norm="forward")``.  For integer ``W = w n``,
``L = l n`` and ``sigma = inf`` this is exactly the cyclic boxcar
``m[j] = 1 if (j - L) mod n < W else 0``.  Every function here is batched over
components: widths/locations of shape ``(..., K)`` give masks ``(..., K, n)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "gaudi_spectrum",
    "gaudi_mask",
    "boxcar_mask",
    "boxcar_sums",
    "quantize_ste",
    "to_grid",
]


def _check_sigma(sigma: float | Tensor | None) -> float | Tensor:
    if isinstance(sigma, Tensor):  # a 0-dim tensor (e.g. GBLRLinear's buffer under torch.compile): not read on the host
        return sigma
    if sigma is None:
        return math.inf
    sigma = float(sigma)
    if not sigma > 0 or math.isnan(sigma):
        raise ValueError(f"sigma must be > 0 (or None/inf for a pure Dirichlet mask), got {sigma}")
    return sigma


def _real(x: Tensor) -> Tensor:
    """``x`` in float32 unless it is float64: 16-bit floats cannot hold the grid ``k / n`` (bfloat16 has 8
    significant bits, so ``0.3 * 1000`` becomes ``300.78``); none of the ops here is down-cast by CPU autocast."""
    return x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)


def quantize_ste(x: Tensor, n: int) -> Tensor:
    """Round fractions to the grid ``k / n`` (computed in float32 or float64); the gradient passes straight through."""
    x = _real(x)
    return x + (torch.round(x * n) / n - x).detach()


def to_grid(x: Tensor, n: int) -> Tensor:
    """Integer grid positions ``round(x * n)`` as int64 (no gradient; computed in float32 or float64)."""
    return torch.round(_real(x.detach()) * n).to(torch.int64)


def gaudi_spectrum(width: Tensor, location: Tensor, n: int, sigma: float | Tensor | None = None) -> Tensor:
    """Complex rfft spectrum ``(..., K, n // 2 + 1)`` of Gaudi masks of length ``n``.

    ``sigma`` may also be a 0-dim tensor (> 0, not validated; ``inf`` gives a Gaussian factor of exactly 1):
    then nothing is read on the host, so the spectrum traces under ``torch.compile`` without a graph break
    or a recompilation per sigma value."""
    sigma = _check_sigma(sigma)
    if n < 1:
        raise ValueError(f"mask length n must be >= 1, got {n}")
    real_dtype = torch.promote_types(_real(width).dtype, _real(location).dtype)
    width = width.to(real_dtype).unsqueeze(-1)
    location = location.to(real_dtype).unsqueeze(-1)
    k = torch.arange(n // 2 + 1, device=width.device, dtype=real_dtype)
    # w * sinc(k w) / sinc(k / n): the Dirichlet kernel divided by n.  The
    # denominator is never 0 for k <= n/2.
    amp = width * torch.sinc(k * width) / torch.sinc(k / n)
    if isinstance(sigma, Tensor):
        s = sigma.to(real_dtype)
        amp = amp * torch.exp(-(k * k) / (2.0 * s * s))
    elif math.isfinite(sigma):
        amp = amp * torch.exp(-(k * k) / (2.0 * sigma * sigma))
    phase = -2.0 * math.pi * k * location + math.pi * k * (1.0 / n - width)
    return torch.complex(amp * torch.cos(phase), amp * torch.sin(phase))


def gaudi_mask(
    width: Tensor,
    location: Tensor,
    n: int,
    sigma: float | Tensor | None = None,
    ste: bool = True,
) -> Tensor:
    """Gaudi masks ``(..., K, n)`` for width/location fractions of shape ``(..., K)``.

    ``ste=True`` rounds widths and locations to the grid ``1/n`` in the forward
    pass with a straight-through gradient, so for ``sigma=None`` the masks are
    exact boxcars while gradients reach the continuous values (also at width 0).

    In eager mode with a float ``sigma`` this runs as one autograd node with its derivatives in closed form
    (:class:`_GaudiMaskFn`: about a third of the kernel launches of the op-by-op graph, which dominate for the
    small masks of phase 1); under ``torch.compile``, with a tensor ``sigma`` or inside a ``torch.func``
    transform it is the op-by-op graph of :func:`gaudi_spectrum` (:func:`_gaudi_mask_graph`).  Both give the same
    masks and gradients up to float rounding (``tests/test_masks.py``).
    """
    if width.shape != location.shape:
        raise ValueError(f"width {tuple(width.shape)} and location {tuple(location.shape)} must have the same shape")
    if (isinstance(sigma, Tensor) or torch.compiler.is_compiling()
            or _functorch_wrapped(width) or _functorch_wrapped(location)):
        return _gaudi_mask_graph(width, location, n, sigma, ste)
    sigma = _check_sigma(sigma)
    if n < 1:
        raise ValueError(f"mask length n must be >= 1, got {n}")
    if width.numel() == 0:  # no component (K = 0): the FFT backends reject empty batches
        dtype = torch.promote_types(_real(width).dtype, _real(location).dtype)
        return width.new_zeros((*width.shape, n), dtype=dtype)
    return _GaudiMaskFn.apply(width, location, n, sigma, ste)


def _functorch_wrapped(x: Tensor) -> bool:
    return torch._C._functorch.is_functorch_wrapped_tensor(x)


def _gaudi_mask_graph(width: Tensor, location: Tensor, n: int, sigma: float | Tensor | None, ste: bool) -> Tensor:
    """:func:`gaudi_mask` as an op-by-op autograd graph (traceable, forward-mode differentiable)."""
    if ste:
        width = quantize_ste(width, n)
        location = quantize_ste(location, n)
    spec = gaudi_spectrum(width, location, n, sigma)
    if spec.numel() == 0:  # no component (K = 0): the FFT backends reject empty batches
        return spec.real[..., :1].expand(*spec.shape[:-1], n).contiguous()
    return torch.fft.irfft(spec, n=n, dim=-1, norm="forward")


_GRID: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}


def _grid_constants(n: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``k = 0..n//2``, ``1 / sinc(k / n)`` and the rfft weights ``c_k`` (1 at ``k = 0`` and at ``n / 2``, 2 between)
    for masks of length ``n``: cached (they are made outside inference mode, so autograd may save them)."""
    key = (n, dtype, device)
    found = _GRID.get(key)
    if found is None:
        with torch.inference_mode(False), torch.no_grad():
            k = torch.arange(n // 2 + 1, device=device, dtype=dtype)
            c = torch.full_like(k, 2.0)
            c[0] = 1.0
            if n % 2 == 0:
                c[-1] = 1.0
            found = (k, 1.0 / torch.sinc(k / n), c)
        if len(_GRID) > 64:
            _GRID.clear()
        _GRID[key] = found
    return found


class _GaudiMaskFn(torch.autograd.Function):
    """Gaudi masks with hand-written derivatives.  With ``S_k = a_k e^{i phi_k}``, ``a_k = w sinc(k w) f_k``
    (``f_k = exp(-k^2 / (2 sigma^2)) / sinc(k / n)``) and ``phi_k = k (pi / n - pi w - 2 pi l)``, the mask is
    ``irfft(S, norm="forward")``.  For an upstream gradient ``G``, ``H = c * rfft(G)`` is the gradient of the real and
    imaginary parts of ``S``; then ``Q = H e^{-i phi}`` gives ``dL/da = Re Q`` and ``dL/dphi = a Im Q``, so
    ``dL/dw = sum_k Re Q f_k cos(pi k w) - pi k a Im Q`` and ``dL/dl = -2 pi sum_k k a Im Q``.  With ``ste`` the
    forward rounds ``w`` and ``l`` to the grid and the gradients pass straight through to the inputs."""

    @staticmethod
    def forward(ctx: Any, width: Tensor, location: Tensor, n: int, sigma: float, ste: bool) -> Tensor:
        dtype = torch.promote_types(_real(width).dtype, _real(location).dtype)
        w, loc = width.detach().to(dtype), location.detach().to(dtype)
        k, inv_sinc, c = _grid_constants(n, dtype, w.device)
        if ste:  # phi_k = -pi (k m mod 2n) / n with the integer m = 2 L + W - 1: exact up to the last product
            grid_w = torch.round(w * n)
            w = grid_w / n
            m = torch.remainder(2.0 * torch.round(loc * n) + grid_w - 1.0, 2.0 * n)
            exact = dtype if dtype == torch.float64 or n <= 4096 else torch.float64  # k m < 2^24 in float32
            km = _grid_constants(n, exact, w.device)[0] * m.to(exact).unsqueeze(-1)
            phi = torch.remainder(km, 2.0 * n).mul_(-math.pi / n).to(dtype)
        else:
            phi = k * torch.remainder(2.0 * loc + w - 1.0 / n, 2.0).unsqueeze(-1).mul(-math.pi)
        f = inv_sinc if math.isinf(sigma) else inv_sinc * torch.exp(k * k * (-0.5 / (sigma * sigma)))
        w = w.unsqueeze(-1)
        kw = k * w
        amp = torch.sinc(kw).mul_(w).mul_(f)
        rot = torch.complex(torch.cos(phi), torch.sin(phi))
        mask = torch.fft.irfft(rot * amp, n=n, dim=-1, norm="forward")
        ctx.save_for_backward(kw, amp, rot, f, k, c, width, location)
        ctx.dtypes = (width.dtype, location.dtype)
        ctx.n, ctx.sigma, ctx.ste = n, sigma, ste
        return mask

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        kw, amp, rot, f, k, c, width, location = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the op graph's gradient, itself differentiable (higher orders)
            inputs = [t for t, needed in zip((width, location), ctx.needs_input_grad[:2]) if needed]
            with torch.enable_grad():
                mask = _gaudi_mask_graph(width, location, ctx.n, ctx.sigma, ctx.ste)
                grads = iter(torch.autograd.grad(mask, inputs, grad, create_graph=True))
            return (*(next(grads) if needed else None for needed in ctx.needs_input_grad[:2]), None, None, None)
        q = torch.fft.rfft(grad.to(amp.dtype), dim=-1).mul_(c).mul_(rot.conj())
        k_dphi = (torch.imag(q) * amp).mul_(k).sum(-1)  # sum_k k dL/dphi_k
        gw = gl = None
        if ctx.needs_input_grad[0]:
            gw = (torch.real(q) * f).mul_(torch.cos(kw * math.pi)).sum(-1) - math.pi * k_dphi
            gw = gw.to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            gl = ((-2.0 * math.pi) * k_dphi).to(ctx.dtypes[1])
        return gw, gl, None, None, None


def boxcar_mask(width: Tensor, location: Tensor, n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Exact hard cyclic boxcar masks ``(..., K, n)``.

    ``width``/``location`` are integer counts (int tensors) or fractions
    (float tensors, rounded to the grid).  No gradient flows.
    """
    if width.is_floating_point():
        width = to_grid(width, n)
    if location.is_floating_point():
        location = to_grid(location, n)
    j = torch.arange(n, device=width.device)
    offset = torch.remainder(j - location.unsqueeze(-1), n)
    return (offset < width.unsqueeze(-1)).to(dtype)


def boxcar_sums(values: Tensor, width: Tensor, location: Tensor) -> Tensor:
    """Sums of non-negative ``values`` ``(..., K, n)`` over each component's cyclic boxcar ``(..., K)``.

    Equal to ``(values * boxcar_mask(width, location, n)).sum(-1)`` up to float rounding, from prefix sums along the
    last dimension: no ``(..., K, n)`` mask, index tensor or comparison.  The prefix sums are in ``values``' dtype, so
    a window's sum carries an absolute error of about ``eps * sqrt(n)`` times its row's total (relative ``1e-4`` for a
    one-position window in a row of 1536 equal float32 values); it is clamped at 0.  ``width``/``location`` are as for
    :func:`boxcar_mask`.  No gradient flows."""
    n = values.shape[-1]
    if width.is_floating_point():
        width = to_grid(width, n)
    if location.is_floating_point():
        location = to_grid(location, n)
    start = torch.remainder(location, n)
    end = start + width.clamp(0, n)
    cum = values.detach().cumsum(-1)  # cum[..., j] = sum of values[..., :j + 1]

    def prefix(i: Tensor) -> Tensor:  # sum of values[..., :i], i in [0, n]
        return cum.gather(-1, (i - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1) * (i > 0)

    return (prefix(end.clamp(max=n)) - prefix(start) + prefix((end - n).clamp(min=0))).clamp_min(0)
