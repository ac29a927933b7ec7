"""How :class:`~gsm_lightning.compact.CompactGBLR` lays a frozen GBLR structure out as gemms (plain numpy).

A frozen :class:`~gsm_lightning.layer.GBLRLinear` computes ``y = (x V_m^T) U_m + b`` where row ``k`` of
``V_m`` (``K*r x in``) is zero outside the cyclic input window ``[L_in_k, L_in_k + W_in_k)`` and row
``k`` of ``U_m`` outside its output window.  Two exact layouts only touch the windows:

* **tiles** (:class:`SidePlan`, :func:`plan_side`, :func:`best_side_plan`): each side is cut into tiles of ``B``
  positions.  A tile's *members* are the components whose window intersects it.  Tiles are grouped into a few
  *buckets* of similar member counts; per bucket one ``bmm`` multiplies each tile of ``x`` (gathered with a
  precomputed index, or a free view) by its ``members x B`` weight tile and ``index_add_`` accumulates the partial
  products into ``z`` (``K*r x T``); the output side gathers the members' rows of ``z`` per bucket and writes its
  tiles with ``index_copy_``.  Multiply-adds are ``sum_k r (W_in_k + W_out_k)`` plus tile-boundary and bucket
  padding waste.  Tile sizes (powers of two, the side length and the structure's block size) and bucketing are
  chosen per side by the cost model (:func:`plan_cost`).
* **blocks** (:class:`BlockPlan`, :func:`plan_blocks`): components with identical windows are merged exactly into
  one block of higher rank, then blocks whose union windows cost less than their separate gemms are merged (zero
  padding, still exact).  Each block is ``y[:, out window] += (x[:, in window] @ V_b) @ U_b`` on contiguous column
  slices (a window that wraps around the end of its side takes one more gemm).  It suits structures made of few
  distinct windows (nearly full windows, as in converted pretrained layers, or a few blocks); its cost is
  :func:`blocks_cost`, with each block's rank optionally padded to a multiple (:func:`padded_rank`).

The cost model's constants are nanoseconds, calibrated on one core of the development CPU;
:func:`~gsm_lightning.inference.optimize_inference` can time the candidates instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "SidePlan",
    "BlockPlan",
    "plan_side",
    "best_side_plan",
    "plan_cost",
    "dense_cost",
    "plan_blocks",
    "blocks_cost",
    "padded_rank",
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
