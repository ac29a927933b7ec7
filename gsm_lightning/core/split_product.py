"""The GBLR product when some components are empty on one side: only the work that can be non-zero.

A learning GBLR layer computes ``y = (x V_m^T) U_m`` over its live components (those not empty on both sides,
:meth:`~gsm_lightning.core.layer.GBLRLinear.live_components`).  A component whose input width rounds to 0 has an
input mask of exactly 0 (the Dirichlet amplitude is proportional to the width, and the forward rounds widths to the
grid), so its rows of ``V_m`` are 0: it adds nothing to ``y``, to ``dx`` or to ``dU_m``, and of the six products of
a forward and backward only two are non-zero, ``dH = g U_m^T`` and ``dV_m = dH^T x`` (they carry the gradient that
lets its input width grow back).  Symmetrically, a component empty on the output side only needs ``H = x V_m^T``
and ``dU_m = H^T g``.  The calibrated conversion (:meth:`~gsm_lightning.core.layer.GBLRLinear.from_linear` with
``input_factor``) starts every spare component so (input width 0, output width 1), and the budget learner cuts
sides to 0 one at a time, so in phase 1 most components of a layer can be one-sided.

:func:`split_product` computes exactly that: the full product over the components live on both sides, and the
one-sided terms only where they are non-zero.  Values and first derivatives equal the full product's up to float
summation order (``tests/test_split_product.py``); under ``create_graph`` (higher derivatives) the backward hands
over to the full product's graph.  Eager only: the layer does not take this path under ``torch.compile`` or
autocast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SideSplit", "side_split", "split_macs", "split_product"]


@dataclass(frozen=True)
class SideSplit:
    """Rows of the masked factors (``(K*r, n)``, components of ``r`` rows each) by which sides are non-empty.

    Attributes:
        both: rows of components non-empty on both sides.
        out_only: rows of components empty on the input side only (their ``V_m`` rows are 0).
        in_only: rows of components empty on the output side only (their ``U_m`` rows are 0).
    """

    both: Tensor
    out_only: Tensor
    in_only: Tensor


def side_split(grid_widths: Tensor, rank: int) -> SideSplit | None:
    """The :class:`SideSplit` of integer grid widths ``(2, K)`` (row 0 input, row 1 output), or ``None`` when every
    component is non-empty on both sides (nothing to save).  Components empty on both sides are in no group."""
    has_in, has_out = grid_widths[0] > 0, grid_widths[1] > 0
    if bool((has_in == has_out).all()):
        return None
    offsets = torch.arange(rank, device=grid_widths.device)

    def rows(select: Tensor) -> Tensor:
        return (select.nonzero().flatten()[:, None] * rank + offsets).flatten()

    return SideSplit(rows(has_in & has_out), rows(~has_in & has_out), rows(has_in & ~has_out))


class _SplitProductFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, v: Tensor, u: Tensor, bias: Tensor | None, split: SideSplit,  # type: ignore[override]
                keep_in_only: bool) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        v_b, u_b = v.index_select(0, split.both), u.index_select(0, split.both)
        h = x2 @ v_b.t()
        y = torch.addmm(bias, h, u_b) if bias is not None else h @ u_b
        h_in = x2 @ v.index_select(0, split.in_only).t() if keep_in_only and split.in_only.numel() else None
        ctx.split, ctx.has_bias, ctx.x_shape = split, bias is not None, x.shape
        ctx.save_for_backward(x, v, u, bias, h, h_in)
        return y.reshape(*x.shape[:-1], u.shape[1])

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, v, u, bias, h, h_in = ctx.saved_tensors
        split: SideSplit = ctx.split
        if torch.is_grad_enabled():  # create_graph: the full product's graph, so higher derivatives are its own
            inputs = [t for t, need in zip((x, v, u, bias), ctx.needs_input_grad[:4]) if need]
            with torch.enable_grad():
                y = F.linear(F.linear(x, v), u.t(), bias)
                grads = iter(torch.autograd.grad(y, inputs, grad, create_graph=True))
            return (*(next(grads) if need else None for need in ctx.needs_input_grad[:4]), None, None)
        g = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        v_b, u_b = v.index_select(0, split.both), u.index_select(0, split.both)
        dx = dv = du = db = None
        need_x, need_v, need_u, need_b = ctx.needs_input_grad[:4]
        if need_x or need_v:
            dh = g @ u_b.t()
            if need_x:
                dx = (dh @ v_b).reshape(ctx.x_shape)
            if need_v:
                dv = torch.zeros_like(v).index_copy_(0, split.both, dh.t() @ x2)
                if split.out_only.numel():
                    dh_out = g @ u.index_select(0, split.out_only).t()
                    dv.index_copy_(0, split.out_only, dh_out.t() @ x2)
        if need_u:
            du = torch.zeros_like(u).index_copy_(0, split.both, h.t() @ g)
            if h_in is not None:
                du.index_copy_(0, split.in_only, h_in.t() @ g)
        if need_b:
            db = g.sum(0)
        return dx, dv, du, db, None, None


def split_macs(split: SideSplit, in_features: int, out_features: int) -> float:
    """Multiply-adds per token of :func:`split_product`, forward and backward together over 3 (the forward of the
    full product costs a third of its training step), so comparable with a forward cost model."""
    n_one_sided = split.out_only.numel() + split.in_only.numel()
    return (split.both.numel() + n_one_sided / 3) * (in_features + out_features)


def split_product(x: Tensor, v: Tensor, u: Tensor, split: SideSplit, bias: Tensor | None = None) -> Tensor:
    """``F.linear(F.linear(x, v), u.t(), bias)`` for masked factors ``v`` ``(K*r, in)`` and ``u`` ``(K*r, out)``
    whose rows ``split.out_only`` of ``v`` and ``split.in_only`` of ``u`` are 0 (and rows in no group are 0 in
    both), computing only the non-zero terms (module docstring).  The zero rows are trusted, not checked.

    Shape:
        - x: ``(*, in)``; output: ``(*, out)``.
    """
    # the in-only components' hidden activations only serve dU: not computed when no gradient will be asked for
    return _SplitProductFn.apply(x, v, u, bias, split, torch.is_grad_enabled() and u.requires_grad)
