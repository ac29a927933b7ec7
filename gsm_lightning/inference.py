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
full, one tile per side) is two thin gemms and block-diagonal / block-low-rank structures with
block-aligned tiles are clean batched block gemms.  Tile sizes (powers of two, the side length and
the structure's block size) and bucketing are chosen per side by a cost model (:func:`plan_cost`).
:func:`optimize_inference` replaces every frozen GBLR layer of a model by the faster of a
:class:`CompactGBLR` and the merged ``nn.Linear``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from .layer import GBLRLinear, gblr_layers

__all__ = [
    "CompactGBLR",
    "SidePlan",
    "plan_side",
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
    transposes = t * COST_MOVE * (plan_in.n + plan_out.n)
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


# ------------------------------------------------------------------------------------------ module
class CompactGBLR(nn.Module):
    """Inference-only form of a frozen :class:`GBLRLinear` that only computes inside the windows.

    Build it with :meth:`from_gblr`.  Shapes: input ``(*, in_features)``, output ``(*, out_features)``.
    Equal to the merged dense layer up to float summation order.  Weights are buffers (no training)."""

    def __init__(self, in_features: int, out_features: int, rank: int, plan_in: SidePlan, plan_out: SidePlan,
                 bias: Tensor | None, structure: dict[str, Any]) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = int(in_features), int(out_features), int(rank)
        self.plan_in, self.plan_out = plan_in, plan_out
        self.structure_info = structure
        self.num_components = plan_in.num_components
        self.in_view = plan_in.tiles_identity and plan_in.n_tiles * plan_in.tile == in_features
        self.z_identity_in = plan_in.members_identity
        self.z_identity_out = plan_out.members_identity
        self.out_identity = plan_out.tiles_identity
        self.in_shapes = [(t.size, m.shape[1] * rank) for t, m in plan_in.buckets]
        self.out_shapes = [(t.size, m.shape[1] * rank) for t, m in plan_out.buckets]
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
    ) -> CompactGBLR:
        """Build from a frozen :class:`GBLRLinear`.

        Args:
            layer: a frozen layer (``layer.freeze_structure()``), else ``ValueError``.
            tokens: token count the cost model optimises for.
            max_buckets: most bmms per side.
            tile_in / tile_out: force a tile size per side (default: chosen by the cost model).
        """
        if not isinstance(layer, GBLRLinear):
            raise TypeError(f"CompactGBLR.from_gblr expects a GBLRLinear, got {type(layer).__name__}")
        if not layer.is_frozen:
            raise ValueError("CompactGBLR needs a frozen GBLRLinear: call layer.freeze_structure() first")
        n_in, n_out, r, k = layer.in_features, layer.out_features, layer.rank_per_component, layer.num_components
        w = layer.int_widths().cpu().numpy()
        loc = layer.int_locations().cpu().numpy()
        if k and (w < 1).any():
            raise ValueError("frozen layer has an inactive component (width 0); re-freeze the structure")
        plan_in = best_side_plan(loc[0], w[0], n_in, r, tokens, max_buckets, None if tile_in is None else [tile_in])
        plan_out = best_side_plan(loc[1], w[1], n_out, r, tokens, max_buckets,
                                  None if tile_out is None else [tile_out], output=True)
        v, u = layer.masked_factors()  # (K*r, in), (K*r, out), zero outside the windows
        structure = {"in_features": n_in, "out_features": n_out, "rank_per_component": r,
                     "widths": w.tolist(), "locations": loc.tolist()}
        mod = cls(n_in, n_out, r, plan_in, plan_out, layer.bias, structure)
        mod._build(v.detach().reshape(k, r, n_in), u.detach().reshape(k, r, n_out))
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
        """Register the per-bucket weight tiles and index tensors as buffers."""
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

    # ------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"CompactGBLR expected input with last dimension {self.in_features}, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        xt = x.reshape(-1, self.in_features).t()  # (in, T) view
        t = xt.shape[1]
        r, k = self.rank, self.num_components
        if k == 0:
            y = x.new_zeros(lead + (self.out_features,))
            return y if self.bias is None else y + self.bias
        tile_in, tile_out = self.plan_in.tile, self.plan_out.tile
        if not self.in_view:
            xt = xt.contiguous()
        # input side: z (K*r [+ r dump rows], T)
        if self.z_identity_in:
            nb, sr = self.in_shapes[0]
            xg = xt.reshape(nb, tile_in, t) if self.in_view else xt.index_select(0, self.in_pos0).view(nb, tile_in, t)
            zt = torch.bmm(self.in_w0, xg).view(nb * sr, t)
        else:
            zt = xt.new_zeros((k + 1) * r, t)
            for b, (nb, sr) in enumerate(self.in_shapes):
                if self.in_view:
                    xg = xt.reshape(nb, tile_in, t)
                else:
                    xg = xt.index_select(0, getattr(self, f"in_pos{b}")).view(nb, tile_in, t)
                zt.index_add_(0, getattr(self, f"in_z{b}"), torch.bmm(getattr(self, f"in_w{b}"), xg).view(nb * sr, t))
        # output side: y tiles (padded to whole tiles)
        if self.out_identity:
            nb, sr = self.out_shapes[0]
            zg = zt[: nb * sr].view(nb, sr, t) if self.z_identity_out else zt.index_select(0, self.out_z0).view(nb, sr, t)
            yt = torch.bmm(self.out_w0, zg).view(nb * tile_out, t)
        else:
            yt = xt.new_zeros(self.plan_out.n_tiles * tile_out, t)
            for b, (nb, sr) in enumerate(self.out_shapes):
                zg = zt.index_select(0, getattr(self, f"out_z{b}")).view(nb, sr, t)
                yt.index_copy_(0, getattr(self, f"out_rows{b}"), torch.bmm(getattr(self, f"out_w{b}"), zg).view(nb * tile_out, t))
        y = yt[: self.out_features].t()
        y = y + self.bias if self.bias is not None else y.contiguous()
        return y.reshape(lead + (self.out_features,))

    # ----------------------------------------------------------- analysis
    def modelled_cost(self, tokens: int = 256) -> float:
        """Cost-model estimate (ns) of a forward over ``tokens`` tokens (see :func:`plan_cost`)."""
        return plan_cost(self.plan_in, self.plan_out, tokens)

    def macs(self) -> int:
        """Multiply-adds per token performed by the bmms (padding included)."""
        return self.plan_in.weights + self.plan_out.weights

    @torch.no_grad()
    def masked_factors(self) -> tuple[Tensor, Tensor]:
        """Recover the masked factors ``V_m`` ``(K*r, in)`` and ``U_m`` ``(K*r, out)`` from the tiles."""
        k, r = self.num_components, self.rank
        ref = next(iter(self.buffers()), None)
        dev = ref.device if ref is not None else torch.device("cpu")
        dt = getattr(self, "in_w0", ref).dtype if ref is not None else torch.float32
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
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"K={self.num_components}, in: {side(self.plan_in)}; out: {side(self.plan_out)}")


