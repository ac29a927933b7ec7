"""The whitened objective of activation-aware compression, in plain PyTorch (imports nothing else of the package).

A pretrained layer ``W`` (out x in) should keep its *outputs* on real inputs, not its weights: minimise
``||(W - W') X||_F`` over calibration inputs ``X`` (in x tokens).  With ``H = X X^T / N = S S^T`` (``S`` the
lower-triangular Cholesky factor, damped when ``H`` is singular) this is ``||(W - W') S||_F`` (up to the
constant ``sqrt(N)``).

* :class:`InputStats` holds ``H`` (or its diagonal) and the token count; :meth:`InputStats.whitening` gives ``S``.
* :func:`whitened_low_rank` is the SVD-LLM rule: truncate the SVD of ``W S`` and multiply by ``S^-1`` on the
  right; the optimal rank-r solution of the whitened objective, returned as balanced factors.
  :func:`whitened_svd` keeps the SVD for truncations at several ranks (one SVD instead of one per rank).
* :func:`relative_output_error`, :func:`optimal_low_rank_error` and :func:`whitened_singular_values` measure it.

The statistics are collected by :func:`gsm_lightning.core.calibration.collect_input_stats` (which re-exports all of
this module).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "InputStats",
    "check_calibration",
    "WhitenedSVD",
    "input_factor",
    "whitened_low_rank",
    "whitened_svd",
    "whitened_singular_values",
    "optimal_low_rank_error",
    "relative_output_error",
    "right_multiply",
    "right_solve",
    "second_moment_of",
    "whitening_factor",
]

Factor = Tensor  # (in,) for a diagonal factor, (in, in) lower-triangular otherwise


@dataclass
class InputStats:
    """Input statistics of one linear layer: ``h = sum_tokens x x^T`` (``(in, in)``), or ``sum_tokens x^2``
    (``(in,)``) when collected with ``diagonal=True``, over ``count`` tokens."""

    h: Tensor
    count: int

    @property
    def diagonal(self) -> bool:
        return self.h.dim() == 1

    @property
    def in_features(self) -> int:
        return int(self.h.shape[0])

    def second_moment(self) -> Tensor:
        """``H / count``: ``E[x x^T]`` (or ``E[x^2]`` for diagonal statistics)."""
        if self.count <= 0:
            raise ValueError("these statistics hold no token (count 0)")
        return self.h / self.count

    def whitening(self, damp: float = 1e-2, *, always: bool = False, rcond: float = 1e-10) -> Tensor:
        """The factor ``S`` with ``S S^T = H / count`` (+ damping), in float64.

        Full statistics: the lower-triangular Cholesky factor.  When ``H`` is numerically singular (Cholesky fails,
        or a Cholesky pivot falls below ``rcond * mean(diag(H))``) or ``always=True``, ``damp * mean(diag(H))`` is
        added to the diagonal first (growing 10x per retry while Cholesky still fails).  Diagonal statistics: the
        vector ``sqrt(diag)`` (a diagonal ``S``), damped in the same way when an entry is (near) zero."""
        return whitening_factor(self.second_moment(), damp=damp, always=always, rcond=rcond)

    def to(self, *args: Any, **kwargs: Any) -> InputStats:
        return InputStats(self.h.to(*args, **kwargs), self.count)


def whitening_factor(h: Tensor, damp: float = 1e-2, *, always: bool = False, rcond: float = 1e-10) -> Tensor:
    """``S`` with ``S S^T = h`` (+ damping) for a second-moment matrix ``h`` ``(in, in)`` or diagonal ``(in,)``;
    see :meth:`InputStats.whitening`."""
    if not (isinstance(damp, (int, float)) and not isinstance(damp, bool) and damp >= 0 and math.isfinite(damp)):
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    h = h.detach().to(torch.float64)
    if not bool(torch.isfinite(h).all()):
        raise ValueError("the input statistics are not finite (NaN/inf activations in the calibration data)")
    diag = h if h.dim() == 1 else torch.diagonal(h)
    scale = float(diag.mean()) if diag.numel() else 0.0
    if not scale > 0:  # an all-zero input: any factor weighs nothing; the identity keeps the solves defined
        return torch.ones_like(diag) if h.dim() == 1 else torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    floor = rcond * scale
    step = damp * scale if damp > 0 else floor
    if h.dim() == 1:
        d = h.clamp_min(0)
        if always or bool((d <= floor).any()):
            d = d + max(step, floor)
        return d.sqrt()
    extra = step if always else 0.0
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(40):
        chol, info = torch.linalg.cholesky_ex(h + extra * eye)
        if int(info) == 0 and bool(torch.isfinite(chol).all()) and float(torch.diagonal(chol).pow(2).min()) > floor:
            return chol
        extra = step if extra == 0.0 else extra * 10.0
    raise ValueError("could not factor the input statistics (Cholesky failed even with heavy damping)")


def input_factor(source: InputStats | Tensor, in_features: int | None = None, damp: float = 1e-2) -> Tensor:
    """The factor ``S`` (float64) of ``source``: :class:`InputStats` (its :meth:`~InputStats.whitening`), or a
    tensor taken as the factor itself: ``(in,)`` diagonal or ``(in, in)`` (lower-triangular for the fast solves;
    any square ``S`` with ``S S^T = H`` defines the same objective)."""
    if isinstance(source, InputStats):
        s = source.whitening(damp)
    elif isinstance(source, Tensor):
        s = source.detach().to(torch.float64)
        if s.dim() not in (1, 2) or (s.dim() == 2 and s.shape[0] != s.shape[1]):
            raise ValueError(f"an input factor must be (in,) (diagonal) or (in, in), got shape {tuple(s.shape)}")
    else:
        raise TypeError(f"expected InputStats or a tensor factor, got {type(source).__name__}")
    if in_features is not None and s.shape[0] != in_features:
        raise ValueError(f"the input factor is for {s.shape[0]} input features, but the layer has {in_features}")
    return s


def second_moment_of(factor: Tensor) -> Tensor:
    """``S S^T`` (``(in, in)``) of a factor, or ``diag(s^2)`` for a diagonal one."""
    return torch.diag(factor.pow(2)) if factor.dim() == 1 else factor @ factor.mT


def right_multiply(a: Tensor, factor: Tensor) -> Tensor:
    """``a @ S`` for a full or diagonal (``(in,)``) factor."""
    return a * factor if factor.dim() == 1 else a @ factor


def right_solve(b: Tensor, factor: Tensor) -> Tensor:
    """``b @ S^-1`` by a triangular solve (a general solve when ``S`` is not lower-triangular)."""
    if factor.dim() == 1:
        return b / factor
    if torch.equal(factor, factor.tril()):
        return torch.linalg.solve_triangular(factor, b, upper=False, left=False)
    return torch.linalg.solve(factor, b, left=False)


def _weighted(weight: Tensor, source: InputStats | Tensor) -> tuple[Tensor, Tensor]:
    w = weight.detach().to(torch.float64)
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out x in), got shape {tuple(w.shape)}")
    s = input_factor(source, w.shape[1]).to(w.device)
    return w, s


def whitened_singular_values(weight: Tensor, source: InputStats | Tensor) -> Tensor:
    """Singular values of ``W S`` (float64, descending): the output energy of each whitened component."""
    w, s = _weighted(weight, source)
    return torch.linalg.svdvals(right_multiply(w, s))


@dataclass(frozen=True)
class WhitenedSVD:
    """The SVD of ``W S`` kept up to ``max_rank`` components, so that truncations at several ranks cost one SVD.

    ``u`` ``(out, R)``, ``sv`` ``(R,)`` and ``right`` ``(R, in)`` (``Vh_R S^-1``), all float64; ``dtype`` the
    factors' output dtype.  Build it with :func:`whitened_svd`; :meth:`factors` gives what :func:`whitened_low_rank`
    gives at a rank ``<= R`` (equal up to float rounding of the triangular solve's row blocking).
    """

    u: Tensor
    sv: Tensor
    right: Tensor
    dtype: torch.dtype

    @property
    def max_rank(self) -> int:
        return int(self.sv.shape[0])

    def factors(self, rank: int) -> tuple[Tensor, Tensor]:
        """Balanced rank-``rank`` factors ``u`` ``(out, r)`` and ``v`` ``(in, r)`` (``||u_i|| = ||v_i||``)."""
        if isinstance(rank, bool) or int(rank) != rank or not 0 <= rank <= self.max_rank:
            raise ValueError(f"rank must be an int in [0, {self.max_rank}] (the ranks this SVD was kept to), "
                             f"got {rank!r}")
        rank = int(rank)
        u, sv, right = self.u[:, :rank], self.sv[:rank], self.right[:rank]
        beta = right.norm(dim=1).clamp_min(1e-300)
        g = (sv * beta).sqrt()  # each side's norm
        return (u * g).to(self.dtype), (right * (g / beta)[:, None]).t().to(self.dtype)


def whitened_svd(weight: Tensor, source: InputStats | Tensor, max_rank: int | None = None) -> WhitenedSVD:
    """The whitened SVD of ``weight`` (out x in) kept to ``max_rank`` components (default all,
    ``min(out, in)``), for :meth:`WhitenedSVD.factors` at any rank up to it.  ``source``: :class:`InputStats` or a
    factor ``S`` (see :func:`input_factor`)."""
    w, s = _weighted(weight, source)
    top = min(w.shape)
    if max_rank is None:
        max_rank = top
    if isinstance(max_rank, bool) or int(max_rank) != max_rank or not 0 <= max_rank <= top:
        raise ValueError(f"rank must be an int in [0, min(out, in)] = [0, {top}], got {max_rank!r}")
    max_rank = int(max_rank)
    u, sv, vh = torch.linalg.svd(right_multiply(w, s), full_matrices=False)
    out_dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    return WhitenedSVD(u[:, :max_rank], sv[:max_rank], right_solve(vh[:max_rank], s), out_dtype)


def whitened_low_rank(weight: Tensor, source: InputStats | Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` ``W' = u @ v.T`` minimising ``||(W - W') S||_F`` (SVD-LLM): truncated SVD
    ``W S ~ U_r diag(s_r) Vh_r``, then ``v.T = Vh_r S^-1`` (triangular solve).

    Returns ``u`` ``(out, r)`` and ``v`` ``(in, r)`` in ``weight``'s dtype (float32 for 16-bit weights), balanced:
    each rank-1 component ``u_i v_i^T`` has ``||u_i|| = ||v_i||`` (the whitened factors are otherwise badly
    scaled for gradient steps).  ``source``: :class:`InputStats` or a factor ``S`` (see :func:`input_factor`).
    For several ranks of one layer, :func:`whitened_svd` once and :meth:`WhitenedSVD.factors` per rank."""
    return whitened_svd(weight, source, rank).factors(rank)


def optimal_low_rank_error(weight: Tensor, source: InputStats | Tensor, rank: int) -> float:
    """The smallest relative output error ``||(W - W') S||_F / ||W S||_F`` over rank-``rank`` ``W'``
    (Eckart-Young on ``W S``: the tail of its singular values)."""
    sv = whitened_singular_values(weight, source)
    total = float(sv.pow(2).sum())
    return math.sqrt(float(sv[int(rank):].pow(2).sum()) / total) if total > 0 else 0.0


def relative_output_error(weight: Tensor, approx: Tensor, source: InputStats | Tensor) -> float:
    """``||(W - W') S||_F / ||W S||_F`` (float64) for dense ``weight`` and ``approx`` (both out x in)."""
    w, s = _weighted(weight, source)
    ws = right_multiply(w, s)
    diff = ws - right_multiply(approx.detach().to(device=w.device, dtype=torch.float64), s)
    return float(diff.norm() / ws.norm().clamp_min(1e-300))


def check_calibration(calibration: Mapping[str, InputStats | Tensor] | None,
                      names: Sequence[str]) -> Mapping[str, InputStats | Tensor] | None:
    """``calibration`` (``{name: InputStats or factor}``, as :func:`collect_input_stats` returns; ``None`` passes
    through) after checking that it holds every layer of ``names``.  Raises ``ValueError`` naming the converted
    layers that have no statistics, so that a conversion fails before it converts anything.  The factors themselves
    are computed layer by layer (:func:`input_factor`): one ``in x in`` factor in memory at a time."""
    if calibration is None:
        return None
    if not isinstance(calibration, Mapping):
        raise TypeError(f"calibration must be a dict {{layer name: InputStats}} (collect_input_stats), got {type(calibration).__name__}")
    missing = [n for n in names if n not in calibration]
    if missing:
        have = list(calibration)
        raise ValueError(
            f"calibration has no input statistics for the converted layer(s) {', '.join(missing)}; it holds "
            f"{', '.join(have[:8]) + (f', ... ({len(have)} in all)' if len(have) > 8 else '') if have else 'nothing'}. "
            "Collect them for the same layers (collect_input_stats(model, batches, layers=select_linear_layers(model, include, "
            "exclude))) before converting")
    return calibration
