"""Windowed GBLR product: each component computed only on the tiles its masks reach (training and eval).

A GBLR layer's output is ``y = x V_m^T U_m`` with masked factors ``V_m`` ``(K*r, in)`` and ``U_m`` ``(K*r, out)``.
Computed as two full products it costs ``tokens * K * r * (in + out)`` multiply-adds whatever the widths.  But a
mask is a cyclic boxcar of integer width ``W`` at ``L`` (the forward rounds both to the grid) convolved with the
periodic kernel whose spectrum is the Gaussian ``exp(-k^2 / (2 sigma^2))`` (:mod:`gsm_lightning.core.masks`).  So a
mask, and its derivatives with respect to the width and the location, are below a tolerance ``tol`` beyond a
margin ``d(n, sigma, tol)`` outside ``[L, L + W)`` (:func:`window_margin`; a frozen layer's exact boxcars take
``d = 0``.  Not so a learning layer at ``sigma = inf``: its mask is a boxcar but the width derivative of the
Dirichlet kernel is not local, so the margin is the whole side).  Each side is cut into tiles of ``tile`` positions (per side); component ``k`` takes part in a tile exactly when its
widened window ``[L - d, L + W + d)`` meets it.  Then (:func:`windowed_product`)::

    h[:, rows(C_t)] += x[:, tile t] @ V_m[rows(C_t), tile t]^T      for each input tile t
    y[:, tile s]     = h[:, rows(C_s)] @ U_m[rows(C_s), tile s]       for each output tile s

where ``C_t`` are the components that meet tile ``t``.  Everything inside the chosen tiles is computed exactly
(the masks' values there included), so the result differs from the full product only by the mask values below
``tol`` that lie outside every widened window, and by float summation order; with ``d = 0`` (frozen) it is exact.
Gradients reach ``x``, ``V_m`` and ``U_m`` (hence the factors, widths and locations) through autograd.

The loops run over tiles (``ceil(n / tile)`` per side, at most a few dozen), never over components.
:func:`window_plan` reads the widths and locations on the host once per change (the layer caches the plan on
their versions and sigma), so the path is eager-only: under ``torch.compile`` the layer keeps the full product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

__all__ = ["WindowPlan", "measured_margin", "window_margin", "window_plan", "windowed_product"]


_SIGMA_STEPS = 32  # grid points per doubling of sigma at which margins are measured (ratio 2 ** (1 / 32) = 1.022)


def window_margin(n: int, sigma: float, tol: float) -> int:
    """:func:`measured_margin` for any ``sigma``: the larger of its values at the two points of a geometric grid
    (``2 ** (i / 32)``) around ``sigma``, so that the annealing, which sets a new sigma after every step, costs a
    measurement only when it enters a new grid cell (cached; a few ms each for ``n = 3072``)."""
    sigma = float(sigma)
    if not math.isfinite(sigma):
        return measured_margin(n, math.inf, tol)
    i = math.log2(sigma) * _SIGMA_STEPS
    lo, hi = math.floor(i), math.ceil(i)
    return max(measured_margin(n, 2.0 ** (lo / _SIGMA_STEPS), tol), measured_margin(n, 2.0 ** (hi / _SIGMA_STEPS), tol))


@lru_cache(maxsize=4096)
def measured_margin(n: int, sigma: float, tol: float) -> int:
    """Smallest margin ``d`` (grid positions) beyond which a Gaudi mask of length ``n`` and its derivatives are
    below ``tol``.

    Measured, not bounded: for boxcars of integer width ``n // 4`` and ``n // 2`` the mask ``m`` and its
    derivatives with respect to the width and the location fractions, per grid step (``dm/dw / n``, ``dm/dl / n``:
    the change of the mask when a width or location moves by one position), are evaluated at every position; the
    margin is the smallest ``d`` such that all of them are ``<= tol`` at every cyclic distance ``>= d`` outside the
    window.  ``n`` when no margin short of the whole side is enough
    (``sigma`` small against ``n``, or so large against ``n / 2`` that the truncated spectrum rings).  The tails
    are the periodic Gaussian kernel's (std ``n / (2 pi sigma)``), so they depend little on the width."""
    from .masks import gaudi_mask

    dtype = torch.float64
    worst = np.zeros(n)  # largest value at each cyclic distance from the window (index = distance)
    widths = sorted({max(n // 4, 1), max(n // 2, 1)})
    for width in widths:
        w = torch.tensor([width / n], dtype=dtype)
        loc = torch.zeros(1, dtype=dtype)
        ones = torch.ones(1, dtype=dtype)
        m, dw = torch.func.jvp(lambda a, b=loc: gaudi_mask(a, b, n, sigma, ste=False), (w,), (ones,))
        _, dl = torch.func.jvp(lambda a, b=w: gaudi_mask(b, a, n, sigma, ste=False), (loc,), (ones,))
        value = torch.stack([m[0].abs(), dw[0].abs() / n, dl[0].abs() / n]).amax(0).numpy()
        pos = np.arange(n)
        dist = np.where(pos < width, 0, np.minimum(pos - width + 1, n - pos))
        np.maximum.at(worst, dist, value)
    above = np.flatnonzero(worst > tol)
    d = int(above[-1]) + 1 if len(above) else 0  # the first distance from which everything is below tol
    # not below tol before the farthest distance the narrower window has: the tails cover the whole side
    return n if d >= (n - widths[0] + 1) // 2 else d


@dataclass(frozen=True)
class WindowPlan:
    """Which components meet which tiles, on each side (rows of the masked factors: ``component * r + i``).

    ``rows_in[t]`` / ``rows_out[s]``: int64 index tensors (None for an empty tile), ``tiles``: the tile size of
    each side (input, output), ``macs``: multiply-adds of the windowed product per token, ``full_macs``: of the full one."""

    tiles: tuple[int, int]
    rows_in: tuple[Tensor | None, ...]
    rows_out: tuple[Tensor | None, ...]
    macs: int
    full_macs: int

    @property
    def fraction(self) -> float:
        """Windowed multiply-adds / full multiply-adds."""
        return self.macs / max(self.full_macs, 1)


def _cover(width: np.ndarray, location: np.ndarray, n: int, margin: int, tile: int) -> np.ndarray:
    """``(K, ceil(n / tile))`` bool: the widened cyclic window of each component meets each tile."""
    tiles = -(-n // tile)
    length = width + 2 * margin
    start = np.mod(location - margin, n)
    full = length >= n
    pos = np.arange(n)
    inside = full[:, None] | (np.mod(pos[None, :] - start[:, None], n) < length[:, None])
    pad = tiles * tile - n
    if pad:
        inside = np.concatenate([inside, np.zeros((len(width), pad), dtype=bool)], axis=1)
    return inside.reshape(len(width), tiles, tile).any(axis=2)


def window_plan(widths: Tensor, locations: Tensor, in_features: int, out_features: int, rank: int,
                margins: tuple[int, int], tile: int | tuple[int, int],
                device: torch.device | None = None) -> WindowPlan:
    """The tiles each component meets, from integer grid ``widths``/``locations`` ``(2, K)`` (input, output).

    ``margins``: the widening ``(d_in, d_out)`` of :func:`window_margin` (0 for exact boxcars)."""
    tiles = (tile, tile) if isinstance(tile, int) else tuple(tile)
    if min(tiles) < 1:
        raise ValueError(f"window tiles must be >= 1, got {tile}")
    w = widths.detach().cpu().numpy().astype(np.int64)
    loc = locations.detach().cpu().numpy().astype(np.int64)
    k = w.shape[1]
    rows_of = np.arange(k * rank, dtype=np.int64).reshape(k, rank)
    plans, macs = [], 0
    for side, n in ((0, in_features), (1, out_features)):
        tile = tiles[side]
        cover = _cover(w[side], loc[side], n, margins[side], tile)
        rows = []
        for t in range(cover.shape[1]):
            comps = np.flatnonzero(cover[:, t])
            size = min(tile, n - t * tile)
            macs += len(comps) * rank * size
            rows.append(torch.from_numpy(rows_of[comps].reshape(-1)).to(device) if len(comps) else None)
        plans.append(tuple(rows))
    return WindowPlan(tiles=tiles, rows_in=plans[0], rows_out=plans[1], macs=macs,
                      full_macs=k * rank * (in_features + out_features))


class _WindowedProduct(torch.autograd.Function):
    """``x @ v.T @ u`` on the plan's tiles, with a hand-written backward over the same tiles.

    Autograd through per-tile ``index_select`` would allocate and zero a gradient of the whole source (the
    hidden activations, ``K*r x tokens``) for every tile; here every gradient is one buffer, written tile by tile."""

    @staticmethod
    def forward(ctx, x2: Tensor, v: Tensor, u: Tensor, bias: Tensor | None,  # type: ignore[override]
                plan: WindowPlan) -> Tensor:
        tokens, (t_in, t_out) = x2.shape[0], plan.tiles
        n_in, n_out = v.shape[1], u.shape[1]
        dtype = torch.promote_types(torch.promote_types(x2.dtype, v.dtype), u.dtype)
        x2, v, u = x2.to(dtype), v.to(dtype), u.to(dtype)
        ht = x2.new_zeros(v.shape[0], tokens)  # hidden activations, one row per component rank: (K*r, tokens)
        for t, rows in enumerate(plan.rows_in):
            if rows is not None:
                cols = slice(t * t_in, min((t + 1) * t_in, n_in))
                ht.index_add_(0, rows, v[:, cols].index_select(0, rows) @ x2[:, cols].t())
        # the output is built transposed, (out, tokens), one contiguous row block per tile, starting from the bias;
        # returned as its (tokens, out) view (a reshape to (*, out) stays a view)
        if bias is None:
            yt = x2.new_zeros(n_out, tokens)
        else:
            yt = bias.to(dtype).unsqueeze(1).expand(n_out, tokens).contiguous()
        for s, rows in enumerate(plan.rows_out):
            if rows is not None:
                cols = slice(s * t_out, min((s + 1) * t_out, n_out))
                yt[cols].addmm_(u[:, cols].index_select(0, rows).t(), ht.index_select(0, rows))
        ctx.save_for_backward(x2, v, u, ht)
        ctx.plan = plan
        ctx.has_bias = bias is not None
        return yt.t()

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        x2, v, u, ht = ctx.saved_tensors
        plan: WindowPlan = ctx.plan
        (t_in, t_out), n_in, n_out = plan.tiles, v.shape[1], u.shape[1]
        need_x, need_v, need_u, need_b = ctx.needs_input_grad[:4]
        gy = gy.to(ht.dtype)
        g_ht = ht.new_zeros(ht.shape)
        g_u = torch.zeros_like(u) if need_u else None
        for s, rows in enumerate(plan.rows_out):
            if rows is None:
                continue
            cols = slice(s * t_out, min((s + 1) * t_out, n_out))
            u_s = u[:, cols].index_select(0, rows)
            g_ht.index_add_(0, rows, u_s @ gy[:, cols].t())
            if g_u is not None:
                g_u[:, cols].index_copy_(0, rows, ht.index_select(0, rows) @ gy[:, cols])
        g_x = x2.new_zeros(n_in, x2.shape[0]) if need_x else None
        g_v = torch.zeros_like(v) if need_v else None
        for t, rows in enumerate(plan.rows_in):
            if rows is None:
                continue
            cols = slice(t * t_in, min((t + 1) * t_in, n_in))
            g_rows = g_ht.index_select(0, rows)
            if g_x is not None:
                torch.mm(v[:, cols].index_select(0, rows).t(), g_rows, out=g_x[cols])
            if g_v is not None:
                g_v[:, cols].index_copy_(0, rows, g_rows @ x2[:, cols])
        g_b = gy.sum(0) if need_b and ctx.has_bias else None
        return (None if g_x is None else g_x.t()), g_v, g_u, g_b, None


def windowed_product(x: Tensor, v: Tensor, u: Tensor, plan: WindowPlan, bias: Tensor | None = None) -> Tensor:
    """``x @ v.T @ u (+ bias)`` computed on the plan's tiles only.

    Args:
        x: input ``(*, in)``.
        v: masked input factors ``(K*r, in)``; u: masked output factors ``(K*r, out)`` (the rows the plan indexes).
        plan: :func:`window_plan` of the same components.
        bias: optional ``(out,)``.

    Shape: ``(*, in)`` -> ``(*, out)``.  Differentiable in ``x``, ``v``, ``u`` and ``bias``: the backward runs
    over the same tiles (a factor's gradient is 0 outside them)."""
    lead, n_in = x.shape[:-1], x.shape[-1]
    n_out = u.shape[1]
    return _WindowedProduct.apply(x.reshape(-1, n_in), v, u, bias, plan).reshape(*lead, n_out)
