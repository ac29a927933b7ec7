"""Fast inference of frozen GBLR layers (plain PyTorch).

A frozen :class:`~gsm_lightning.layer.GBLRLinear` computes ``y = (x V_m^T) U_m + b`` where row ``k`` of
``V_m`` (``K*r x in``) is zero outside the cyclic input window ``[L_in_k, L_in_k + W_in_k)`` and row
``k`` of ``U_m`` outside its output window.  Its plain forward still multiplies the full factors.
:class:`CompactGBLR` only touches the windows, tile by tile:

* **input side** -- ``[0, in)`` is cut into tiles of ``B_in`` positions.  A tile's *members* are the
  components whose input window intersects it.  Tiles are grouped into a few *buckets* of similar member
  counts; per bucket one ``bmm`` multiplies each tile of ``x`` (gathered with a precomputed index, or a
  free view) by its ``members x B_in`` weight tile (zero outside each component's window, padded to
  the bucket's largest member count) and ``index_add_`` accumulates the partial products into ``z``
  (``K*r x T``);
* **output side** -- ``[0, out)`` is cut into tiles of ``B_out`` rows; per bucket the members' rows
  of ``z`` are gathered and one ``bmm`` produces the output tiles, written with ``index_copy_``.

Multiply-adds are ``sum_k r (W_in_k + W_out_k)`` plus tile-boundary and bucket padding waste.  There
is no Python loop over components, tiles or chunks in ``forward`` (only over the <= ``max_buckets``
buckets per side).  Identity gathers/scatters are replaced by views, so a low-rank layer (all widths
full, one tile per side) is two thin gemms on the row-major input (no transpose), a side that is one
full tile is one gemm, and block-diagonal / block-low-rank structures with block-aligned tiles are clean
batched block gemms.  Tile sizes (powers of two, the side length and the structure's block size) and
bucketing are chosen per side by a cost model (:func:`plan_cost`).

A second path, **blocks** (:func:`plan_blocks`), groups the components into a few low-rank blocks:
components with identical windows are merged exactly into one block of higher rank, then blocks whose
union windows cost less than their separate gemms are merged (zero padding, still exact).  Each block is
``y[:, out window] += (x[:, in window] @ V_b) @ U_b`` on contiguous column slices (a window that wraps
around the end of its side takes one more gemm): no gather, scatter or transpose.  It suits structures
made of few distinct windows (nearly full windows, as in converted pretrained layers, or a few blocks);
``CompactGBLR.from_gblr(path="auto")`` picks the path by the cost model (:func:`blocks_cost`).

:func:`optimize_inference` replaces every frozen GBLR layer of a model by the faster of the
:class:`CompactGBLR` paths and the merged ``nn.Linear``, timed when given ``tokens`` or a sample input, and
by default keeps a dense copy of the weight for the token counts below which dense was faster
(:meth:`CompactGBLR.set_dense_fallback`), so that a compact layer is not slower than dense at one token.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layer import GBLRLinear, gblr_layers

__all__ = [
    "CompactGBLR",
    "SidePlan",
    "BlockPlan",
    "plan_side",
    "plan_blocks",
    "blocks_cost",
    "best_side_plan",
    "plan_cost",
    "dense_cost",
    "optimize_inference",
    "InferenceChoice",
    "InferenceReport",
]

BUCKET_THRESHOLDS: tuple[float, ...] = (0.6, 0.75, 0.9)

# Cost model (nanoseconds; calibrated on one core of the development CPU, see benchmarks/README.md).
# A gemm over ``W`` weights and ``T`` tokens takes ``W * max(COST_WEIGHT_READ, T * COST_MAC / eff)``
# (memory bound at small T; bmm reads its weights at COST_BMM_WEIGHT_READ); batched small gemms run at
# BMM_EFFICIENCY of a large gemm; every element
# gathered/scattered/transposed costs COST_MOVE and every launched op COST_LAUNCH.  ``optimize_inference``
# can time the candidates instead (pass ``sample_input`` or ``tokens``).
COST_MAC = 0.012
COST_WEIGHT_READ = 0.15
COST_BMM_WEIGHT_READ = 0.35
COST_MOVE = 0.4
COST_LAUNCH = 4000.0
BMM_EFFICIENCY = 0.9
# blocks path: a gemm whose smallest dimension (the block rank) is R runs at R / (R + BLOCK_RANK_HALF) of peak
BLOCK_RANK_HALF = 12.0


# ------------------------------------------------------------------------------------------ planning
@dataclass
class SidePlan:
    """Tiling of one side (length ``n``) of a frozen GBLR layer.

    The side is cut into tiles of ``tile`` consecutive positions (the last one zero-padded).  A tile's
    *members* are the components whose window on this side intersects it.  Tiles without members are
    dropped; the others are grouped into buckets of similar member counts, each bucket is
    ``(tiles, members)``: tile ids ``(n_b,)`` and member component ids ``(n_b, S_b)`` (``-1`` = padding)."""

    n: int
    rank: int
    tile: int
    threshold: float
    num_components: int
    buckets: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    @property
    def n_tiles(self) -> int:
        return -(-self.n // self.tile)

    @property
    def tiles_identity(self) -> bool:
        """A single bucket holding every tile in order (the side needs no gather/scatter)."""
        return len(self.buckets) == 1 and np.array_equal(self.buckets[0][0], np.arange(self.n_tiles))

    @property
    def members_identity(self) -> bool:
        """A single bucket whose members, flattened, are ``0..K-1`` (``z`` needs no gather/scatter)."""
        return len(self.buckets) == 1 and np.array_equal(self.buckets[0][1].reshape(-1), np.arange(self.num_components))

    @property
    def weights(self) -> int:
        """Stored tile weights (= multiply-adds per token of the bmms, padding included)."""
        return sum(m.size * self.rank * self.tile for _, m in self.buckets)

    def moved(self) -> int:
        """Elements per token gathered/scattered by this side (tiles of x or y, and rows of z)."""
        tiles = 0 if self.tiles_identity else sum(t.size * self.tile for t, _ in self.buckets)
        members = 0 if self.members_identity else sum(m.size * self.rank for _, m in self.buckets)
        return tiles + members


def _membership(starts: np.ndarray, widths: np.ndarray, n: int) -> np.ndarray:
    """Boolean ``(K, n)``: position ``j`` lies in the cyclic window of component ``k``."""
    offset = (np.arange(n)[None, :] - starts[:, None]) % n
    return offset < widths[:, None]


def plan_side(
    starts: Sequence[int] | np.ndarray,
    widths: Sequence[int] | np.ndarray,
    n: int,
    rank: int,
    tile: int,
    threshold: float = 0.7,
    max_buckets: int = 4,
    _mask: np.ndarray | None = None,
) -> SidePlan:
    """Plan one side: cut ``[0, n)`` into tiles of ``tile`` positions, list each tile's member components,
    and group the tiles (most members first) into at most ``max_buckets`` buckets, opening a new bucket
    when a tile has fewer than ``threshold`` times the members of the current bucket's first tile."""
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    widths = np.asarray(widths, dtype=np.int64).reshape(-1)
    k = starts.size
    if widths.size != k:
        raise ValueError(f"starts ({k}) and widths ({widths.size}) must have the same length")
    if tile < 1 or max_buckets < 1:
        raise ValueError(f"tile and max_buckets must be >= 1, got {tile}, {max_buckets}")
    tile = min(int(tile), int(n))
    plan = SidePlan(n=int(n), rank=int(rank), tile=tile, threshold=float(threshold), num_components=k)
    if k == 0:
        return plan
    if ((widths < 1) | (widths > n)).any() or ((starts < 0) | (starts >= n)).any():
        raise ValueError(f"widths must be in [1, {n}] and starts in [0, {n}) for a frozen structure")
    mask = _membership(starts, widths, n) if _mask is None else _mask
    nt = plan.n_tiles
    padded = np.zeros((k, nt * tile), dtype=bool)
    padded[:, :n] = mask
    member = padded.reshape(k, nt, tile).any(-1).T  # (n_tiles, K)
    counts = member.sum(1)
    order = np.argsort(-counts, kind="stable")
    order = order[counts[order] > 0]
    groups: list[list[int]] = []
    for j in order.tolist():
        if groups and (counts[j] >= threshold * counts[groups[-1][0]] or len(groups) == max_buckets):
            groups[-1].append(j)
        else:
            groups.append([j])
    for g in groups:
        tiles = np.sort(np.asarray(g, dtype=np.int64))
        s = int(counts[g[0]])
        members = np.full((tiles.size, s), -1, dtype=np.int64)
        for i, j in enumerate(tiles.tolist()):  # build time only
            ids = np.flatnonzero(member[j])
            members[i, : ids.size] = ids
        plan.buckets.append((tiles, members))
    return plan


