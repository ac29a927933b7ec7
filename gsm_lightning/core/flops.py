"""Analytic FLOPs (multiply-adds per token) of GBLR structures, in plain PyTorch.

A component of rank ``r`` with integer widths ``W_in`` and ``W_out`` costs
``r * (W_in + W_out)`` multiply-adds per token when it is *active*
(``W_in > 0`` and ``W_out > 0``); a dense ``in x out`` layer costs ``in * out``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

__all__ = ["StructuredCost", "grid_cost", "component_grid_cost", "np_component_grid_cost", "grid_widths", "structure_flops", "bisect_threshold", "cut_threshold",
           "project_widths_to_budget",
           "layers_flops", "flops_ratio"]


class StructuredCost:
    """Cost accounting shared by structured linear layers: subclasses define ``flops()`` (multiply-adds
    per token of the structured weight, bias excluded), ``in_features``, ``out_features`` and ``bias``."""

    in_features: int
    out_features: int

    def flops(self) -> int:
        raise NotImplementedError

    def dense_flops(self) -> int:
        """Multiply-adds per token of a dense layer of the same shape."""
        return self.in_features * self.out_features

    def flops_ratio(self) -> float:
        return self.flops() / self.dense_flops()

    def params(self) -> int:
        """Nonzero parameters of the structured weight (= ``flops()``) plus the bias."""
        return self.flops() + (self.out_features if getattr(self, "bias", None) is not None else 0)


def grid_widths(widths: Tensor, in_features: int, out_features: int) -> Tensor:
    """Integer widths ``(2, K)`` (row 0 input, row 1 output) on the grid, clamped to ``[0, n]``."""
    w = widths.detach()
    w = w if w.dtype in (torch.float32, torch.float64) else w.float()  # 16-bit floats cannot hold the grid
    n = torch.tensor([[in_features], [out_features]], device=w.device, dtype=w.dtype)
    return torch.round(w.clamp(0, 1) * n).to(torch.int64)


def structure_flops(int_widths: Tensor, in_features: int, out_features: int, rank: int = 1) -> int:
    """Multiply-adds per token of a structure given integer widths ``(2, K)``."""
    active = (int_widths[0] > 0) & (int_widths[1] > 0)
    return int(rank * (int_widths[0] + int_widths[1])[active].sum().item())


def grid_cost(widths: Tensor, in_features: int | Tensor, out_features: int | Tensor, rank: int | Tensor) -> Tensor:
    """Cost of (..., 2, K) width fractions, batched over leading dims.  ``in_features``, ``out_features`` and
    ``rank`` may also be ``(K,)`` tensors (components of several layers side by side)."""
    return component_grid_cost(widths, in_features, out_features, rank).sum(-1)


def component_grid_cost(widths: Tensor, in_features: int | Tensor, out_features: int | Tensor,
                        rank: int | Tensor) -> Tensor:
    """:func:`grid_cost` per component, ``(..., K)``: ``r * (w_in + w_out)`` on the grid, 0 for an inactive one."""
    wi = torch.round(widths[..., 0, :].clamp(0, 1) * in_features)
    wo = torch.round(widths[..., 1, :].clamp(0, 1) * out_features)
    active = (wi > 0) & (wo > 0)
    return (wi + wo) * active * rank


def np_component_grid_cost(widths: np.ndarray, in_features: np.ndarray, out_features: np.ndarray,
                           rank: np.ndarray) -> np.ndarray:
    """:func:`component_grid_cost` in NumPy, for the small host computations of the budget cut's bisections: the same
    IEEE operations in the same order and dtype (round half to even), so the same numbers bit for bit, without a
    kernel launch per operation.  ``widths`` is ``(2, ..., K)`` and finite."""
    wi = np.rint(np.minimum(np.maximum(widths[0], 0), 1) * in_features)
    wo = np.rint(np.minimum(np.maximum(widths[1], 0), 1) * out_features)
    return (wi + wo) * ((wi > 0) & (wo > 0)) * rank


def bisect_threshold(fits: Callable[[float], bool], lo: float, hi: float, iters: int) -> float:
    """Smallest threshold that ``fits``, to bisection precision: ``iters`` halvings of ``[lo, hi]`` (``fits``
    monotone, false at ``lo`` and true at ``hi``), each keeping the half whose upper end fits.  Returns the final
    upper end (``hi`` itself after 0 iterations), so the result always fits when ``hi`` does.  The one bisection of
    the width projections (widths lowered by a common ``tau`` until a FLOPs budget is met)."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _midpoints(lo: float, hi: float, depth: int) -> list[float]:
    """Every midpoint ``depth`` halvings of ``[lo, hi]`` can visit, computed as the bisection computes them."""
    points: list[float] = []
    bounds = [lo, hi]  # the ends of the intervals of one level, in order
    for _ in range(depth):
        mids = [0.5 * (a + b) for a, b in zip(bounds[:-1], bounds[1:])]
        points += mids
        bounds = [x for pair in zip(bounds[:-1], mids) for x in pair] + [bounds[-1]]
    return points


