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

import torch
from torch import Tensor

__all__ = [
    "gaudi_spectrum",
    "gaudi_mask",
    "boxcar_mask",
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
    """
    if width.shape != location.shape:
        raise ValueError(f"width {tuple(width.shape)} and location {tuple(location.shape)} must have the same shape")
    if ste:
        width = quantize_ste(width, n)
        location = quantize_ste(location, n)
    spec = gaudi_spectrum(width, location, n, sigma)
    if spec.numel() == 0:  # no component (K = 0): the FFT backends reject empty batches
        return spec.real[..., :1].expand(*spec.shape[:-1], n).contiguous()
    return torch.fft.irfft(spec, n=n, dim=-1, norm="forward")


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