def _side_cost(p: SidePlan, tokens: int, output: bool) -> float:
    t = max(int(tokens), 1)
    gemm = p.weights * max(COST_BMM_WEIGHT_READ, t * COST_MAC / BMM_EFFICIENCY)
    launches = 2 * len(p.buckets) + (0 if p.tiles_identity else 1)
    return gemm + t * COST_MOVE * p.moved() + COST_LAUNCH * launches


def plan_cost(plan_in: SidePlan, plan_out: SidePlan, tokens: int = 256) -> float:
    """Modelled time (ns, CPU constants) of a :class:`CompactGBLR` forward over ``tokens`` tokens."""
    t = max(int(tokens), 1)
    in_view = plan_in.tiles_identity and plan_in.n_tiles * plan_in.tile == plan_in.n  # strided view of x, no copy
    out_full = plan_out.tiles_identity and plan_out.members_identity and plan_out.n_tiles == 1  # one gemm into y
    transposes = t * COST_MOVE * ((0 if in_view else plan_in.n) + (0 if out_full else plan_out.n))
    return _side_cost(plan_in, t, False) + _side_cost(plan_out, t, True) + transposes + 2 * COST_LAUNCH


def dense_cost(in_features: int, out_features: int, tokens: int = 256) -> float:
    """Modelled time (ns) of the merged dense ``nn.Linear`` over ``tokens`` tokens (same model as :func:`plan_cost`)."""
    return in_features * out_features * max(COST_WEIGHT_READ, max(int(tokens), 1) * COST_MAC) + COST_LAUNCH


def _tile_candidates(starts: np.ndarray, widths: np.ndarray, n: int) -> list[int]:
    cands = {n} | {2 ** i for i in range(3, 13) if 2 ** i < n}
    g = int(np.gcd.reduce(np.concatenate([starts, widths, [n]])))
    while g >= 8:  # block-aligned tiles for block structures
        cands.add(g)
        if g % 2:
            break
        g //= 2
    return sorted(cands)


def best_side_plan(starts: np.ndarray, widths: np.ndarray, n: int, rank: int, tokens: int = 256,
                   max_buckets: int = 8, tiles: Sequence[int] | None = None, output: bool = False) -> SidePlan:
    """The cheapest :func:`plan_side` (by the cost model) over tile sizes and bucket thresholds."""
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    widths = np.asarray(widths, dtype=np.int64).reshape(-1)
    if starts.size == 0:
        return plan_side(starts, widths, n, rank, 1, max_buckets=max_buckets)
    mask = _membership(starts, widths, n)
    best: tuple[float, SidePlan] | None = None
    for tile in (tiles or _tile_candidates(starts, widths, n)):
        for thr in BUCKET_THRESHOLDS:
            p = plan_side(starts, widths, n, rank, tile, thr, max_buckets, _mask=mask)
            cost = _side_cost(p, tokens, output)
            if best is None or cost < best[0]:
                best = (cost, p)
    assert best is not None
    return best[1]


# ------------------------------------------------------------------------------------------ blocks
@dataclass
class BlockPlan:
    """Components grouped into low-rank *blocks*: block ``p`` holds the components ``comps[p]`` and covers the
    cyclic input window ``[in_start[p], in_start[p] + in_len[p])`` and output window likewise; every member's own
    windows lie inside the block's, so zero-padding the members' factors to the block windows is exact.  A block is
    computed as two gemms on contiguous slices of the input and the output (a window that wraps around the end of
    its side takes one more gemm), so no gather or scatter is needed.  Full windows start at 0."""

    n_in: int
    n_out: int
    rank: int
    in_start: np.ndarray
    in_len: np.ndarray
    out_start: np.ndarray
    out_len: np.ndarray
    comps: list[np.ndarray] = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return len(self.comps)

    def block_rank(self, p: int) -> int:
        return int(self.comps[p].size) * self.rank

    def wraps(self, p: int) -> tuple[bool, bool]:
        """Whether block ``p``'s input / output window wraps around the end of its side."""
        return (bool(self.in_start[p] + self.in_len[p] > self.n_in), bool(self.out_start[p] + self.out_len[p] > self.n_out))

    @property
    def weights(self) -> int:
        """Stored block weights (= multiply-adds per token, padding to the block windows included)."""
        return sum(self.block_rank(p) * int(self.in_len[p] + self.out_len[p]) for p in range(self.num_blocks))