def cut_threshold(widths: Tensor, weights: Tensor, in_features: Tensor, out_features: Tensor, rank: Tensor,
                  fits: Callable[[float], bool], hi: float | None = None, iters: int = 40, levels: int = 4,
                  max_levels: int = 8) -> float:
    """The bisection of :func:`bisect_threshold` on ``[0, hi]`` for the smallest ``tau`` whose cut widths
    ``widths - tau * weights`` (``(2, K)``, ``weights >= 0``) have a total :func:`grid_cost` that ``fits``, bit for bit
    (while the totals are exact in ``widths``' dtype: integers below ``2**24`` in float32), at a fraction of the cost.

    * Every component's cost is non-increasing in ``tau`` (float rounding is monotone), so a component that costs the
      same at both ends of the bracket costs that at every point inside: after each batch of midpoints, such
      components leave the problem and only their sum is kept.
    * Each batch asks about every midpoint the next few halvings could visit (computed as the sequential bisection
      computes them), then walks those halvings: the first batch ``levels`` of them over all components, later ones,
      on fewer components, up to ``max_levels`` (no more work than the first), so fewer batches are needed.
    * The batches are small host computations, so they run in NumPy (:func:`np_component_grid_cost`; the products
      and differences rounded to ``widths``' dtype as in torch).

    Totals are summed exactly (float64) and ``fits`` is called with them.  ``in_features``, ``out_features`` and
    ``rank`` are ``(K,)`` tensors (components of several layers side by side).  ``hi`` defaults to
    ``max(widths / weights) + 1e-6`` over the positive weights (a cut that empties every such side; 0 when there is
    none)."""
    dtype = widths.dtype if widths.dtype in (torch.float32, torch.float64) else torch.float32
    w, c = (t.detach().to(device="cpu", dtype=dtype).numpy() for t in (widths, weights))
    n_in, n_out, r = (t.detach().to(device="cpu", dtype=dtype).numpy() for t in (in_features, out_features, rank))
    np_dtype = w.dtype
    if hi is None:
        positive = c > 0
        hi = float((w[positive] / c[positive]).max()) + 1e-6 if positive.any() else 0.0
    work = (2 ** levels - 1) * w.shape[1]  # the first batch's size: no later batch is larger

    def costs(taus: list[float]) -> np.ndarray:  # (len(taus), K left)
        t = np.asarray(taus, dtype=np_dtype)[:, None]
        return np_component_grid_cost(w[:, None] - t * c[:, None], n_in, n_out, r)

    lo, base = 0.0, 0.0  # base: the exact cost of the components that left the problem
    cost_lo, cost_hi = costs([lo, hi])
    done = 0
    while done < iters:
        keep = cost_lo != cost_hi
        if not keep.all():
            base += float(cost_lo[~keep].sum(dtype=np.float64))
            w, c, n_in, n_out, r = w[:, keep], c[:, keep], n_in[keep], n_out[keep], r[keep]
            cost_lo, cost_hi = cost_lo[keep], cost_hi[keep]
        depth = levels if done == 0 else max(levels, min(max_levels, int(work / max(w.shape[1], 1) + 1).bit_length() - 1))
        depth = min(depth, iters - done)
        points = _midpoints(lo, hi, depth)
        cost = costs(points)
        totals = (cost.sum(-1, dtype=np.float64) + base).tolist()
        row = {p: i for i, p in enumerate(points)}
        for _ in range(depth):
            mid = 0.5 * (lo + hi)
            if fits(totals[row[mid]]):
                hi, cost_hi = mid, cost[row[mid]]
            else:
                lo, cost_lo = mid, cost[row[mid]]
        done += depth
    return hi


def project_widths_to_budget(
    widths: Tensor, in_features: int, out_features: int, rank: int, budget_flops: float, iters: int = 60
) -> Tensor:
    """Shift all widths down by the smallest ``tau >= 0`` (then clamp to [0, 1]) so that the
    grid cost is at most ``budget_flops``.  Returns new widths; unchanged if already within budget."""
    w = widths.detach().clamp(0, 1)
    if float(grid_cost(w, in_features, out_features, rank)) <= budget_flops:
        return w
    tau = bisect_threshold(  # cost at tau = 1 is 0 <= budget
        lambda t: float(grid_cost((w - t).clamp(0, 1), in_features, out_features, rank)) <= budget_flops, 0.0, 1.0, iters)
    return (w - tau).clamp(0, 1)


def layers_flops(layers: Iterable[StructuredCost]) -> dict[str, float]:
    """``{"flops", "dense_flops", "ratio"}`` summed over structured ``layers`` (per token; the ratio is
    FLOPs-weighted, 1.0 when there is no layer)."""
    flops = dense = 0
    for layer in layers:
        flops += layer.flops()
        dense += layer.dense_flops()
    return {"flops": float(flops), "dense_flops": float(dense), "ratio": flops / dense if dense else 1.0}


def flops_ratio(layers: Iterable[StructuredCost]) -> float:
    """FLOPs-weighted ratio of structured to dense multiply-adds over ``layers`` (1.0 if none)."""
    return layers_flops(layers)["ratio"]
