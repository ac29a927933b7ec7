"""Inference-only form of a frozen GBLR layer that only computes inside its windows (plain PyTorch).

:class:`CompactGBLR` runs one of the two exact layouts of :mod:`gsm_lightning.compact_plan` (tiles or blocks),
equal to the merged dense layer up to float summation order.  There is no Python loop over components, tiles or
chunks in ``forward`` (only over the <= ``max_buckets`` buckets per side, or the few blocks).  Identity
gathers/scatters are replaced by views, so a low-rank layer (all widths full, one tile per side) is two thin gemms
on the row-major input (no transpose), a side that is one full tile is one gemm, and block-diagonal /
block-low-rank structures with block-aligned tiles are clean batched block gemms.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.layer import GBLRLinear
from .compact_plan import (
    BlockPlan,
    SidePlan,
    best_side_plan,
    blocks_cost,
    padded_rank,
    plan_blocks,
    plan_cost,
)

__all__ = ["CompactGBLR", "CompactPath"]

CompactPath = Literal["auto", "tiles", "blocks"]


class CompactGBLR(nn.Module):
    """Inference-only form of a frozen :class:`GBLRLinear` that only computes inside the windows.

    Build it with :meth:`from_gblr`.  Shapes: input ``(*, in_features)``, output ``(*, out_features)`` (contiguous).
    Equal to the merged dense layer up to float summation order.  Weights are buffers (no training).

    Two execution paths (``self.path``), both exact:

    * ``"tiles"``: the tiled, bucketed bmm scheme of :mod:`gsm_lightning.compact_plan` (any structure; sides that are one
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