def _arc_union(a1: np.ndarray, w1: np.ndarray, a2: np.ndarray, w2: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Smallest cyclic window containing the windows ``(a1, w1)`` and ``(a2, w2)`` on a side of length ``n``
    (vectorised; full windows are returned as ``(0, n)``)."""
    len1 = np.maximum(w1, (a2 - a1) % n + w2)  # start at a1
    len2 = np.maximum(w2, (a1 - a2) % n + w1)  # start at a2
    start = np.where(len1 <= len2, a1, a2)
    length = np.minimum(len1, len2)
    full = length >= n
    return np.where(full, 0, start), np.where(full, n, length)


def _gemm_efficiency(rank: np.ndarray | int) -> np.ndarray:
    """Modelled efficiency of a gemm whose smallest dimension is ``rank`` (skinny gemms run below peak)."""
    r = np.asarray(rank, dtype=np.float64)
    return r / (r + BLOCK_RANK_HALF)


def _block_cost(rank: np.ndarray, li: np.ndarray, lo: np.ndarray, launches: np.ndarray | int, tokens: int) -> np.ndarray:
    w = rank * (li + lo)
    gemm = w * np.maximum(COST_WEIGHT_READ, tokens * COST_MAC / _gemm_efficiency(rank))
    return gemm + COST_LAUNCH * launches


def plan_blocks(
    starts_in: Sequence[int] | np.ndarray,
    widths_in: Sequence[int] | np.ndarray,
    starts_out: Sequence[int] | np.ndarray,
    widths_out: Sequence[int] | np.ndarray,
    n_in: int,
    n_out: int,
    rank: int,
    tokens: int = 256,
    max_blocks: int | None = None,
    merge: bool = True,
) -> BlockPlan:
    """Group components into blocks (:class:`BlockPlan`).

    Components with identical input and output windows always share a block (exact, no padding).  With ``merge``
    the blocks are then merged greedily, the pair whose union windows lower the modelled time the most first
    (fewer, higher-rank gemms against padding), until no merge helps; ``max_blocks`` forces merging beyond that."""
    si = np.asarray(starts_in, dtype=np.int64).reshape(-1)
    wi = np.asarray(widths_in, dtype=np.int64).reshape(-1)
    so = np.asarray(starts_out, dtype=np.int64).reshape(-1)
    wo = np.asarray(widths_out, dtype=np.int64).reshape(-1)
    k = si.size
    if not (wi.size == so.size == wo.size == k):
        raise ValueError("starts and widths of both sides must have the same length")
    if k and (((wi < 1) | (wi > n_in) | (wo < 1) | (wo > n_out)).any() or ((si < 0) | (si >= n_in) | (so < 0) | (so >= n_out)).any()):
        raise ValueError(f"widths must be in [1, n] and starts in [0, n) for a frozen structure (n = {n_in}, {n_out})")
    si, so = np.where(wi == n_in, 0, si), np.where(wo == n_out, 0, so)
    keys: dict[tuple[int, int, int, int], list[int]] = {}
    for c, key in enumerate(zip(si.tolist(), wi.tolist(), so.tolist(), wo.tolist())):  # build time only
        keys.setdefault(key, []).append(c)
    groups = [np.asarray(v, dtype=np.int64) for v in keys.values()]
    win = np.asarray(list(keys.keys()), dtype=np.int64).reshape(-1, 4)
    a_i, l_i, a_o, l_o = (win[:, j].copy() for j in range(4))
    r = np.asarray([g.size * rank for g in groups], dtype=np.float64)
    t = max(int(tokens), 1)

    def launches(ai: np.ndarray, li: np.ndarray, ao: np.ndarray, lo: np.ndarray) -> np.ndarray:
        return 2 + (ai + li > n_in) + (ao + lo > n_out)

    def cost(rr: np.ndarray, ai: np.ndarray, li: np.ndarray, ao: np.ndarray, lo: np.ndarray) -> np.ndarray:
        return _block_cost(rr, li, lo, launches(ai, li, ao, lo), t)

    if merge and len(groups) > 1:
        alive = np.ones(len(groups), dtype=bool)
        own = cost(r, a_i, l_i, a_o, l_o)

        def delta_row(i: int) -> tuple[np.ndarray, ...]:
            ui_a, ui_l = _arc_union(np.full_like(a_i, a_i[i]), np.full_like(l_i, l_i[i]), a_i, l_i, n_in)
            uo_a, uo_l = _arc_union(np.full_like(a_o, a_o[i]), np.full_like(l_o, l_o[i]), a_o, l_o, n_out)
            d = cost(r[i] + r, ui_a, ui_l, uo_a, uo_l) - own[i] - own
            d[i] = np.inf
            d[~alive] = np.inf
            return d, ui_a, ui_l, uo_a, uo_l

        delta = np.stack([delta_row(i)[0] for i in range(len(groups))])
        while alive.sum() > 1:
            flat = int(np.argmin(delta))
            i, j = divmod(flat, delta.shape[1])
            best = delta[i, j]
            if not (best < 0 or (max_blocks is not None and alive.sum() > max_blocks)) or not np.isfinite(best):
                break
            _, ui_a, ui_l, uo_a, uo_l = delta_row(i)
            a_i[i], l_i[i], a_o[i], l_o[i] = ui_a[j], ui_l[j], uo_a[j], uo_l[j]
            r[i] += r[j]
            groups[i] = np.concatenate([groups[i], groups[j]])
            alive[j] = False
            own[i] = cost(r[i:i + 1], a_i[i:i + 1], l_i[i:i + 1], a_o[i:i + 1], l_o[i:i + 1])[0]
            delta[j, :] = np.inf
            delta[:, j] = np.inf
            row = delta_row(i)[0]
            delta[i, :] = row
            delta[:, i] = row
        keep = np.flatnonzero(alive)
        groups = [np.sort(groups[i]) for i in keep]
        a_i, l_i, a_o, l_o = a_i[keep], l_i[keep], a_o[keep], l_o[keep]
    # the block that can start the output (full, not wrapping) first, then by output then input location
    order = sorted(range(len(groups)), key=lambda p: (not (a_o[p] == 0 and l_o[p] == n_out), int(a_o[p]), int(a_i[p])))
    return BlockPlan(n_in=int(n_in), n_out=int(n_out), rank=int(rank), in_start=a_i[order], in_len=l_i[order],
                     out_start=a_o[order], out_len=l_o[order], comps=[groups[p] for p in order])


def padded_rank(rank: int, multiple: int) -> int:
    """``rank`` rounded up to a multiple of ``multiple`` (the blocks path's zero padding of a block's rank)."""
    return -(-int(rank) // int(multiple)) * int(multiple)


def blocks_cost(plan: BlockPlan, tokens: int = 256, rank_multiple: int = 1) -> float:
    """Modelled time (ns) of the blocks path of :class:`CompactGBLR` over ``tokens`` tokens (block ranks padded to
    multiples of ``rank_multiple``)."""
    t = max(int(tokens), 1)
    if plan.num_blocks == 0:
        return COST_LAUNCH
    rr = np.asarray([padded_rank(plan.block_rank(p), rank_multiple) for p in range(plan.num_blocks)], dtype=np.float64)
    wraps = np.asarray([sum(plan.wraps(p)) for p in range(plan.num_blocks)])
    total = float(_block_cost(rr, plan.in_len, plan.out_len, 2 + wraps, t).sum())
    full_first = plan.out_start[0] == 0 and plan.out_len[0] == plan.n_out
    return total + (0.0 if full_first else t * COST_MOVE * plan.n_out + COST_LAUNCH)


# ------------------------------------------------------------------------------------------ module
CompactPath = Literal["auto", "tiles", "blocks"]


class CompactGBLR(nn.Module):
    """Inference-only form of a frozen :class:`GBLRLinear` that only computes inside the windows.

    Build it with :meth:`from_gblr`.  Shapes: input ``(*, in_features)``, output ``(*, out_features)`` (contiguous).
    Equal to the merged dense layer up to float summation order.  Weights are buffers (no training).

    Two execution paths (``self.path``), both exact:

    * ``"tiles"``: the tiled, bucketed bmm scheme of the module docstring (any structure; sides that are one
      full tile skip their gather/scatter, and a layer whose both sides are full is two thin gemms on the
      row-major input, with no transpose);
    * ``"blocks"``: components grouped into a few low-rank blocks over union windows (:func:`plan_blocks`):
      per block two gemms on contiguous column slices of the input and the output (no gather, no transpose).
      Components with identical windows always share a block (exact merge into a block of higher rank).  With
      ``rank_multiple`` > 1 each block's rank is padded with zeros up to a multiple of it: more multiply-adds, but
      BLAS runs such gemms faster (on the development CPU a rank-91 low-rank 1536x384 layer took 0.37-0.39x a dense
      layer's time and a rank-96 one 0.29-0.31x; BENCHMARKS.md, FL).

    With a dense fallback (:meth:`set_dense_fallback`, set by :func:`optimize_inference`) inputs of fewer than
    ``dense_below`` tokens use the merged dense weight instead."""

    def __init__(self, in_features: int, out_features: int, rank: int, plan_in: SidePlan, plan_out: SidePlan,
                 bias: Tensor | None, structure: dict[str, Any], path: str = "tiles", blocks: BlockPlan | None = None,
                 rank_multiple: int = 1) -> None:
        super().__init__()
        if path not in ("tiles", "blocks"):
            raise ValueError(f"unknown path {path!r}; expected 'tiles' or 'blocks'")
        if path == "blocks" and blocks is None:
            raise ValueError("the blocks path needs a BlockPlan")
        self.in_features, self.out_features, self.rank = int(in_features), int(out_features), int(rank)
        self.plan_in, self.plan_out = plan_in, plan_out
        self.path = path
        self.blocks = blocks
        if int(rank_multiple) < 1:
            raise ValueError(f"rank_multiple must be >= 1, got {rank_multiple}")
        self.rank_multiple = int(rank_multiple) if path == "blocks" else 1
        self.structure_info = structure
        self.num_components = plan_in.num_components
        self.in_view = plan_in.tiles_identity and plan_in.n_tiles * plan_in.tile == in_features
        self.z_identity_in = plan_in.members_identity
        self.z_identity_out = plan_out.members_identity
        self.out_identity = plan_out.tiles_identity
        # output side = one full tile holding every component in order: y = z^T U by one gemm, no transpose
        self.out_full = self.out_identity and self.z_identity_out and plan_out.n_tiles == 1
        # both sides full: two thin gemms on the row-major input
        self.lowrank = self.out_full and self.in_view and self.z_identity_in and plan_in.n_tiles == 1
        self.in_shapes = [(t.size, m.shape[1] * rank) for t, m in plan_in.buckets]
        self.out_shapes = [(t.size, m.shape[1] * rank) for t, m in plan_out.buckets]
        self.block_meta: list[tuple[int, int, bool, int, int, bool]] = []
        if blocks is not None:
            for p in range(blocks.num_blocks):
                wi, wo = blocks.wraps(p)
                self.block_meta.append((int(blocks.in_start[p]), int(blocks.in_len[p]), wi,
                                        int(blocks.out_start[p]), int(blocks.out_len[p]), wo))
        # what forward needs per block, precomputed (Python overhead matters at few tokens): buffer names, and
        # whether a window is the whole side (no slice) -- (a, li, wrap_in, full_in, c, lo, wrap_out, full_out, v, u)
        self._block_exec = [(a, li, wi, a == 0 and li == self.in_features, c, lo, wo, c == 0 and lo == self.out_features,
                             f"blk_v{p}", f"blk_u{p}") for p, (a, li, wi, c, lo, wo) in enumerate(self.block_meta)]
        # a single block covering both sides whole is a low-rank layer: forward is two gemms, without the block loop
        self._whole_block = len(self._block_exec) == 1 and self._block_exec[0][3] and self._block_exec[0][7]
        self.dense_below = 0
        if bias is not None:
            self.register_buffer("bias", bias.detach().clone())
        else:
            self.bias = None

    # -------------------------------------------------------------- build
    @classmethod
    @torch.no_grad()
    def from_gblr(
        cls,
        layer: GBLRLinear,
        tokens: int = 256,
        max_buckets: int = 8,
        tile_in: int | None = None,
        tile_out: int | None = None,
        path: CompactPath = "auto",
        merge_blocks: bool = True,
        max_blocks: int | None = None,
        rank_multiple: int = 1,
    ) -> CompactGBLR:
        """Build from a frozen :class:`GBLRLinear`.

        Args:
            layer: a frozen layer (``layer.freeze_structure()``), else ``ValueError``.
            tokens: token count the cost model optimises for.
            max_buckets: most bmms per side (tiles path).
            tile_in / tile_out: force a tile size per side (default: chosen by the cost model; forcing one
                selects the tiles path unless ``path`` says otherwise).
            path: ``"tiles"``, ``"blocks"`` or ``"auto"`` (the cheaper by the cost model).
            merge_blocks: blocks path: merge blocks of different windows when the model says it pays
                (components with identical windows are always merged).
            max_blocks: blocks path: merge until at most this many blocks remain.
            rank_multiple: blocks path: pad each block's rank with zeros up to a multiple of this (exact; more
                multiply-adds, but gemms of such ranks can run faster; ``optimize_inference`` times 1 and 8).
        """
        if not isinstance(layer, GBLRLinear):
            raise TypeError(f"CompactGBLR.from_gblr expects a GBLRLinear, got {type(layer).__name__}")
        if not layer.is_frozen:
            raise ValueError("CompactGBLR needs a frozen GBLRLinear: call layer.freeze_structure() first")
        if path not in ("auto", "tiles", "blocks"):
            raise ValueError(f"unknown path {path!r}; expected 'auto', 'tiles' or 'blocks'")
        if int(rank_multiple) < 1:
            raise ValueError(f"rank_multiple must be >= 1, got {rank_multiple}")
        n_in, n_out, r, k = layer.in_features, layer.out_features, layer.rank_per_component, layer.num_components
        w = layer.int_widths().cpu().numpy()
        loc = layer.int_locations().cpu().numpy()
        if k and (w < 1).any():
            raise ValueError("frozen layer has an inactive component (width 0); re-freeze the structure")
        plan_in = best_side_plan(loc[0], w[0], n_in, r, tokens, max_buckets, None if tile_in is None else [tile_in])
        plan_out = best_side_plan(loc[1], w[1], n_out, r, tokens, max_buckets,
                                  None if tile_out is None else [tile_out], output=True)
        blocks = None
        if path == "auto" and (tile_in is not None or tile_out is not None or k == 0):
            path = "tiles"
        if path in ("auto", "blocks"):
            blocks = plan_blocks(loc[0], w[0], loc[1], w[1], n_in, n_out, r, tokens, max_blocks, merge_blocks)
            if path == "auto":
                path = "blocks" if blocks_cost(blocks, tokens, rank_multiple) < plan_cost(plan_in, plan_out, tokens) else "tiles"
        v, u = layer.masked_factors()  # (K*r, in), (K*r, out), zero outside the windows
        structure = {"in_features": n_in, "out_features": n_out, "rank_per_component": r,
                     "widths": w.tolist(), "locations": loc.tolist()}
        mod = cls(n_in, n_out, r, plan_in, plan_out, layer.bias, structure, path, blocks if path == "blocks" else None,
                  rank_multiple)
        v, u = v.detach().reshape(k, r, n_in), u.detach().reshape(k, r, n_out)
        if path == "blocks":
            mod._build_blocks(v, u)
        else:
            mod._build(v, u)
        return mod

    @staticmethod
    def _tile_weights(f: Tensor, plan: SidePlan, tiles: np.ndarray, members: np.ndarray,
                      pad_row: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Weights ``(n_b, S*r, tile)`` of a bucket, the positions ``(n_b*tile,)`` its tiles cover
        (padding positions point at ``n``) and the z rows ``(n_b*S*r,)`` of its members."""
        k, r, n = f.shape
        dev = f.device
        f_ext = torch.zeros(k + 1, r, n + 1, device=dev, dtype=f.dtype)  # zero row k, zero column n
        f_ext[:k, :, :n] = f
        pos = torch.as_tensor(tiles)[:, None] * plan.tile + torch.arange(plan.tile)[None, :]  # (n_b, tile)
        pos = torch.where(pos < n, pos, torch.full_like(pos, n)).to(dev)
        mem = torch.as_tensor(members).to(dev)
        mem = torch.where(mem >= 0, mem, torch.full_like(mem, k))  # (n_b, S)
        nb, s = mem.shape
        w = f_ext[mem]  # (n_b, S, r, n+1)
        w = torch.gather(w, 3, pos[:, None, None, :].expand(nb, s, r, plan.tile))  # (n_b, S, r, tile)
        # padding slots: input side accumulates them into the dump rows k*r.. of z (zero weights);
        # output side reads row 0 (always present) against zero weights
        zmem = mem if pad_row is None else torch.where(mem < k, mem, torch.full_like(mem, pad_row))
        zrows = (zmem[:, :, None] * r + torch.arange(r, device=dev)[None, None, :]).reshape(-1)
        return w.reshape(nb, s * r, plan.tile).contiguous(), pos.reshape(-1), zrows

    def _build(self, v: Tensor, u: Tensor) -> None:
        """Tiles path: register the per-bucket weight tiles and index tensors as buffers."""
        for b, (tiles, members) in enumerate(self.plan_in.buckets):
            w, pos, zrows = self._tile_weights(v, self.plan_in, tiles, members)
            self.register_buffer(f"in_w{b}", w)  # (n_b, S*r, tile)
            self.register_buffer(f"in_pos{b}", torch.where(pos < self.in_features, pos, torch.zeros_like(pos)))
            self.register_buffer(f"in_z{b}", zrows)
        for b, (tiles, members) in enumerate(self.plan_out.buckets):
            w, pos, zrows = self._tile_weights(u, self.plan_out, tiles, members, pad_row=0)
            self.register_buffer(f"out_w{b}", w.transpose(1, 2).contiguous())  # (n_b, tile, S*r)
            rows = torch.as_tensor(tiles)[:, None] * self.plan_out.tile + torch.arange(self.plan_out.tile)[None, :]
            self.register_buffer(f"out_rows{b}", rows.reshape(-1).to(u.device))  # rows of the padded output
            self.register_buffer(f"out_z{b}", zrows)

    def _block_positions(self, p: int, device: Any = None) -> tuple[Tensor, Tensor, Tensor]:
        """z rows ``(R_p,)``, input positions ``(L_p,)`` and output positions ``(M_p,)`` of block ``p``."""
        bp = self.blocks
        assert bp is not None
        r = self.rank
        rows = (torch.as_tensor(bp.comps[p])[:, None] * r + torch.arange(r)[None, :]).reshape(-1)
        pin = (int(bp.in_start[p]) + torch.arange(int(bp.in_len[p]))) % self.in_features
        pout = (int(bp.out_start[p]) + torch.arange(int(bp.out_len[p]))) % self.out_features
        return rows.to(device), pin.to(device), pout.to(device)

    def _build_blocks(self, v: Tensor, u: Tensor) -> None:
        """Blocks path: register per block ``blk_v{p}`` ``(L_p, R_p)`` (input window x rank, so that the product
        is ``x[:, window] @ blk_v``) and ``blk_u{p}`` ``(R_p, M_p)``, the rank zero-padded to ``rank_multiple``."""
        k, r = self.num_components, self.rank
        v2, u2 = v.reshape(k * r, self.in_features), u.reshape(k * r, self.out_features)
        for p in range(len(self.block_meta)):
            rows, pin, pout = self._block_positions(p, v.device)
            pad = padded_rank(rows.numel(), self.rank_multiple) - rows.numel()
            self.register_buffer(f"blk_v{p}", F.pad(v2[rows][:, pin].t(), (0, pad)).contiguous())
            self.register_buffer(f"blk_u{p}", F.pad(u2[rows][:, pout], (0, 0, 0, pad)).contiguous())

    @torch.no_grad()
    def set_dense_fallback(self, below_tokens: int, weight: Tensor | None = None) -> CompactGBLR:
        """Use the merged dense weight (``weight``, default :meth:`to_dense`) for inputs of fewer than ``below_tokens``
        tokens (0 switches the fallback off and frees the weight).  Costs the memory of a dense weight."""
        below_tokens = int(below_tokens)
        if below_tokens < 0:
            raise ValueError(f"below_tokens must be >= 0, got {below_tokens}")
        self.dense_below = 0  # to_dense below must not see a half-set fallback
        if below_tokens == 0:
            if "dense_weight" in self._buffers:
                del self._buffers["dense_weight"]
            return self
        w = self.to_dense() if weight is None else weight.detach()
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"dense weight must be {(self.out_features, self.in_features)}, got {tuple(w.shape)}")
        self.register_buffer("dense_weight", w.clone().contiguous())
        self.dense_below = below_tokens
        return self

    # ------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"CompactGBLR expected input with last dimension {self.in_features}, got shape {tuple(x.shape)}")
        flat = x.dim() == 2
        x2 = x if flat else x.reshape(-1, self.in_features)
        if self.dense_below and x2.shape[0] < self.dense_below and not torch.compiler.is_exporting():
            return F.linear(x, self.dense_weight, self.bias)
        if self.num_components == 0:
            y = x.new_zeros(x.shape[:-1] + (self.out_features,))
            return y if self.bias is None else y + self.bias
        if self._whole_block:
            bufs = self._buffers
            z = torch.mm(x2, bufs["blk_v0"])
            y = torch.mm(z, bufs["blk_u0"]) if self.bias is None else torch.addmm(self.bias, z, bufs["blk_u0"])
        else:
            y = self._forward_blocks(x2) if self.path == "blocks" else self._forward_tiles(x2)
        return y if flat else y.view(x.shape[:-1] + (self.out_features,))

    def _forward_blocks(self, x2: Tensor) -> Tensor:
        n_in = self.in_features
        bufs, bias = self._buffers, self.bias
        y: Tensor | None = None
        for a, li, wrap_in, full_in, c, lo, wrap_out, full_out, vname, uname in self._block_exec:  # a few blocks
            vt, u = bufs[vname], bufs[uname]
            if full_in:
                z = torch.mm(x2, vt)
            elif wrap_in:  # window [a, n) + [0, li - (n - a))
                h = n_in - a
                z = torch.addmm(torch.mm(x2.narrow(1, a, h), vt.narrow(0, 0, h)), x2.narrow(1, 0, li - h), vt.narrow(0, h, li - h))
            else:
                z = torch.mm(x2.narrow(1, a, li), vt)
            if y is None:
                if full_out:
                    y = torch.mm(z, u) if bias is None else torch.addmm(bias, z, u)
                    continue
                # clone, not contiguous(): at one token the expanded bias is already contiguous and would be written
                y = (x2.new_zeros(x2.shape[0], self.out_features) if bias is None
                     else bias.expand(x2.shape[0], self.out_features).clone(memory_format=torch.contiguous_format))
            if full_out:
                y.addmm_(z, u)
            elif wrap_out:
                h = self.out_features - c
                y.narrow(1, c, h).addmm_(z, u.narrow(1, 0, h))
                y.narrow(1, 0, lo - h).addmm_(z, u.narrow(1, h, lo - h))
            else:
                y.narrow(1, c, lo).addmm_(z, u)
        assert y is not None
        return y

    def _forward_tiles(self, x2: Tensor) -> Tensor:
        r, k = self.rank, self.num_components
        tile_in, tile_out = self.plan_in.tile, self.plan_out.tile
        bufs = self._buffers
        if self.lowrank:  # two thin gemms, row-major
            z = torch.mm(x2, bufs["in_w0"].select(0, 0).t())
            u = bufs["out_w0"].select(0, 0).t()
            return torch.mm(z, u) if self.bias is None else torch.addmm(self.bias, z, u)
        xt = x2.t()  # (in, T) view
        t = xt.shape[1]
        if not self.in_view:
            xt = xt.contiguous()
        # input side: z (K*r [+ r dump rows], T)
        if self.z_identity_in:
            nb, sr = self.in_shapes[0]
            xg = xt.reshape(nb, tile_in, t) if self.in_view else xt.index_select(0, bufs["in_pos0"]).view(nb, tile_in, t)
            zt = torch.bmm(bufs["in_w0"], xg).view(nb * sr, t)
        else:
            zt = xt.new_zeros((k + 1) * r, t)
            for b, (nb, sr) in enumerate(self.in_shapes):
                if self.in_view:
                    xg = xt.reshape(nb, tile_in, t)
                else:
                    xg = xt.index_select(0, bufs[f"in_pos{b}"]).view(nb, tile_in, t)
                zt.index_add_(0, bufs[f"in_z{b}"], torch.bmm(bufs[f"in_w{b}"], xg).view(nb * sr, t))
        if self.out_full:  # y = z^T U, one gemm into the row-major output
            u = bufs["out_w0"].select(0, 0).t()
            zk = zt[: k * r].t()
            return torch.mm(zk, u) if self.bias is None else torch.addmm(self.bias, zk, u)
        # output side: y tiles (padded to whole tiles)
        if self.out_identity:
            nb, sr = self.out_shapes[0]
            zg = zt[: nb * sr].view(nb, sr, t) if self.z_identity_out else zt.index_select(0, bufs["out_z0"]).view(nb, sr, t)
            yt = torch.bmm(bufs["out_w0"], zg).view(nb * tile_out, t)
        else:
            yt = xt.new_zeros(self.plan_out.n_tiles * tile_out, t)
            for b, (nb, sr) in enumerate(self.out_shapes):
                zg = zt.index_select(0, bufs[f"out_z{b}"]).view(nb, sr, t)
                yt.index_copy_(0, bufs[f"out_rows{b}"], torch.bmm(bufs[f"out_w{b}"], zg).view(nb * tile_out, t))
        y = yt[: self.out_features].t().contiguous()
        return y if self.bias is None else y.add_(self.bias)

    # ----------------------------------------------------------- analysis
    def modelled_cost(self, tokens: int = 256) -> float:
        """Cost-model estimate (ns) of a forward over ``tokens`` tokens (:func:`plan_cost` or :func:`blocks_cost`)."""
        if self.path == "blocks":
            assert self.blocks is not None
            return blocks_cost(self.blocks, tokens, self.rank_multiple)
        return plan_cost(self.plan_in, self.plan_out, tokens)

    def macs(self) -> int:
        """Multiply-adds per token performed by the gemms (padding included)."""
        if self.path == "blocks":
            bp = self.blocks
            assert bp is not None
            return sum(padded_rank(bp.block_rank(p), self.rank_multiple) * int(bp.in_len[p] + bp.out_len[p])
                       for p in range(bp.num_blocks))
        return self.plan_in.weights + self.plan_out.weights

    def _buffer_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        for name, buf in self._buffers.items():
            if buf is not None and name != "dense_weight":
                return buf.dtype, buf.device
        return torch.float32, torch.device("cpu")

    @torch.no_grad()
    def masked_factors(self) -> tuple[Tensor, Tensor]:
        """Recover the masked factors ``V_m`` ``(K*r, in)`` and ``U_m`` ``(K*r, out)`` from the tiles or blocks."""
        k, r = self.num_components, self.rank
        dt, dev = self._buffer_dtype_device()
        if self.path == "blocks":
            v = torch.zeros(k * r, self.in_features, device=dev, dtype=dt)
            u = torch.zeros(k * r, self.out_features, device=dev, dtype=dt)
            for p in range(len(self.block_meta)):  # each component row belongs to exactly one block
                rows, pin, pout = self._block_positions(p, dev)  # padded rank: the first rows.numel() are real
                v[rows[:, None], pin[None, :]] = getattr(self, f"blk_v{p}")[:, : rows.numel()].t()
                u[rows[:, None], pout[None, :]] = getattr(self, f"blk_u{p}")[: rows.numel()]
            return v, u
        v = torch.zeros((k + 1) * r, self.in_features + 1, device=dev, dtype=dt)
        u = torch.zeros((k + 1) * r, self.out_features + 1, device=dev, dtype=dt)
        for side, f, plan, n in (("in", v, self.plan_in, self.in_features), ("out", u, self.plan_out, self.out_features)):
            for b, (tiles, _) in enumerate(plan.buckets):
                w = getattr(self, f"{side}_w{b}")
                w = w if side == "in" else w.transpose(1, 2)  # (n_b, S*r, tile)
                nb, sr, tl = w.shape
                pos = torch.as_tensor(tiles)[:, None] * tl + torch.arange(tl)[None, :]
                pos = torch.where(pos < n, pos, torch.full_like(pos, n)).to(dev)  # (n_b, tile)
                zrows = getattr(self, f"{side}_z{b}").view(nb, sr)
                rows = zrows[:, :, None].expand(nb, sr, tl).reshape(-1)
                cols = pos[:, None, :].expand(nb, sr, tl).reshape(-1)
                # each (component, position) pair lies in exactly one tile; padding entries are zero
                f.index_put_((rows, cols), w.reshape(-1), accumulate=True)
        return v[: k * r, : self.in_features], u[: k * r, : self.out_features]

    def to_dense(self) -> Tensor:
        """The dense weight ``(out, in)``."""
        v, u = self.masked_factors()
        return u.t() @ v

    def to_gblr(self) -> GBLRLinear:
        """Rebuild the frozen :class:`GBLRLinear` this module was made from."""
        k, r = self.num_components, self.rank
        v, u = self.masked_factors()
        layer = GBLRLinear._from_factors(
            u.reshape(k, r, self.out_features), v.reshape(k, r, self.in_features),
            torch.tensor(self.structure_info["widths"], dtype=torch.int64).reshape(2, k),
            torch.tensor(self.structure_info["locations"], dtype=torch.int64).reshape(2, k),
            self.bias,
        )
        return layer.freeze_structure()

    def extra_repr(self) -> str:
        def side(p: SidePlan) -> str:
            b = ",".join(f"{t.size}x{m.shape[1]}" for t, m in p.buckets)
            return f"tile={p.tile} buckets(tiles x members)=[{b}]"
        head = (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"K={self.num_components}, path={self.path}")
        if self.dense_below:
            head += f", dense below {self.dense_below} tokens"
        if self.path == "blocks":
            assert self.blocks is not None
            def rank(p: int) -> str:
                assert self.blocks is not None
                r, rp = self.blocks.block_rank(p), padded_rank(self.blocks.block_rank(p), self.rank_multiple)
                return f"{r}" if rp == r else f"{r}->{rp}"
            shapes = ",".join(f"{rank(p)}:{li}x{lo}" for p, (_, li, _, _, lo, _) in enumerate(self.block_meta))
            pad = f", rank_multiple={self.rank_multiple}" if self.rank_multiple > 1 else ""
            return f"{head}{pad}, blocks(rank:in x out)=[{shapes}]"
        return f"{head}, in: {side(self.plan_in)}; out: {side(self.plan_out)}"


