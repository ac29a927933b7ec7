"""``GBLRLinear``: a linear layer whose weight is a Generalized Block-Low-Rank matrix.

    W = sum_k (m_out_k * U_k)(m_in_k * V_k)^T,   U_k: out x r,  V_k: in x r

with one Gaudi mask per side and component (see :mod:`gsm_lightning.masks`).
Plain PyTorch: usable without Lightning.

Conventions: ``widths`` and ``locations`` are ``(2, K)`` fractions in [0, 1];
row 0 is the input side, row 1 the output side (as in the reference code).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .align import align_structure
from .flops import StructuredCost, grid_widths, layers_flops, project_widths_to_budget, structure_flops
from .masks import boxcar_mask, gaudi_mask, to_grid
from .split_product import SideSplit, side_split, split_macs, split_product
from .whitening import InputStats, right_multiply, whitened_low_rank
from .whitening import input_factor as as_input_factor
from .windows import WindowPlan, window_margin, window_plan, windowed_product

__all__ = ["GBLRLinear", "gblr_layers", "set_frozen_route"]

WidthInit = Literal["splr", "full"] | float
LocationInit = Literal["zero", "uniform", "random", "tiled"]
ForwardMode = Literal["auto", "lowrank", "dense"]

_WIDTH_INITS = ("splr", "full")
_LOCATION_INITS = ("zero", "uniform", "random", "tiled")
_FORWARD_MODES = ("auto", "lowrank", "dense")

FrozenRoute = Callable[["GBLRLinear", Tensor], "Tensor | None"]
_frozen_route: FrozenRoute | None = None


def set_frozen_route(route: FrozenRoute | None) -> FrozenRoute | None:
    """Install ``route(layer, x)``, called by the eager forward of every frozen layer: a tensor it returns is
    the layer's output, ``None`` lets the layer compute as usual.  Returns the previous route.

    :mod:`gsm_lightning.flop_count` installs one that sends the product through its counted operator while a
    ``FlopCounterMode`` is active; the layer itself knows nothing about FLOP counting.  The route is not taken
    under ``torch.compile``/``torch.export``."""
    global _frozen_route
    previous, _frozen_route = _frozen_route, route
    return previous


class GBLRLinear(StructuredCost, nn.Module):
    """Linear layer ``y = x W^T + b`` with a learnable GBLR weight.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: learn an additive bias.
        rank_per_component: rank ``r`` of each component (1 in the paper).
        num_components: number of components ``K``; default ``min(in, out) // r``.
        sigma: Gaussian bandwidth of the masks; ``None``/``inf`` = pure Dirichlet (hard boxcar on the grid).
        width_init: ``"splr"`` (equal cost to dense), ``"full"`` (all widths 1) or a float in (0, 1].
        location_init: ``"zero"``, ``"uniform"`` (evenly spaced), ``"random"`` or ``"tiled"``: a block-low-rank
            start (Monarch's layout up to a row permutation).  The matrix is cut into a ``b x b`` grid of tiles,
            ``b = round(1 / width_init)``, at most ``min(in, out)`` (a numeric ``width_init`` is required);
            component ``k`` covers tile ``k mod b^2`` exactly (its widths are the tile's grid size), and the
            factors are each tile's truncated SVD of the random dense matrix (the best approximation of it in
            that layout).  With ``K = min(in, out)`` components the layer costs ``min(in, out) * (in + out) / b``
            (exactly when ``b`` divides both sides): ``2 / b`` of dense when square, Monarch's FLOPs with
            ``nblocks = b``.
        init_std: std of the trunc-normal dense matrix whose SVD initialises the factors: a float (the
            paper's 0.02), or ``"fan_in"`` for ``1 / sqrt(in_features)`` (LeCun-normal; what ``GSMModule`` uses
            for a random init with its budget learner: a factorised layer started at the paper's small scale
            trains much worse, see BENCHMARKS.md).
        forward_mode: ``"auto"`` picks the cheapest of masked low-rank, windowed low-rank (below) and materialised
            dense per call; ``"lowrank"`` / ``"dense"`` force one of the two full products.
        window_tol: in ``"auto"`` mode, large layers compute each component only on the tiles its masks reach
            (:mod:`gsm_lightning.core.windows`): mask values and their width/location derivatives (per grid step)
            below ``window_tol`` outside a component's window are taken as 0 (frozen layers: exact, their boxcars
            have no tails).  ``None`` always computes every component over the full width.
        window_tile: tile size (positions) of the windowed product; ``None``: per side, 64 below 2048 features and
            128 from there (the faster of 64, 128 and 256 on the P1 shapes, ``benchmarks/bench_phase1.py``).

    Shapes: input ``(*, in_features)``, output ``(*, out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        rank_per_component: int = 1,
        num_components: int | None = None,
        sigma: float | None = None,
        width_init: WidthInit = "splr",
        location_init: LocationInit = "zero",
        init_std: float | Literal["fan_in"] = 0.02,
        forward_mode: ForwardMode = "auto",
        window_tol: float | None = 1e-5,
        window_tile: int | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for what, v in (("in_features", in_features), ("out_features", out_features),
                        ("rank_per_component", rank_per_component), ("num_components", num_components)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (numbers.Real, Tensor)) or int(v) != v):
                raise ValueError(f"{what} must be an integer, got {v!r} (sizes are never rounded)")
        if int(in_features) < 1 or int(out_features) < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        r = int(rank_per_component)
        if r < 1 or r > min(in_features, out_features):
            raise ValueError(
                f"rank_per_component must be in [1, min(in_features, out_features)] = [1, {min(in_features, out_features)}], got {rank_per_component}"
            )
        k = min(in_features, out_features) // r if num_components is None else int(num_components)
        if k < 0:
            raise ValueError(f"num_components must be >= 0, got {num_components}")
        if not (isinstance(width_init, (int, float)) and not isinstance(width_init, bool)) and width_init not in _WIDTH_INITS:
            raise ValueError(f"unknown width_init {width_init!r}; expected one of {_WIDTH_INITS} or a float in (0, 1]")
        if isinstance(width_init, (int, float)) and not 0 < float(width_init) <= 1:
            raise ValueError(f"a numeric width_init must be in (0, 1], got {width_init}")
        if location_init not in _LOCATION_INITS:
            raise ValueError(f"unknown location_init {location_init!r}; expected one of {_LOCATION_INITS}")
        if location_init == "tiled" and not (isinstance(width_init, (int, float)) and not isinstance(width_init, bool)):
            raise ValueError(f"location_init='tiled' needs a numeric width_init, the tile width 1/b of a b x b grid "
                             f"(e.g. 0.25 for 4 x 4 tiles), got width_init={width_init!r}")
        if forward_mode not in _FORWARD_MODES:
            raise ValueError(f"unknown forward_mode {forward_mode!r}; expected one of {_FORWARD_MODES}")
        if window_tol is not None and (isinstance(window_tol, bool) or not isinstance(window_tol, numbers.Real)
                                       or not 0 < float(window_tol) < 1):
            raise ValueError(f"window_tol must be a number in (0, 1) or None (no windowed product), got {window_tol!r}")
        if window_tile is not None and (isinstance(window_tile, bool) or not isinstance(window_tile, numbers.Integral)
                                        or int(window_tile) < 1):
            raise ValueError(f"window_tile must be an integer >= 1 or None (by side size), got {window_tile!r}")
        if init_std == "fan_in":
            init_std = 1.0 / math.sqrt(int(in_features))
        if isinstance(init_std, bool) or not isinstance(init_std, numbers.Real) or not init_std > 0:
            raise ValueError(f"init_std must be a number > 0 or 'fan_in' (1/sqrt(in_features)), got {init_std!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.rank_per_component = r
        self.width_init = width_init
        self.location_init = location_init
        self.init_std = float(init_std)
        self.forward_mode = forward_mode
        self.window_tol = None if window_tol is None else float(window_tol)
        self.window_tile = None if window_tile is None else int(window_tile)
        self.weight_in = nn.Parameter(torch.empty(k, r, self.in_features, **factory))
        self.weight_out = nn.Parameter(torch.empty(k, r, self.out_features, **factory))
        self.widths = nn.Parameter(torch.empty(2, k, device=device, dtype=torch.float32))
        self.locations = nn.Parameter(torch.empty(2, k, device=device, dtype=torch.float32))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("sigma", torch.tensor(math.inf, device=device))
        self.register_buffer("frozen", torch.tensor(False, device=device))
        self._frozen_flag = False
        self.set_sigma(sigma)
        self._mask_cache: tuple[tuple, tuple[Tensor, Tensor]] | None = None
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @property
    def num_components(self) -> int:
        return self.weight_in.shape[0]

    # Python mirror of the ``frozen`` buffer (which stays the checkpointed truth), kept in sync wherever the
    # buffer is written, so that reading the flag needs no device sync and no graph break under torch.compile.
    # ``None`` (the class default) only for a layer pickled before the mirror existed: read from the buffer once.
    _frozen_flag: bool | None = None

    @property
    def is_frozen(self) -> bool:
        flag = self._frozen_flag
        if flag is None:
            flag = self._frozen_flag = bool(self.frozen)
        return flag

    def reset_parameters(self) -> None:
        """Random init (SVD of a trunc-normal dense matrix) and ``width_init``/``location_init`` structure."""
        with torch.no_grad():
            dense = torch.empty(self.out_features, self.in_features, device=self.weight_in.device, dtype=torch.float32)
            nn.init.trunc_normal_(dense, std=self.init_std, a=-2 * self.init_std, b=2 * self.init_std)
            self._set_factors_from_dense(dense)
            self.widths.copy_(self._initial_widths())
            self.locations.copy_(self._initial_locations())
            if self.location_init == "tiled":
                self._set_tiled(dense)
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features)
                nn.init.uniform_(self.bias, -bound, bound)
            self._set_frozen(False)
        self.invalidate_cache()

    def _set_factors_from_dense(self, dense: Tensor) -> None:
        """Split ``dense`` (out x in) by SVD into the K rank-r components, largest singular values first.
        Components beyond the matrix rank get small random factors."""
        k, r = self.num_components, self.rank_per_component
        u, s, vh = torch.linalg.svd(dense.float(), full_matrices=False)
        n_sv = min(k * r, s.numel())
        sq = s[:n_sv].sqrt()
        w_out = torch.empty(k * r, self.out_features, device=dense.device)
        w_in = torch.empty(k * r, self.in_features, device=dense.device)
        w_out[:n_sv] = (u[:, :n_sv] * sq).t()
        w_in[:n_sv] = sq[:, None] * vh[:n_sv]
        if n_sv < k * r:
            std = math.sqrt(self.init_std)
            nn.init.trunc_normal_(w_out[n_sv:], std=std * 0.1, a=-0.2 * std, b=0.2 * std)
            nn.init.trunc_normal_(w_in[n_sv:], std=std * 0.1, a=-0.2 * std, b=0.2 * std)
        self.weight_out.copy_(w_out.view(k, r, self.out_features))
        self.weight_in.copy_(w_in.view(k, r, self.in_features))

    def _tile_grid(self) -> tuple[int, Tensor, Tensor]:
        """``(b, edges_in, edges_out)`` of the ``location_init="tiled"`` layout: ``b = round(1 / width_init)`` tiles per
        side (at most the side's size), tile ``i`` of a side of ``n`` covering ``[edges[i], edges[i + 1])``."""
        b = max(1, round(1.0 / float(self.width_init)))
        b = min(b, self.in_features, self.out_features)
        return (b, torch.div(torch.arange(b + 1) * self.in_features, b, rounding_mode="floor"),
                torch.div(torch.arange(b + 1) * self.out_features, b, rounding_mode="floor"))

    def _set_tiled(self, dense: Tensor) -> None:
        """Widths, locations and in-window factors of the tiled (block-low-rank) start: component ``k`` on tile
        ``k mod b^2`` (row-major: output block ``t // b``, input block ``t % b``); each tile's components take its
        truncated SVD of ``dense`` (factors outside a component's window keep their full-matrix SVD values)."""
        k, r = self.num_components, self.rank_per_component
        if k == 0:
            return
        b, e_in, e_out = self._tile_grid()
        tile = torch.arange(k) % (b * b)
        rows, cols = tile // b, tile % b
        n_in, n_out = self.in_features, self.out_features
        dev = self.widths.device
        self.widths.copy_(torch.stack([(e_in[cols + 1] - e_in[cols]) / n_in,
                                       (e_out[rows + 1] - e_out[rows]) / n_out]).to(dev))
        self.locations.copy_(torch.stack([e_in[cols] / n_in, e_out[rows] / n_out]).to(dev))
        for t in range(min(k, b * b)):  # init only: at most b^2 tiles
            comps = torch.nonzero(tile == t).flatten().to(dev)
            i, j = t // b, t % b
            o0, o1, i0, i1 = int(e_out[i]), int(e_out[i + 1]), int(e_in[j]), int(e_in[j + 1])
            u, s, vh = torch.linalg.svd(dense[o0:o1, i0:i1].float(), full_matrices=False)
            n_sv = min(comps.numel() * r, s.numel())
            sq = s[:n_sv].sqrt()
            w_out = self.weight_out[comps].reshape(-1, n_out)  # copies (advanced indexing)
            w_in = self.weight_in[comps].reshape(-1, n_in)
            w_out[:n_sv, o0:o1] = (u[:, :n_sv] * sq).t().to(w_out.dtype)
            w_in[:n_sv, i0:i1] = (sq[:, None] * vh[:n_sv]).to(w_in.dtype)
            self.weight_out[comps] = w_out.view(-1, r, n_out)
            self.weight_in[comps] = w_in.view(-1, r, n_in)

    def _initial_widths(self) -> Tensor:
        k, r, n_in, n_out = self.num_components, self.rank_per_component, self.in_features, self.out_features
        widths = torch.ones(2, k, device=self.widths.device)
        if isinstance(self.width_init, (int, float)):
            widths.fill_(float(self.width_init))
        elif self.width_init == "splr" and k > 0:
            ratio = n_in * n_out / (k * r * (n_in + n_out))  # dense cost / full-width GBLR cost
            if ratio < 1:
                # Reference: the first int(0.5 ratio K) components at full width, the rest at
                # 0.5 ratio / (1 - 0.5 ratio).  Solving for the remaining width instead makes the
                # cost exactly ``in * out`` also when 0.5 ratio K is not an integer (the reference
                # truncation can undershoot by more than one grid step per component).
                n_full = int(0.5 * ratio * k)
                rest = (ratio * k - n_full) / (k - n_full)
                # Floored to the grid on each side, so the initial cost never exceeds dense (a ratio <= 1).
                widths[0, n_full:] = math.floor(rest * n_in + 1e-6) / n_in
                widths[1, n_full:] = math.floor(rest * n_out + 1e-6) / n_out
        return widths

    def _initial_locations(self) -> Tensor:
        k = self.num_components
        if self.location_init == "uniform":
            loc = torch.arange(k, device=self.locations.device, dtype=torch.float32) / max(k, 1)
            return loc.expand(2, k).clone()
        if self.location_init == "random":
            return torch.rand(2, k, device=self.locations.device)
        return torch.zeros(2, k, device=self.locations.device)

    def set_sigma(self, sigma: float | None) -> None:
        """Set the Gaussian bandwidth of the masks (``None`` or ``inf`` for pure Dirichlet)."""
        value = math.inf if sigma is None else float(sigma)
        if not value > 0:
            raise ValueError(f"sigma must be > 0 (or None/inf for a pure Dirichlet mask), got {sigma}")
        self.sigma.fill_(value)

    def _apply(self, fn: Any, recurse: bool = True) -> GBLRLinear:
        """Module conversions (``.to(dtype)``, ``.half()``, Lightning ``bf16-true``) convert the factors
        and bias but keep widths, locations and sigma in float32 (float64 is kept): in 16-bit floats the
        grid ``k / n`` is not representable for ``n >= 256`` (bfloat16) and a proximal shrink of
        ``lambda * lr`` (~1e-4) would round away, so the structure could neither sit on the grid nor shrink.
        The original float32 values are restored exactly (on the new device)."""
        saved = {name: getattr(self, name).detach().clone() for name in ("widths", "locations", "sigma")}
        super()._apply(fn, recurse)
        restored = False
        for name, old in saved.items():
            t = getattr(self, name)
            if t.dtype != old.dtype and t.dtype not in (torch.float32, torch.float64):
                t.data = old.to(device=t.device)
                if t.grad is not None:
                    t.grad = t.grad.to(old.dtype)
                restored = True
        if restored:
            self.invalidate_cache()
        return self

    # ----------------------------------------------------------------- masks
    def invalidate_cache(self) -> None:
        """Drop cached masks (done automatically when widths, locations or sigma change in place)."""
        self._mask_cache = None
        self._live_cache = None
        self._window_cache = None
        self._split_cache = None
        self._prepared_masks = None

    # class defaults (also for a layer pickled before these existed)
    _window_cache: tuple[tuple, WindowPlan | None] | None = None
    window_tol: float | None = 1e-5
    window_tile: int | None = None
    # below this many multiply-adds of the full product the windowed one is not tried: its host read of the
    # structure and its per-tile calls cost more than it saves (one training step on 1 thread, ratio 0.3: slower
    # at 147M, 96x384 and 3200 tokens; faster at 226M, 384x384 and 768 tokens, and at 566M, 384x1536)
    window_min_macs: int = 200_000_000
    # the windowed product is taken when its multiply-adds are at most this fraction of the full product's
    window_max_fraction: float = 0.7

    # Set by a probe that reads the gradients of the masked factors (Regrowth): each forward that runs the full
    # product (every row of the live components' masked factors used over its whole side) then leaves
    # ``(live index, v, u)`` in ``_last_factors`` for the probe's forward hook to take; other forwards leave None.
    keep_factors: bool = False
    _last_factors: tuple[Tensor | None, Tensor, Tensor] | None = None

    # ``None`` (the class default) also for a layer pickled before the cache existed.
    _live_cache: tuple[tuple, Tensor | None] | None = None
    _split_cache: tuple[tuple, SideSplit | None] | None = None
    # masks with their graph, computed for the next forward by core.mask_batch.prepare_masks (used once)
    _prepared_masks: tuple[tuple, Tensor | None, Tensor, Tensor] | None = None

    def live_components(self) -> Tensor | None:
        """Indices of the components not empty on both sides (grid-rounded widths), or ``None`` when every component
        is (and under ``torch.compile``, frozen or not).

        A component whose two widths round to 0 has both masks exactly 0 (the Dirichlet amplitude is proportional to
        the width, whatever sigma), so it adds nothing to the output, and every gradient it receives is 0 too: its
        factors are masked, the derivative of a mask at width 0 is multiplied by the other side's zero mask, and a
        location moves nothing at width 0.  So it can be left out of the computation exactly (up to float
        summation order), and it never comes back by itself: the budget learner cuts components to 0 on both sides
        in phase 1 (on the recovery teachers, 94 of 128 once the budget is reached), and they then cost nothing.
        One host read per change of the widths (the result is cached on their version)."""
        if torch.compiler.is_compiling() or self.is_frozen:
            return None
        key = self._live_key()
        cache = self._live_cache
        if cache is not None and cache[0] == key:
            return cache[1]
        with torch.no_grad():
            live = (to_grid(self.widths[0], self.in_features) > 0) | (to_grid(self.widths[1], self.out_features) > 0)
            index = None if bool(live.all()) else live.nonzero().flatten()
        self._live_cache = (key, index)
        return index

    def _live_key(self) -> tuple:
        """What :meth:`live_components`' cached index depends on.  An index made under inference_mode is an inference
        tensor that autograd cannot save: not reused outside it."""
        return (torch.is_inference_mode_enabled(), self.widths._version, self.widths.data_ptr(), self.widths.device,
                self.num_components)

    def _live_masked_factors(self) -> tuple[Tensor, Tensor]:
        """:meth:`masked_factors` restricted to :meth:`live_components` (all of them when that is ``None``): what
        the forward multiplies by.  Gradients reach the full parameters through the index (0 for the others).
        Masks made for this forward by :func:`~gsm_lightning.core.mask_batch.prepare_masks` are used (once) when
        the structure has not changed since."""
        index = self.live_components()
        prepared, self._prepared_masks = self._prepared_masks, None
        if (prepared is not None and torch.is_grad_enabled() and prepared[1] is index
                and prepared[0] == self._cache_key()):
            m_in, m_out = prepared[2], prepared[3]
        elif index is None:
            return self.masked_factors()
        elif torch.is_grad_enabled() and (self.widths.requires_grad or self.locations.requires_grad):
            # only the live components' masks (the masks' cost is K FFTs per side)
            self._check_finite()
            _, widths, locations = self._live_structure()
            sigma, dtype = float(self.sigma), self.weight_in.dtype
            m_in = gaudi_mask(widths[0], locations[0], self.in_features, sigma).to(dtype)
            m_out = gaudi_mask(widths[1], locations[1], self.out_features, sigma).to(dtype)
        else:  # the cached masks of every component, then the live rows
            m_in, m_out = (m.index_select(0, index) for m in self.masks())
        return self._apply_masks(m_in, m_out, index)

    def _live_structure(self) -> tuple[Tensor | None, Tensor, Tensor]:
        """(:meth:`live_components`, the widths and locations of those components), with their graph."""
        index = self.live_components()
        if index is None:
            return None, self.widths, self.locations
        return index, self.widths.index_select(1, index), self.locations.index_select(1, index)

    def _apply_masks(self, m_in: Tensor, m_out: Tensor, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Masked factors ``(rows, in)`` and ``(rows, out)`` of the components ``index`` (all when ``None``)."""
        w_in = self.weight_in if index is None else self.weight_in.index_select(0, index)
        w_out = self.weight_out if index is None else self.weight_out.index_select(0, index)
        rows = w_in.shape[0] * self.rank_per_component
        return ((w_in * m_in.unsqueeze(1)).reshape(rows, self.in_features),
                (w_out * m_out.unsqueeze(1)).reshape(rows, self.out_features))

    def _cache_key(self) -> tuple:
        # Masks cached under torch.inference_mode are inference tensors that autograd cannot save,
        # so they must not be reused outside it (e.g. a validation loop followed by training).
        return (
            torch.is_inference_mode_enabled(),
            self.widths._version,
            self.locations._version,
            self.sigma._version,
            self.frozen._version,
            self.num_components,
            self.widths.data_ptr(),
            self.locations.data_ptr(),
            self.weight_in.device,
            self.weight_in.dtype,
        )

    def masks(self) -> tuple[Tensor, Tensor]:
        """Input masks ``(K, in)`` and output masks ``(K, out)`` in the weights' dtype.

        Frozen layers use exact integer boxcars; otherwise Gaudi masks with straight-through
        rounding.  Masks are cached when no gradient to the structure is needed (in eager mode)."""
        if torch.compiler.is_compiling():
            return self._traced_masks()
        needs_grad = (
            not self.is_frozen
            and torch.is_grad_enabled()
            and (self.widths.requires_grad or self.locations.requires_grad)
        )
        if not needs_grad and self._mask_cache is not None and self._mask_cache[0] == self._cache_key():
            return self._mask_cache[1]
        dtype = self.weight_in.dtype
        self._check_finite()
        if self.is_frozen:
            m_in = boxcar_mask(self.widths[0], self.locations[0], self.in_features, dtype)
            m_out = boxcar_mask(self.widths[1], self.locations[1], self.out_features, dtype)
        else:
            sigma = float(self.sigma)
            m_in = gaudi_mask(self.widths[0], self.locations[0], self.in_features, sigma).to(dtype)
            m_out = gaudi_mask(self.widths[1], self.locations[1], self.out_features, sigma).to(dtype)
        if not needs_grad:
            m_in, m_out = m_in.detach(), m_out.detach()
            self._mask_cache = (self._cache_key(), (m_in, m_out))
        return m_in, m_out

    def _traced_masks(self) -> tuple[Tensor, Tensor]:
        """:meth:`masks` under ``torch.compile``/``torch.export``: the same masks, traced without graph breaks.
        No cache (the graph recomputes them), no finiteness check (it would need the values on the host) and
        sigma read as a tensor, so that a new sigma (annealing) needs no recompilation."""
        dtype = self.weight_in.dtype
        if self.is_frozen:
            m_in = boxcar_mask(self.widths[0], self.locations[0], self.in_features, dtype)
            m_out = boxcar_mask(self.widths[1], self.locations[1], self.out_features, dtype)
            return m_in, m_out
        m_in = gaudi_mask(self.widths[0], self.locations[0], self.in_features, self.sigma).to(dtype)
        m_out = gaudi_mask(self.widths[1], self.locations[1], self.out_features, self.sigma).to(dtype)
        if not (torch.is_grad_enabled() and (self.widths.requires_grad or self.locations.requires_grad)):
            m_in, m_out = m_in.detach(), m_out.detach()
        return m_in, m_out

    def _check_finite(self) -> None:
        """Fail fast, naming the layer (its qualified name when set by ``gsmify``), on NaN/inf structure."""
        bad = []
        for what, t in (("widths", self.widths), ("locations", self.locations)):
            finite = torch.isfinite(t.detach())
            if not bool(finite.all()):
                sides = [side for side, row in zip(("input", "output"), finite) if not bool(row.all())]
                comps = sorted({int(c) for c in (~finite).nonzero()[:, 1].tolist()})
                bad.append(f"{what} ({'/'.join(sides)} side, components {comps[:8]}{' ...' if len(comps) > 8 else ''})")
        if bad:
            name = getattr(self, "_gsm_name", None) or "GBLRLinear"
            raise FloatingPointError(
                f"non-finite {' and '.join(bad)} in layer '{name}' ({self.in_features}->{self.out_features}); "
                "a learning rate too high (of the weights or of the structure) or a NaN in the loss or the data "
                "makes the structure non-finite"
            )

    def masked_factors(self) -> tuple[Tensor, Tensor]:
        """Masked factors ``V_m`` ``(K*r, in)`` and ``U_m`` ``(K*r, out)``."""
        return self._apply_masks(*self.masks())

    # --------------------------------------------------------------- forward
    def _use_dense(self, tokens: int, kr: int | None = None, plan: WindowPlan | None = None,
                   split: SideSplit | None = None) -> bool:
        if self.forward_mode != "auto":
            return self.forward_mode == "dense"
        kr = self.num_components * self.rank_per_component if kr is None else kr
        if plan is not None:
            per_token = plan.macs
        elif split is not None:
            per_token = split_macs(split, self.in_features, self.out_features)
        else:
            per_token = kr * (self.in_features + self.out_features)
        lowrank = tokens * per_token
        dense = kr * self.in_features * self.out_features + tokens * self.in_features * self.out_features
        return dense < lowrank

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"GBLRLinear expected input with last dimension {self.in_features}, got shape {tuple(x.shape)}")
        if self.is_frozen and _frozen_route is not None and not torch.compiler.is_compiling():
            routed = _frozen_route(self, x)  # see set_frozen_route (FLOP counting)
            if routed is not None:
                return routed
        v, u = self._live_masked_factors()
        tokens = x.numel() // self.in_features if self.in_features else 0
        plan = self._window_plan(tokens, v.shape[0])
        split = self._side_split() if plan is None and not self._small_product(tokens, v.shape[0]) else None
        dense = self._use_dense(tokens, v.shape[0], plan, split)
        if self.keep_factors:  # for a probe of this forward (Regrowth): the gradients of v and u are what it measures
            full = dense or (plan is None and split is None)
            self._last_factors = ((self.live_components(), v, u) if full and torch.is_grad_enabled()
                                  and not torch.compiler.is_compiling() else None)
        if dense:
            return F.linear(x, u.t() @ v, self.bias)
        if plan is not None:
            return windowed_product(x, v, u, plan, self.bias)
        if split is not None:
            return split_product(x, v, u, split, self.bias)
        return F.linear(F.linear(x, v), u.t(), self.bias)

    def _small_product(self, tokens: int, kr: int) -> bool:
        """A full product under ``window_min_macs``: the windowed and split products' host reads, index ops and
        per-tile calls cost more than they save there, so it runs as it is."""
        return tokens * kr * (self.in_features + self.out_features) < self.window_min_macs

    def _side_split(self) -> SideSplit | None:
        """The live components' rows by which of their sides are non-empty
        (:func:`~gsm_lightning.core.split_product.side_split`), or ``None`` when none is empty on one side only, or
        when the full product is the one to run: frozen, under ``torch.compile`` or autocast.  Cached with the live
        index (one host read per change of the widths)."""
        if (self.is_frozen or torch.compiler.is_compiling()
                or torch.is_autocast_enabled(self.weight_in.device.type)):
            return None
        index = self.live_components()
        key = (self._live_cache[0] if self._live_cache is not None else None,
               None if index is None else index.data_ptr())
        cache = self._split_cache
        if cache is not None and cache[0] == key:
            return cache[1]
        with torch.no_grad():
            widths = self.widths if index is None else self.widths.index_select(1, index)
            split = side_split(grid_widths(widths, self.in_features, self.out_features), self.rank_per_component)
        self._split_cache = (key, split)
        return split

    def _window_tiles(self) -> tuple[int, int]:
        if self.window_tile is not None:
            return self.window_tile, self.window_tile
        return tuple(64 if n < 2048 else 128 for n in (self.in_features, self.out_features))  # type: ignore[return-value]

    def _window_plan(self, tokens: int, kr: int) -> WindowPlan | None:
        """The tiles each (live) component meets (:func:`~gsm_lightning.core.windows.window_plan`), or ``None``
        when the full product is the one to run: not ``"auto"``, ``window_tol=None``, under ``torch.compile`` or
        autocast (the tiles' products keep one dtype), a product under ``window_min_macs``, or a plan that saves too little (``window_max_fraction``).  Cached on
        the structure's versions and sigma (one host read of the structure per change)."""
        if (self.forward_mode != "auto" or self.window_tol is None or torch.compiler.is_compiling()
                or torch.is_autocast_enabled(self.weight_in.device.type) or self._small_product(tokens, kr)
                or max(self.in_features, self.out_features) < 2 * min(tiles := self._window_tiles())):
            return None
        frozen = self.is_frozen
        sigma = math.inf if frozen else float(self.sigma)
        margins = (0, 0) if frozen else (window_margin(self.in_features, sigma, self.window_tol),
                                         window_margin(self.out_features, sigma, self.window_tol))
        if margins[0] >= self.in_features and margins[1] >= self.out_features:
            return None
        index = self.live_components()
        key = (torch.is_inference_mode_enabled(), self.widths._version, self.locations._version,
               self.widths.data_ptr(), self.locations.data_ptr(), self.num_components, frozen, margins,
               tiles, self.weight_in.device, None if index is None else index.data_ptr())
        cache = self._window_cache
        if cache is not None and cache[0] == key:
            return cache[1]
        with torch.no_grad():
            widths, locations = self.widths, self.locations
            if index is not None:
                widths, locations = widths.index_select(1, index), locations.index_select(1, index)
            grid = [(to_grid(widths[i], n), to_grid(locations[i], n) % n)
                    for i, n in enumerate((self.in_features, self.out_features))]
            plan = window_plan(torch.stack([grid[0][0], grid[1][0]]), torch.stack([grid[0][1], grid[1][1]]),
                               self.in_features, self.out_features, self.rank_per_component, margins,
                               tiles, device=self.weight_in.device)
        if plan.fraction > self.window_max_fraction:
            plan = None
        self._window_cache = (key, plan)
        return plan

    def to_dense(self) -> Tensor:
        """The weight ``W`` ``(out, in)`` as a dense matrix (differentiable)."""
        v, u = self.masked_factors()
        return u.t() @ v

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the merged dense weight (and bias)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight_in.device, dtype=self.weight_in.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.to_dense())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    # -------------------------------------------------------------- analysis
    def int_widths(self) -> Tensor:
        """Widths on the integer grid ``(2, K)`` (row 0 input, row 1 output)."""
        return grid_widths(self.widths, self.in_features, self.out_features)

    def int_locations(self) -> Tensor:
        """Locations on the integer grid ``(2, K)``, reduced modulo the side length."""
        n = torch.tensor([[self.in_features], [self.out_features]], device=self.locations.device)
        return torch.remainder(torch.round(self.locations.detach() * n).to(torch.int64), n)

    def active_components(self) -> Tensor:
        """Boolean ``(K,)``: both widths are at least one grid step."""
        w = self.int_widths()
        return (w[0] > 0) & (w[1] > 0)

    def effective_rank(self) -> int:
        """Upper bound on rank(W): active components times rank per component."""
        return int(self.active_components().sum()) * self.rank_per_component

    def flops(self) -> int:
        """Multiply-adds per token of the structured product (bias excluded).  Raises ``FloatingPointError``
        (naming the layer) on NaN/inf widths rather than counting them as zero."""
        self._check_finite()
        return structure_flops(self.int_widths(), self.in_features, self.out_features, self.rank_per_component)

    def structure(self, tensors: bool = False) -> dict[str, Any]:
        """The integer structure: shape, rank, widths and locations per component, frozen flag.

        The one per-layer record: a checkpoint's ``gsm_structure`` holds it as is, structure files
        (:func:`gsm_lightning.io.structure_io.layer_record`) and compact files (:mod:`gsm_lightning.io.export`)
        take their fields from it, and :meth:`restore_structure` reads it back.  ``tensors``: widths and
        locations ``(2, K)`` as int64 CPU tensors instead of nested lists."""
        widths, locations = self.int_widths().cpu(), self.int_locations().cpu()
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank_per_component": self.rank_per_component,
            "num_components": self.num_components,
            "frozen": self.is_frozen,
            "widths": widths if tensors else widths.tolist(),
            "locations": locations if tensors else locations.tolist(),
        }

    def extra_repr(self) -> str:
        sigma = float(self.sigma)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"rank_per_component={self.rank_per_component}, num_components={self.num_components}, "
            f"sigma={'inf' if math.isinf(sigma) else f'{sigma:g}'}, frozen={self.is_frozen}"
        )

    # ---------------------------------------------------------------- freeze
    def _resize(self, k: int) -> None:
        """Re-allocate all per-component parameters for ``k`` components (values undefined)."""
        r, dev, dt = self.rank_per_component, self.weight_in.device, self.weight_in.dtype
        self.weight_in = nn.Parameter(torch.empty(k, r, self.in_features, device=dev, dtype=dt))
        self.weight_out = nn.Parameter(torch.empty(k, r, self.out_features, device=dev, dtype=dt))
        self.widths = nn.Parameter(torch.empty(2, k, device=dev, dtype=torch.float32))
        self.locations = nn.Parameter(torch.empty(2, k, device=dev, dtype=torch.float32))
        self.invalidate_cache()

    def _set_frozen(self, frozen: bool) -> None:
        """The frozen state: the ``frozen`` buffer, its Python mirror, and structure gradients exactly when not frozen."""
        self.widths.requires_grad_(not frozen)
        self.locations.requires_grad_(not frozen)
        self.frozen.fill_(frozen)
        self._frozen_flag = frozen

    @torch.no_grad()
    def restore_structure(self, record: Mapping[str, Any]) -> GBLRLinear:
        """Give this layer the structure of ``record``: a :meth:`structure` dict (e.g. an entry of a checkpoint's
        ``gsm_structure``) or a structure-file layer record (which describes a frozen layer).

        The layer gets the record's number of components, its widths and locations on the grid and its frozen state
        (the ``frozen`` buffer and its mirror; ``widths``/``locations`` require grad exactly when not frozen).  The
        factors are not part of a structure: kept when the number of components is unchanged, zero otherwise (load
        the weights next, e.g. with ``load_state_dict``).  Parameters are replaced when the number of components
        changes, so rebuild optimizers afterwards.  Raises ``ValueError`` when the record's in/out features or rank
        per component differ from the layer's, or its widths/locations are not ``(2, K)``.  Returns ``self``."""
        name = getattr(self, "_gsm_name", None) or "GBLRLinear"
        shape = (int(record["in_features"]), int(record["out_features"]), int(record["rank_per_component"]))
        if shape != (self.in_features, self.out_features, self.rank_per_component):
            raise ValueError(f"structure record has in/out/rank {shape}, but layer '{name}' has "
                             f"{(self.in_features, self.out_features, self.rank_per_component)}")
        widths = torch.as_tensor(record["widths"], dtype=torch.float32).cpu()
        locations = torch.as_tensor(record["locations"], dtype=torch.float32).cpu()
        k = int(record.get("num_components", widths.shape[-1] if widths.dim() == 2 else -1))
        if tuple(widths.shape) != (2, k) or tuple(locations.shape) != (2, k):
            raise ValueError(f"structure record for layer '{name}' has widths {tuple(widths.shape)} and locations "
                             f"{tuple(locations.shape)}; expected (2, K) with K = {k} components")
        if k != self.num_components:
            self._resize(k)
            self.weight_in.zero_()
            self.weight_out.zero_()
        n = torch.tensor([[self.in_features], [self.out_features]], dtype=torch.float32)
        self.widths.copy_(widths / n)
        self.locations.copy_(locations / n)
        self._set_frozen(bool(record.get("frozen", True)))
        self.invalidate_cache()
        return self

    @torch.no_grad()
    def drop_empty_components(self) -> Tensor | None:
        """Drop the components whose two widths are 0 on the grid, of a layer still learning its structure.

        Such a component adds nothing to the output and gets exactly zero gradient (:meth:`live_components`), and no
        rule of this package widens a side of width 0, so it never comes back: dropping it leaves the layer's function
        and every gradient as they are, and saves its factors' share of the optimizer's update and of the forward's
        gathers.  Returns the indices of the components kept, or ``None`` when none is empty, or all are (the layer
        is left as it is).  The parameters are replaced when components are dropped, so update the optimizer after
        (``GSMModule`` does, with the kept rows' state), and the rule's per-component state (its
        ``drop_components``)."""
        if self.is_frozen:
            return None
        keep = self.live_components()
        if keep is None or keep.numel() == 0:
            return None
        w_in, w_out = self.weight_in[keep].clone(), self.weight_out[keep].clone()
        widths, locations = self.widths[:, keep].clone(), self.locations[:, keep].clone()
        self._resize(keep.numel())
        self.weight_in.copy_(w_in)
        self.weight_out.copy_(w_out)
        self.widths.copy_(widths)
        self.locations.copy_(locations)
        return keep

    @torch.no_grad()
    def freeze_structure(self, align: int = 1) -> GBLRLinear:
        """Switch to hard integer boxcars, drop inactive components, stop structure gradients.

        Widths and locations are snapped to the grid; the factors are zeroed outside their masks so
        the frozen layer is exactly the integer-boxcar GBLR matrix.  Returns ``self``.
        Note: parameters are replaced, so rebuild optimizers afterwards.

        Args:
            align: snap window starts and widths to multiples of ``gcd(side, align)`` (a tile-aligned
                structure, :func:`gsm_lightning.align.align_structure`: no side's total width rises, no
                component is dropped by it); 1 keeps the grid."""
        if self.is_frozen:
            return self
        self._check_finite()
        n = torch.tensor([[self.in_features], [self.out_features]], device=self.widths.device)
        w_int, l_int = self.int_widths(), self.int_locations()
        if align != 1:
            w_int, l_int = align_structure(w_int, l_int, self.in_features, self.out_features, align)
        keep = ((w_int[0] > 0) & (w_int[1] > 0)).nonzero().flatten()
        w_in, w_out = self.weight_in[keep].clone(), self.weight_out[keep].clone()
        widths = (w_int[:, keep].float() / n)
        locations = (l_int[:, keep].float() / n)
        self._resize(keep.numel())
        self.weight_in.copy_(w_in)
        self.weight_out.copy_(w_out)
        self.widths.copy_(widths)
        self.locations.copy_(locations)
        self._set_frozen(True)
        m_in, m_out = self.masks()
        self.weight_in.mul_(m_in.unsqueeze(1))
        self.weight_out.mul_(m_out.unsqueeze(1))
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """Rebuild the layer for the incoming structure (number of components, frozen flag) before
        loading, and refuse checkpoints of another shape with a clear error."""
        name = prefix.rstrip(".") or "GBLRLinear"
        w_in = state_dict.get(prefix + "weight_in")
        w_out = state_dict.get(prefix + "weight_out")
        if w_in is not None and w_out is not None:
            if w_in.dim() != 3 or w_out.dim() != 3:
                raise RuntimeError(f"checkpoint for GBLR layer '{name}' has factors of unexpected rank: {tuple(w_in.shape)}, {tuple(w_out.shape)}")
            got = (w_in.shape[1], w_in.shape[2], w_out.shape[2])
            want = (self.rank_per_component, self.in_features, self.out_features)
            if got != want:
                raise RuntimeError(
                    f"checkpoint for GBLR layer '{name}' has rank_per_component/in/out = {got}, but the layer is {want}: "
                    "the checkpoint belongs to another architecture"
                )
            if w_in.shape[0] != self.num_components:
                self._resize(w_in.shape[0])
            frozen = state_dict.get(prefix + "frozen")
            if frozen is not None:
                structure_grad = not bool(frozen)
                self.widths.requires_grad_(structure_grad)
                self.locations.requires_grad_(structure_grad)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._frozen_flag = bool(self.frozen)
        self.invalidate_cache()

    # ------------------------------------------------------------ builders
    @classmethod
    def _from_factors(
        cls,
        u: Tensor,
        v: Tensor,
        widths: Tensor,
        locations: Tensor,
        bias: Tensor | None = None,
        **kwargs: Any,
    ) -> GBLRLinear:
        """Build from full-length factors ``u`` ``(K, r, out)``, ``v`` ``(K, r, in)`` and integer
        widths/locations ``(2, K)``; the layer uses hard Dirichlet masks (sigma=None)."""
        k, r, n_out = u.shape
        n_in = v.shape[-1]
        kwargs.setdefault("sigma", None)
        layer = cls(n_in, n_out, bias=bias is not None, rank_per_component=r, num_components=k,
                    device=u.device, dtype=u.dtype, **kwargs)
        n = torch.tensor([[n_in], [n_out]], device=u.device, dtype=torch.float32)
        with torch.no_grad():
            layer.weight_out.copy_(u)
            layer.weight_in.copy_(v)
            layer.widths.copy_(widths.to(u.device).float() / n)
            layer.locations.copy_(locations.to(u.device).float() / n)
            if bias is not None:
                layer.bias.copy_(bias)
        layer.invalidate_cache()
        return layer

    @classmethod
    def from_low_rank(cls, u: Tensor, v: Tensor, bias: Tensor | None = None, **kwargs: Any) -> GBLRLinear:
        """Exact GBLR form of ``W = u @ v`` (``u``: out x rank, ``v``: rank x in): ``rank`` full-width components."""
        if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[0]:
            raise ValueError(f"expected u (out x rank) and v (rank x in), got {tuple(u.shape)} and {tuple(v.shape)}")
        rank = u.shape[1]
        widths = torch.tensor([[v.shape[1]], [u.shape[0]]]).expand(2, rank)
        return cls._from_factors(u.t().unsqueeze(1), v.unsqueeze(1), widths, torch.zeros(2, rank), bias, **kwargs)

    @classmethod
    def low_rank(cls, in_features: int, out_features: int, rank: int, bias: bool = True, **kwargs: Any) -> GBLRLinear:
        """A randomly initialised rank-``rank`` layer: ``rank`` full-width components, the rest absent."""
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in [1, {min(in_features, out_features)}], got {rank}")
        return cls(in_features, out_features, bias=bias, num_components=rank, width_init="full", **kwargs)

    @classmethod
    def from_blocks(
        cls,
        in_features: int,
        out_features: int,
        blocks: Sequence[tuple[int, int, Tensor]],
        rank: int | None = None,
        bias: Tensor | None = None,
        **kwargs: Any,
    ) -> GBLRLinear:
        """Exact GBLR form of a matrix made of dense blocks ``(row0, col0, block)`` (cyclic placement).

        Each block is split by SVD into ``rank`` (default: full, ``min`` of its shape) rank-1
        components whose boxcars cover exactly the block.  With ``rank`` below the block rank the
        block is truncated to its best rank-``rank`` approximation."""
        blocks = list(blocks)
        dtype = blocks[0][2].dtype if blocks else (bias.dtype if bias is not None else torch.float32)
        device = blocks[0][2].device if blocks else (bias.device if bias is not None else None)
        svd_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        us = [torch.zeros(0, out_features, device=device, dtype=svd_dtype)]
        vs = [torch.zeros(0, in_features, device=device, dtype=svd_dtype)]
        ws = [torch.zeros(2, 0, dtype=torch.int64)]
        ls = [torch.zeros(2, 0, dtype=torch.int64)]
        for row0, col0, blk in blocks:
            if blk.dim() != 2:
                raise ValueError(f"blocks must be 2-D matrices, got shape {tuple(blk.shape)}")
            bo, bi = blk.shape
            if bo > out_features or bi > in_features:
                raise ValueError(f"block of shape {(bo, bi)} does not fit a {out_features}x{in_features} matrix")
            rk = min(bo, bi) if rank is None else min(rank, bo, bi)
            ub, sb, vbh = torch.linalg.svd(blk.to(device=device, dtype=svd_dtype), full_matrices=False)
            sq = sb[:rk].sqrt()
            rows = (torch.arange(bo, device=device) + row0) % out_features
            cols = (torch.arange(bi, device=device) + col0) % in_features
            u = torch.zeros(rk, out_features, device=device, dtype=svd_dtype)
            v = torch.zeros(rk, in_features, device=device, dtype=svd_dtype)
            u[:, rows] = (ub[:, :rk] * sq).t()
            v[:, cols] = sq[:, None] * vbh[:rk]
            us.append(u)
            vs.append(v)
            ws.append(torch.tensor([[bi], [bo]]).expand(2, rk))
            ls.append(torch.tensor([[col0 % in_features], [row0 % out_features]]).expand(2, rk))
        u, v = torch.cat(us).unsqueeze(1), torch.cat(vs).unsqueeze(1)
        return cls._from_factors(u.to(dtype), v.to(dtype), torch.cat(ws, 1), torch.cat(ls, 1), bias, **kwargs)

    @classmethod
    def from_block_diagonal(cls, blocks: Sequence[Tensor], bias: Tensor | None = None, **kwargs: Any) -> GBLRLinear:
        """Exact GBLR form of ``torch.block_diag(*blocks)``."""
        placed, r0, c0 = [], 0, 0
        for blk in blocks:
            placed.append((r0, c0, blk))
            r0, c0 = r0 + blk.shape[0], c0 + blk.shape[1]
        return cls.from_blocks(c0, r0, placed, bias=bias, **kwargs)

    @classmethod
    def from_block_sparse(
        cls, dense: Tensor, block_size: tuple[int, int], block_mask: Tensor, bias: Tensor | None = None, **kwargs: Any
    ) -> GBLRLinear:
        """Exact GBLR form of ``dense`` restricted to the blocks where ``block_mask`` (grid of
        ``block_size`` tiles) is true; other blocks are zero."""
        return cls.from_block_low_rank(dense, block_size, rank=None, block_mask=block_mask, bias=bias, **kwargs)

    @classmethod
    def from_block_low_rank(
        cls,
        dense: Tensor,
        block_size: tuple[int, int],
        rank: int | None,
        block_mask: Tensor | None = None,
        bias: Tensor | None = None,
        **kwargs: Any,
    ) -> GBLRLinear:
        """GBLR form of ``dense`` cut into ``block_size`` tiles, each kept at rank ``rank`` (exact
        when every tile has rank <= ``rank``; Monarch matrices are of this form up to a row permutation)."""
        n_out, n_in = dense.shape
        bo, bi = block_size
        if n_out % bo or n_in % bi:
            raise ValueError(f"block_size {block_size} must divide the matrix shape {tuple(dense.shape)}")
        grid = (n_out // bo, n_in // bi)
        if block_mask is None:
            block_mask = torch.ones(grid, dtype=torch.bool)
        if tuple(block_mask.shape) != grid:
            raise ValueError(f"block_mask must have the block grid shape {grid}, got {tuple(block_mask.shape)}")
        blocks = [
            (i * bo, j * bi, dense[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi])
            for i, j in block_mask.nonzero().tolist()
        ]
        return cls.from_blocks(n_in, n_out, blocks, rank=rank, bias=bias, **kwargs)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        budget: float = 1.0,
        rank_per_component: int = 1,
        num_components: int | None = None,
        fit_steps: int = 300,
        fit_lr: float = 5e-3,
        structure_lr: float | None = None,
        transpose: bool | None = None,
        input_factor: InputStats | Tensor | None = None,
        **kwargs: Any,
    ) -> GBLRLinear:
        """Convert a pretrained dense layer (``nn.Linear`` or HF ``Conv1D``) at a FLOPs ``budget``.

        The SVD of the weight is split into rank-r components (widths 1, evenly spaced locations).
        If that costs more than ``budget * in * out`` multiply-adds, factors and masks are fitted for
        ``fit_steps`` AdamW steps to minimise ``||W_hat - W||_F^2 / ||W||_F^2`` with Dirichlet masks
        and straight-through rounding, projecting the widths onto the budget after every step.
        With a budget of at least the full SVD cost (always at ``budget=1.0`` when ``K r (in+out)
        <= in out``, and by convention at ``budget=1.0`` otherwise) the conversion is lossless.

        ``input_factor`` (calibrated conversion): the layer's input statistics
        (:class:`~gsm_lightning.core.calibration.InputStats`, from
        :func:`~gsm_lightning.core.calibration.collect_input_stats`) or a factor ``S`` with ``S S^T = E[x x^T]``
        (``(in, in)`` lower-triangular, or ``(in,)`` diagonal).  The fit then minimises the output error
        ``||(W_hat - W) S||_F^2 / ||W S||_F^2`` and starts from the better (in that error) of the whitened
        low-rank solution at the budget's FLOPs (SVD-LLM: the first ``n`` components at full width, an exact
        GBLR matrix) and the plain truncated SVD of the same cost; the spare components keep the next whitened
        (resp. plain) singular directions with output width 1 and input width 0 (inactive, so free of cost,
        but their input width has a gradient and can grow).  ``structure_lr`` defaults to ``2 / min(in, out)`` there
        (10x below the weight-space fit's).  The best iterate is kept, and the result falls back
        to the whitened low-rank start if it ends worse, so its output error is never above the whitened SVD's
        of the same FLOPs (rank ``floor(budget in out / (r (in + out)))``, at most ``K r``)."""
        if isinstance(budget, bool) or not 0 < budget <= 1:
            raise ValueError(f"budget must be in (0, 1] (fraction of the dense layer's FLOPs), got {budget}")
        if int(fit_steps) != fit_steps or fit_steps < 0:
            raise ValueError(f"fit_steps must be a non-negative integer, got {fit_steps}")
        weight = getattr(linear, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError(f"from_linear expects a linear layer with a 2-D weight (nn.Linear or HF Conv1D), got "
                             f"{type(linear).__name__} with weight shape {None if weight is None else tuple(weight.shape)}")
        weight = weight.detach()
        if transpose is None:
            transpose = type(linear).__name__ == "Conv1D"  # HF GPT-2 Conv1D stores (in, out)
        if transpose:
            weight = weight.t()
        n_out, n_in = weight.shape
        bias = getattr(linear, "bias", None)
        if "width_init" in kwargs:
            raise ValueError("width_init does not apply to from_linear/init='pretrained': widths start full and are "
                             "fitted to the budget")
        if kwargs.get("location_init") == "tiled":
            raise ValueError("location_init='tiled' is a random-init layout; from_linear/init='pretrained' fits the "
                             "structure to the weights (use 'uniform', 'zero' or 'random')")
        kwargs.setdefault("sigma", None)
        kwargs.setdefault("location_init", "uniform")
        # 16-bit factors cannot be fitted (AdamW steps and the relative error overflow or round away): fit in
        # float32 and convert the result to the layer's dtype at the end.
        out_dtype = weight.dtype
        fit_dtype = out_dtype if out_dtype in (torch.float32, torch.float64) else torch.float32
        weight = weight.to(fit_dtype)
        layer = cls(n_in, n_out, bias=bias is not None, rank_per_component=rank_per_component,
                    num_components=num_components, width_init="full", device=weight.device, dtype=fit_dtype, **kwargs)
        with torch.no_grad():
            layer._set_factors_from_dense(weight.float())
            if bias is not None:
                layer.bias.copy_(bias.detach())
        layer.invalidate_cache()
        factor = None if input_factor is None else as_input_factor(input_factor, n_in).to(weight.device)
        if factor is not None and budget < 1.0 and layer.flops() > budget * layer.dense_flops():
            layer._fit_calibrated(weight, factor, budget, fit_steps, fit_lr, structure_lr)
        elif budget < 1.0 and layer.flops() > budget * layer.dense_flops():
            svd_state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
            fit_error = layer.fit_to(weight, budget, steps=fit_steps, lr=fit_lr, structure_lr=structure_lr)
            # Fall back to the best equal-cost truncated SVD (a GBLR special case) if the fit is worse.
            n_full = min(layer.num_components,
                         int(budget * layer.dense_flops() // (layer.rank_per_component * (n_in + n_out))))
            with torch.no_grad():
                svd_state["widths"][:, n_full:] = 0.0
                trunc = cls(n_in, n_out, bias=bias is not None, rank_per_component=rank_per_component,
                            num_components=layer.num_components, device=weight.device, dtype=fit_dtype)
                trunc.load_state_dict(svd_state)
                w = weight.float()
                trunc_error = float((trunc.to_dense().float() - w).pow(2).sum() / w.pow(2).sum().clamp_min(1e-30))
            if n_full > 0 and trunc_error < fit_error:
                layer.load_state_dict(svd_state)
        return layer if fit_dtype == out_dtype else layer.to(out_dtype)

    def fit_to(
        self, weight: Tensor, budget: float, steps: int = 300, lr: float = 5e-3, structure_lr: float | None = None,
        input_factor: InputStats | Tensor | None = None,
    ) -> float:
        """Fit factors and structure to a dense ``weight`` (out x in) under a FLOPs ``budget``;
        returns the final relative squared error.

        With ``input_factor`` (input statistics or a factor ``S``, see :meth:`from_linear`) the loss is the relative
        output error ``||(W_hat - W) S||_F^2 / ||W S||_F^2``; the best iterate (the start included) is kept, and its
        error is returned."""
        if not 0 < budget <= 1:
            raise ValueError(f"budget must be in (0, 1], got {budget}")
        if input_factor is not None:
            factor = as_input_factor(input_factor, self.in_features)
            return self._fit_output(weight, factor, budget, steps, lr, structure_lr)
        target = weight.detach().float()
        budget_flops = budget * self.dense_flops()
        norm = target.pow(2).sum().clamp_min(1e-30)
        structure_lr = 20.0 / min(self.in_features, self.out_features) if structure_lr is None else structure_lr
        opt, sched = self._fit_optimizer(lr, structure_lr, steps)
        self._project_to_budget(budget_flops)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = (self.to_dense().float() - target).pow(2).sum() / norm
            loss.backward()
            opt.step()
            sched.step()
            self._project_to_budget(budget_flops)
        with torch.no_grad():
            return float((self.to_dense().float() - target).pow(2).sum() / norm)

    def _fit_optimizer(self, lr: float, structure_lr: float, steps: int) -> tuple[torch.optim.Optimizer, Any]:
        """AdamW (betas (0, 0.999), no decay) over factors and structure, with a linear decay to 1 % over ``steps``:
        the optimizer of both fits of :meth:`fit_to`."""
        opt = torch.optim.AdamW(
            [
                {"params": [self.weight_in, self.weight_out], "lr": lr, "weight_decay": 0.0},
                {"params": [self.widths, self.locations], "lr": structure_lr, "weight_decay": 0.0},
            ],
            betas=(0.0, 0.999),
        )
        return opt, torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.01, total_iters=max(steps, 1))

    def _fit_output(
        self, weight: Tensor, factor: Tensor, budget: float, steps: int, lr: float, structure_lr: float | None
    ) -> float:
        """:meth:`fit_to` under the output error ``||(W_hat - W) S||^2 / ||W S||^2``, keeping the best iterate."""
        dtype = self.weight_in.dtype if self.weight_in.dtype in (torch.float32, torch.float64) else torch.float32
        target = weight.detach().to(dtype)
        s = factor.to(device=target.device, dtype=dtype)
        ws = right_multiply(target, s)
        norm = ws.pow(2).sum().clamp_min(1e-30)
        factored = s.dim() == 2 and self.num_components * self.rank_per_component < self.out_features

        def loss() -> Tensor:
            v, u = self.masked_factors()
            v, u = v.to(dtype), u.to(dtype)
            approx = u.t() @ (v @ s) if factored else right_multiply(u.t() @ v, s)  # the cheaper association
            return (approx - ws).pow(2).sum() / norm

        budget_flops = budget * self.dense_flops()
        # 10x below the weight-space default: from the (near-optimal) whitened start, 20/n moves ~20 grid steps per
        # step and wrecks it; 1-2/n let the structure improve on block-structured targets (tests/test_calibration.py)
        structure_lr = 2.0 / min(self.in_features, self.out_features) if structure_lr is None else structure_lr
        opt, sched = self._fit_optimizer(lr, structure_lr, steps)
        self._project_to_budget(budget_flops)
        params = (self.weight_in, self.weight_out, self.widths, self.locations)
        best, best_state = math.inf, [p.detach().clone() for p in params]
        for step in range(steps + 1):
            opt.zero_grad(set_to_none=True)
            with torch.set_grad_enabled(step < steps):
                value = loss()
            current = float(value.detach())
            if current < best:
                best, best_state = current, [p.detach().clone() for p in params]
            if step == steps:
                break
            value.backward()
            opt.step()
            sched.step()
            self._project_to_budget(budget_flops)
        with torch.no_grad():
            for p, b in zip(params, best_state):
                p.copy_(b)
        self.invalidate_cache()
        return best

    def _fit_calibrated(
        self, weight: Tensor, factor: Tensor, budget: float, steps: int, lr: float, structure_lr: float | None
    ) -> float:
        """The calibrated conversion of :meth:`from_linear` (the factors hold the plain SVD split on entry); returns
        the relative output error (not squared) of the result."""
        k, r, n_in, n_out = self.num_components, self.rank_per_component, self.in_features, self.out_features
        n_full = min(k, int(budget * self.dense_flops() // (r * (n_in + n_out))))
        m = min(k * r, n_in, n_out)
        params = (self.weight_in, self.weight_out, self.widths, self.locations)
        w64 = weight.detach().to(torch.float64)
        s64 = factor.to(device=w64.device, dtype=torch.float64)
        ws = right_multiply(w64, s64)
        ws_norm = float(ws.norm().clamp_min(1e-300))

        def output_error() -> float:
            with torch.no_grad():
                return float((right_multiply(self.to_dense().detach().to(torch.float64), s64) - ws).norm()) / ws_norm

        with torch.no_grad():
            plain = (self.weight_in.detach().clone(), self.weight_out.detach().clone())
            u, v = whitened_low_rank(weight, s64, m)  # (out, m), (in, m), balanced
            w_in, w_out = plain[0].reshape(k * r, n_in).clone(), plain[1].reshape(k * r, n_out).clone()
            w_in[:m], w_out[:m] = v.t().to(w_in.dtype), u.t().to(w_out.dtype)
            whitened = (w_in.view(k, r, n_in), w_out.view(k, r, n_out))
            widths = torch.zeros_like(self.widths)
            widths[1] = 1.0  # spare components: output width 1, input width 0 (inactive, free to grow)
            widths[:, :n_full] = 1.0
        starts = []
        for w_in, w_out in (whitened, plain):
            with torch.no_grad():
                self.weight_in.copy_(w_in)
                self.weight_out.copy_(w_out)
                self.widths.copy_(widths)
            self.invalidate_cache()
            starts.append((output_error(), [p.detach().clone() for p in params]))

        def load(state: list[Tensor]) -> None:
            with torch.no_grad():
                for p, value in zip(params, state):
                    p.copy_(value)
            self.invalidate_cache()

        reference_error, reference_state = starts[0]  # the whitened low-rank solution at the budget's FLOPs
        load(min(starts, key=lambda e: e[0])[1])
        if steps > 0:
            self._fit_output(weight, s64, budget, steps, lr, structure_lr)
        final = output_error()
        if not final <= reference_error:  # never worse than the whitened SVD of the same FLOPs (NaN included)
            load(reference_state)
            final = reference_error
        return final

    @torch.no_grad()
    def _project_to_budget(self, budget_flops: float) -> None:
        self.widths.copy_(
            project_widths_to_budget(self.widths, self.in_features, self.out_features, self.rank_per_component, budget_flops)
        )
        self.locations.copy_(torch.remainder(self.locations, 1.0))


def gblr_layers(model: nn.Module, include_frozen: bool = True) -> list[tuple[str, GBLRLinear]]:
    """(qualified name, layer) of every GBLR layer of ``model`` (optionally only the non-frozen ones)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, GBLRLinear) and (include_frozen or not m.is_frozen)]


def model_flops(model: nn.Module) -> dict[str, float]:
    """:func:`~gsm_lightning.core.flops.layers_flops` over every GBLR layer of ``model`` (the dense layers they
    replace as reference)."""
    return layers_flops(m for _, m in gblr_layers(model))