# ----------------------------------------------------------------------------------- model level
@dataclass
class InferenceChoice:
    """What :func:`optimize_inference` did with one layer (times in seconds, ``None`` if not measured)."""

    name: str
    in_features: int
    out_features: int
    flops_ratio: float
    choice: str  # "compact" | "dense"
    compact_cost: float
    dense_cost: float
    compact_time: float | None = None
    dense_time: float | None = None


@dataclass
class InferenceReport:
    """Per-layer choices of :func:`optimize_inference`."""

    mode: str
    tokens: int
    layers: list[InferenceChoice] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "tokens": self.tokens, "layers": [asdict(x) for x in self.layers]}

    def __len__(self) -> int:
        return len(self.layers)

    def __str__(self) -> str:
        lines = [f"optimize_inference(mode={self.mode}, tokens={self.tokens}): {len(self.layers)} layers"]
        for c in self.layers:
            t = "" if c.compact_time is None else f" measured compact {c.compact_time * 1e6:.1f}us dense {c.dense_time * 1e6:.1f}us"
            lines.append(f"  {c.name:<40} {c.in_features:>5}->{c.out_features:<5} flops {c.flops_ratio:.3f} -> {c.choice}{t}")
        return "\n".join(lines)


def _median_time(fn: Any, x: Tensor, reps: int) -> float:
    with torch.no_grad():
        fn(x)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(x)
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _layer_inputs(model: nn.Module, names: list[str], sample_input: Any) -> dict[str, Tensor]:
    """Capture the input of each named layer for one forward of ``model`` on ``sample_input``."""
    captured: dict[str, Tensor] = {}
    handles = []
    for name in names:
        mod = model.get_submodule(name)
        handles.append(mod.register_forward_pre_hook(lambda m, args, _n=name: captured.setdefault(_n, args[0].detach())))
    try:
        with torch.no_grad():
            if isinstance(sample_input, dict):
                model(**sample_input)
            elif isinstance(sample_input, (tuple, list)):
                model(*sample_input)
            else:
                model(sample_input)
    finally:
        for h in handles:
            h.remove()
    return captured