# ----------------------------------------------------------------------------------- model level
@dataclass
class InferenceChoice:
    """What :func:`optimize_inference` did with one layer (times in seconds, ``None`` if not measured).

    ``path``: the :class:`CompactGBLR` path (``None`` for dense); ``dense_below``: the compact layer uses the
    merged dense weight below this many tokens (0: never)."""

    name: str
    in_features: int
    out_features: int
    flops_ratio: float
    choice: str  # "compact" | "dense"
    compact_cost: float
    dense_cost: float
    compact_time: float | None = None
    dense_time: float | None = None
    path: str | None = None
    dense_below: int = 0
    rank_multiple: int = 1


@dataclass
class InferenceReport:
    """Per-layer choices of :func:`optimize_inference`."""

    mode: str
    tokens: int
    layers: list[InferenceChoice] = field(default_factory=list)
    #: whole model with the compact layers over the same model with all of them merged to dense, timed on the
    #: sample input (``None``: not checked); ``reverted``: that check found too small a gain and every layer was merged
    model_ratio: float | None = None
    reverted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "tokens": self.tokens, "layers": [asdict(x) for x in self.layers],
                "model_ratio": self.model_ratio, "reverted": self.reverted}

    def __len__(self) -> int:
        return len(self.layers)

    def __str__(self) -> str:
        lines = [f"optimize_inference(mode={self.mode}, tokens={self.tokens}): {len(self.layers)} layers"]
        if self.model_ratio is not None:
            lines.append(f"  whole model with the compact layers: {self.model_ratio:.2f}x its dense merge on the sample input"
                         + (" -> not clearly faster, every layer merged to dense" if self.reverted else ""))
        for c in self.layers:
            t = "" if c.compact_time is None else f" measured compact {c.compact_time * 1e6:.1f}us dense {c.dense_time * 1e6:.1f}us"
            pad = f", ranks padded to {c.rank_multiple}" if c.rank_multiple > 1 else ""
            how = c.choice if c.path is None else f"{c.choice} ({c.path}{pad}{f', dense below {c.dense_below} tokens' if c.dense_below else ''})"
            lines.append(f"  {c.name:<40} {c.in_features:>5}->{c.out_features:<5} flops {c.flops_ratio:.3f} -> {how}{t}")
        return "\n".join(lines)


