"""Tile-aligned structures: windows snapped to multiples of a tile size (plain PyTorch, no Lightning).

A frozen GBLR structure whose window starts and widths are multiples of ``a`` maps onto ``a``-wide tiles with no
partial tile: :class:`~gsm_lightning.compact.CompactGBLR`'s tiles path then multiplies exactly the structure's
FLOPs (no tile-boundary padding), and windows that differ by less than a tile become identical, which its blocks
path merges exactly into higher-rank blocks.  :func:`align_structure` does the snapping at the phase switch
(``GBLRLinear.freeze_structure(align=a)``, ``GSMModule(freeze_align=a)``); phase 2 then fine-tunes the weights on
the aligned windows.

The rounding never raises a side's total width (so the FLOPs never rise) unless a side has more nonzero
components narrower than a tile than its width budget allows (every nonzero width is kept at least one tile, so no
component is dropped by the alignment): widths are rounded down to a tile, and the spare width is spent on
rounding up the components with the largest remainders (at least half a tile), largest first (largest-remainder
rounding).  Starts are rounded to the nearest multiple.  A side of length ``n`` is aligned to ``gcd(n, a)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["side_alignment", "align_side", "align_structure"]


def side_alignment(n: int, align: int) -> int:
    """The tile a side of length ``n`` is aligned to under ``align``: ``gcd(n, align)`` (1: unchanged)."""
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise ValueError(f"align must be an integer >= 1, got {align!r}")
    return math.gcd(int(n), align)


def align_side(widths: Tensor, starts: Tensor, n: int, align: int) -> tuple[Tensor, Tensor]:
    """Align one side: integer ``widths`` and ``starts`` ``(K,)`` on a side of length ``n`` to multiples of
    ``side_alignment(n, align)``.

    Returns ``(widths, starts)`` (int64): every nonzero width stays nonzero (at least one tile), zero widths stay
    zero, each width moves by less than one tile, and the sum of the widths does not rise unless the one-tile floor
    forces it.  Starts are rounded to the nearest multiple (cyclically)."""
    a = side_alignment(n, align)
    w = widths.detach().to(torch.int64)
    s = starts.detach().to(torch.int64)
    if w.shape != s.shape or w.dim() != 1:
        raise ValueError(f"widths and starts must be (K,) tensors of the same shape, got {tuple(w.shape)}, {tuple(s.shape)}")
    if a == 1:
        return w.clone(), s.clone()
    starts_out = torch.remainder(torch.div(s + a // 2, a, rounding_mode="floor") * a, n)
    low = torch.div(w, a, rounding_mode="floor") * a
    rem = w - low
    nonzero = w > 0
    out = torch.where(nonzero, low.clamp_min(a), torch.zeros_like(w))
    spare = int(w.sum()) - int(out.sum())
    # round up the largest remainders (only those of at least half a tile) while the spare width allows
    cand = nonzero & (low >= a) & (2 * rem >= a)
    n_up = min(int(cand.sum()), max(spare, 0) // a)
    if n_up > 0:
        key = torch.where(cand, rem, torch.full_like(rem, -1))
        up = torch.argsort(key, descending=True, stable=True)[:n_up]
        out[up] += a
    return out, starts_out


def align_structure(int_widths: Tensor, int_locations: Tensor, in_features: int, out_features: int,
                    align: int) -> tuple[Tensor, Tensor]:
    """Align both sides of an integer structure (``(2, K)`` widths and locations, row 0 input, row 1 output) with
    :func:`align_side`.  Returns new ``(widths, locations)``."""
    if int_widths.shape != int_locations.shape or int_widths.dim() != 2 or int_widths.shape[0] != 2:
        raise ValueError(f"expected (2, K) widths and locations, got {tuple(int_widths.shape)}, {tuple(int_locations.shape)}")
    sides = [align_side(int_widths[i], int_locations[i], n, align) for i, n in enumerate((in_features, out_features))]
    return torch.stack([sides[0][0], sides[1][0]]), torch.stack([sides[0][1], sides[1][1]])