@torch.no_grad()
def optimize_inference(
    model: nn.Module,
    mode: Literal["auto", "compact", "dense"] = "auto",
    sample_input: Any = None,
    tokens: int | None = None,
    reps: int = 20,
    **compact_kwargs: Any,
) -> InferenceReport:
    """Replace every frozen :class:`GBLRLinear` of ``model`` (in place) by a :class:`CompactGBLR` or a
    merged ``nn.Linear``.

    Args:
        model: any module tree (or a single frozen ``GBLRLinear``: then use the returned report and
            ``CompactGBLR.from_gblr``; a bare layer cannot be replaced in place).
        mode: ``"compact"``, ``"dense"`` (merge) or ``"auto"``: the faster of both, by a short timing
            (median of ``reps`` runs) when ``sample_input`` (model input) or ``tokens`` is given, else by
            the cost model at 256 tokens.
        sample_input: a model input (tensor, tuple of args or dict of kwargs) used to time each layer on
            its real input.
        tokens: time each layer on random ``(tokens, in_features)`` inputs instead.
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
    names = [n for n, m in gblr_layers(model) if m.is_frozen]
    measured = mode == "auto" and (sample_input is not None or tokens is not None)
    plan_tokens = tokens if tokens is not None else 256
    inputs = _layer_inputs(model, names, sample_input) if measured and sample_input is not None else {}
    if inputs:
        plan_tokens = max(1, int(np.median([v.numel() // v.shape[-1] for v in inputs.values()])))
    compact_kwargs.setdefault("tokens", plan_tokens)
    report = InferenceReport(mode=mode, tokens=plan_tokens)
    for name in names:
        layer = model.get_submodule(name)
        compact = CompactGBLR.from_gblr(layer, **compact_kwargs) if mode != "dense" else None
        dense = layer.to_linear() if mode != "compact" else None
        c_cost = compact.modelled_cost(plan_tokens) if compact is not None else math.nan
        d_cost = dense_cost(layer.in_features, layer.out_features, plan_tokens)
        choice = mode
        ct = dt = None
        if mode == "auto":
            assert compact is not None and dense is not None
            if measured:
                x = inputs.get(name)
                if x is None:
                    p = next(layer.parameters())
                    x = torch.randn(plan_tokens, layer.in_features, device=p.device, dtype=p.dtype)
                ct, dt = _median_time(compact, x, reps), _median_time(dense, x, reps)
                choice = "compact" if ct < dt else "dense"
            else:
                choice = "compact" if c_cost < d_cost else "dense"
        new = compact if choice == "compact" else dense
        assert new is not None
        new.train(layer.training)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
        report.layers.append(InferenceChoice(name=name, in_features=layer.in_features, out_features=layer.out_features,
                                             flops_ratio=layer.flops_ratio(), choice=choice, compact_cost=c_cost,
                                             dense_cost=d_cost, compact_time=ct, dense_time=dt))
    return report