#: token counts at which :func:`optimize_inference` compares a compact layer with dense below the planned count
FALLBACK_LADDER: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def _fallback_threshold(faster: dict[int, bool]) -> int:
    """Dense-fallback threshold from ``{tokens: compact was faster}``: the smallest measured count above the
    largest count at which compact was not faster (so dense is used up to there), 0 if compact always was."""
    bad = [t for t, ok in faster.items() if not ok]
    if not bad:
        return 0
    above = [t for t in faster if t > max(bad)]
    return min(above) if above else max(bad) + 1


def _sync(x: Any) -> None:
    """Wait for the device of ``x`` (a tensor, or the first tensor of a tuple/list/dict of model inputs)."""
    if isinstance(x, dict):
        x = next((v for v in x.values() if isinstance(v, Tensor)), None)
    elif isinstance(x, (tuple, list)):
        x = next((v for v in x if isinstance(v, Tensor)), None)
    if isinstance(x, Tensor) and x.is_cuda:
        torch.cuda.synchronize(x.device)


def _burst_times(fns: Sequence[Any], x: Tensor, reps: int, rounds: int = 3, min_burst_s: float = 0.01) -> list[list[float]]:
    """Per function, per round: the mean time (s) of one call in a burst of back-to-back calls (at least
    ``reps // rounds`` calls and ``min_burst_s`` seconds, after one untimed call: warm caches, as a layer timed on
    its own); the functions take turns within every round."""
    per_burst = max(int(reps) // rounds, 1)
    out: list[list[float]] = [[] for _ in fns]
    with torch.no_grad():
        for _ in range(rounds):
            for i, fn in enumerate(fns):
                fn(x)  # refill the caches with this function's weights
                _sync(x)
                n, t0 = 0, time.perf_counter()
                while n < per_burst or time.perf_counter() - t0 < min_burst_s:
                    fn(x)
                    n += 1
                _sync(x)
                out[i].append((time.perf_counter() - t0) / n)
    return out


def _faster(a: Any, b: Any, x: Tensor, reps: int) -> bool:
    """Whether ``a`` beats ``b`` on ``x`` both in bursts of back-to-back calls (warm caches) and in single calls
    taking turns (each call finds the caches holding the other's weights, as inside a model): in each, the median
    over rounds of the per-round time ratio must be below 1."""
    hot = _burst_times([a, b], x, reps)
    if float(np.median([ta / tb for ta, tb in zip(*hot)])) >= 1.0:
        return False
    ratios = []
    with torch.no_grad():
        for _ in range(max(int(reps), 1)):
            t0 = time.perf_counter()
            a(x)
            _sync(x)
            t1 = time.perf_counter()
            b(x)
            _sync(x)
            t2 = time.perf_counter()
            ratios.append((t1 - t0) / max(t2 - t1, 1e-12))
    return float(np.median(ratios)) < 1.0


def _call(model: nn.Module, sample_input: Any) -> Any:
    """``model`` on a sample input given as a tensor, a tuple/list of arguments or a dict of keyword arguments."""
    if isinstance(sample_input, dict):
        return model(**sample_input)
    if isinstance(sample_input, (tuple, list)):
        return model(*sample_input)
    return model(sample_input)


def _layer_inputs(model: nn.Module, names: list[str], sample_input: Any) -> dict[str, Tensor]:
    """Capture the input of each named layer for one forward of ``model`` on ``sample_input``."""
    captured: dict[str, Tensor] = {}
    handles = []
    for name in names:
        mod = model.get_submodule(name)
        handles.append(mod.register_forward_pre_hook(lambda m, args, _n=name: captured.setdefault(_n, args[0].detach())))
    try:
        with torch.no_grad():
            _call(model, sample_input)
    finally:
        for h in handles:
            h.remove()
    return captured


def _set_layer(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def _model_ratio(model: nn.Module, swaps: dict[str, tuple[nn.Module, nn.Module]], sample_input: Any,
                 rounds: int = 9, min_burst_s: float = 0.05) -> float:
    """Time of ``model`` on ``sample_input`` with the first module of every ``swaps`` entry in place, over its time
    with the second (the dense merge) in place: the median over ``rounds`` of per-round ratios, each round timing a
    burst of calls (at least ``min_burst_s`` seconds) of each variant in turn, after one untimed call.  Leaves the
    first modules in place."""
    def variant(i: int) -> Any:
        def run(inp: Any) -> Any:
            for name, mods in swaps.items():
                _set_layer(model, name, mods[i])
            return _call(model, inp)
        return run

    compact, dense = _burst_times([variant(0), variant(1)], sample_input, rounds, rounds, min_burst_s)  # >= 1 call a burst
    for name, mods in swaps.items():
        _set_layer(model, name, mods[0])
    return float(np.median([a / b for a, b in zip(compact, dense)]))


@torch.no_grad()
def optimize_inference(
    model: nn.Module,
    mode: Literal["auto", "compact", "dense"] = "auto",
    sample_input: Any = None,
    tokens: int | None = None,
    reps: int = 20,
    fallback: bool = True,
    paths: Sequence[str] = ("tiles", "blocks"),
    rank_multiples: Sequence[int] = (1, 8),
    verify: bool = True,
    min_model_gain: float = 0.05,
    **compact_kwargs: Any,
) -> InferenceReport:
    """Replace every frozen :class:`GBLRLinear` of ``model`` (in place) by a :class:`CompactGBLR` or a
    merged ``nn.Linear``.

    Args:
        model: any module tree (or a single frozen ``GBLRLinear``: then use the returned report and
            ``CompactGBLR.from_gblr``; a bare layer cannot be replaced in place).
        mode: ``"compact"``, ``"dense"`` (merge) or ``"auto"``: the fastest of dense and the compact ``paths``,
            by a short timing (about ``reps`` calls each) when ``sample_input`` (model input) or ``tokens`` is given,
            else dense against the cost model's compact path at 256 tokens.  A compact layer is kept only if it
            beats dense both in bursts of back-to-back calls and in single calls taking turns with dense.
        sample_input: a model input (tensor, tuple of args or dict of kwargs) used to time each layer on
            its real input.
        tokens: time each layer on random ``(tokens, in_features)`` inputs instead.
        fallback: ``"auto"`` only: where the compact layer wins at the planned token count, also compare it with
            dense at the token counts of :data:`FALLBACK_LADDER` below it (timed, or by the cost model when not
            measuring) and keep the merged dense weight for the counts where dense was faster
            (:meth:`CompactGBLR.set_dense_fallback`; costs the memory of the dense weight), so that the layer is
            not slower than dense at a small batch.
        paths: compact paths to time in measured ``"auto"`` mode.
        rank_multiples: measured ``"auto"``: the blocks path is timed with its block ranks padded to each of these
            multiples (``CompactGBLR.from_gblr(rank_multiple=...)``; 1 = no padding), unless ``rank_multiple`` is
            passed among ``compact_kwargs``.
        verify: ``"auto"`` with ``sample_input`` only: after choosing per layer, time the whole model on
            ``sample_input`` with the chosen compact layers against the same model with every layer merged to dense
            (interleaved rounds); unless it is at least ``min_model_gain`` faster, merge every layer to dense
            (``report.reverted``).  Layers timed one by one can each win while the model as a whole does not
            (caches, small layers), and a whole-model timing is noisy: the margin keeps compact layers only where the
            gain is clear.  The ratio is ``report.model_ratio``.
        min_model_gain: the fraction of the dense merge's time that the whole model must save to stay compact
            (0.05: at most 0.95x; 0: any measured gain).
        **compact_kwargs: passed to :meth:`CompactGBLR.from_gblr`.

    Unfrozen GBLR layers are left alone (they are still training).  Returns an :class:`InferenceReport`.
    """
    if mode not in ("auto", "compact", "dense"):
        raise ValueError(f"unknown mode {mode!r}; expected 'auto', 'compact' or 'dense'")
    if isinstance(model, GBLRLinear):
        raise ValueError("optimize_inference replaces layers inside a model; for a single layer use "
                         "CompactGBLR.from_gblr(layer) or layer.to_linear()")
    if tokens is not None and tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    bad = [p for p in paths if p not in ("tiles", "blocks")]
    if bad or not paths:
        raise ValueError(f"paths must be a non-empty subset of ('tiles', 'blocks'), got {tuple(paths)}")
    if not 0.0 <= float(min_model_gain) < 1.0:
        raise ValueError(f"min_model_gain must be in [0, 1), got {min_model_gain}")
    if not rank_multiples or any(int(m) < 1 for m in rank_multiples):
        raise ValueError(f"rank_multiples must be a non-empty list of integers >= 1, got {tuple(rank_multiples)}")
    names = [n for n, m in gblr_layers(model) if m.is_frozen]
    measured = mode == "auto" and (sample_input is not None or tokens is not None)
    plan_tokens = tokens if tokens is not None else 256
    inputs = _layer_inputs(model, names, sample_input) if measured and sample_input is not None else {}
    if inputs:
        plan_tokens = max(1, int(np.median([v.numel() // v.shape[-1] for v in inputs.values()])))
    compact_kwargs.setdefault("tokens", plan_tokens)
    report = InferenceReport(mode=mode, tokens=plan_tokens)
    swaps: dict[str, tuple[nn.Module, nn.Module]] = {}  # compact layers chosen by timing, with their dense merge
    for name in names:
        layer = model.get_submodule(name)
        compact = None
        if mode == "compact" or (mode == "auto" and not measured):
            compact = CompactGBLR.from_gblr(layer, **compact_kwargs)
        dense = layer.to_linear() if mode != "compact" else None
        d_cost = dense_cost(layer.in_features, layer.out_features, plan_tokens)
        choice = mode
        ct = dt = None
        if mode == "auto":
            assert dense is not None
            if measured:
                x = inputs.get(name)
                if x is None:
                    p = next(layer.parameters())
                    x = torch.randn(plan_tokens, layer.in_features, device=p.device, dtype=p.dtype)
                wanted = [compact_kwargs["path"]] if "path" in compact_kwargs else list(paths)
                mults = [compact_kwargs["rank_multiple"]] if "rank_multiple" in compact_kwargs else list(dict.fromkeys(rank_multiples))
                kwargs = {k: v for k, v in compact_kwargs.items() if k not in ("path", "rank_multiple")}
                cands = [CompactGBLR.from_gblr(layer, path=pth, rank_multiple=m, **kwargs)
                         for pth in dict.fromkeys(wanted) for m in (mults if pth == "blocks" else [1])]
                *cts, dt = (float(np.median(t)) for t in _burst_times([*cands, dense], x, reps))
                best = int(np.argmin(cts))
                ct, compact = cts[best], cands[best]
                choice = "compact" if ct < dt and _faster(compact, dense, x, reps) else "dense"
            else:
                assert compact is not None
                choice = "compact" if compact.modelled_cost(plan_tokens) < d_cost else "dense"
            if choice == "compact" and fallback:
                assert compact is not None
                faster = {plan_tokens: True}
                x2 = x.reshape(-1, layer.in_features) if measured else None
                for t in (t for t in FALLBACK_LADDER if t < plan_tokens):
                    if measured:
                        assert x2 is not None
                        xt = x2[:t] if x2.shape[0] >= t else torch.randn(t, layer.in_features, device=x2.device, dtype=x2.dtype)
                        faster[t] = _faster(compact, dense, xt, reps)
                    else:
                        faster[t] = compact.modelled_cost(t) < dense_cost(layer.in_features, layer.out_features, t)
                below = _fallback_threshold(faster)
                if below > 1:
                    compact.set_dense_fallback(below, dense.weight)
        c_cost = compact.modelled_cost(plan_tokens) if compact is not None else math.nan
        new = compact if choice == "compact" else dense
        assert new is not None
        new.train(layer.training)
        _set_layer(model, name, new)
        if measured and choice == "compact" and dense is not None:
            dense.train(layer.training)
            swaps[name] = (new, dense)
        report.layers.append(InferenceChoice(
            name=name, in_features=layer.in_features, out_features=layer.out_features, flops_ratio=layer.flops_ratio(),
            choice=choice, compact_cost=c_cost, dense_cost=d_cost, compact_time=ct, dense_time=dt,
            path=compact.path if choice == "compact" and compact is not None else None,
            dense_below=compact.dense_below if choice == "compact" and compact is not None else 0,
            rank_multiple=compact.rank_multiple if choice == "compact" and compact is not None else 1))
    if verify and swaps and sample_input is not None:
        report.model_ratio = _model_ratio(model, swaps, sample_input)
        if report.model_ratio > 1.0 - float(min_model_gain):
            report.reverted = True
            for c in report.layers:
                if c.name in swaps:
                    _set_layer(model, c.name, swaps[c.name][1])
                    c.choice, c.path, c.dense_below, c.rank_multiple = "dense", None, 0, 1
    return report
