"""True FLOP counts of frozen GBLR layers under ``torch.utils.flop_counter.FlopCounterMode`` (plain PyTorch).

``FlopCounterMode`` (and everything built on it: Lightning's ``ModelSummary``, ``measure_flops`` and hence
``ThroughputMonitor`` FLOP numbers) counts aten matmuls by their shapes, so a frozen
:class:`~gsm_lightning.layer.GBLRLinear` shows up as the dense ``K r x in`` and ``out x K r`` products of its
masked factors.  This module routes the product through a custom operator,
``torch.ops.gsm_lightning.gblr_linear``, with a registered FLOP formula that charges only what the
integer boxcars cover.

Convention (the same as ``FlopCounterMode`` for ``nn.Linear``):

* FLOPs = 2 x multiply-adds.  :meth:`GBLRLinear.flops` is multiply-adds **per token**, so one forward over
  ``T`` tokens counts ``2 * T * layer.flops()``.
* The bias add is not counted (``FlopCounterMode`` counts ``addmm`` as its ``mm`` part only), nor is the
  bias gradient (a sum).
* Backward counts ``2 * T * S_out`` for ``dh = dy U`` (when any of ``x``/``V`` needs a gradient),
  ``2 * T * S_in`` for ``dx`` (when ``x`` needs one), ``2 * T * S_in`` for ``dV`` and ``2 * T * S_out`` for
  ``dU`` (when the weights need them), with ``S_in = r * sum(W_in)`` and ``S_out = r * sum(W_out)`` over active
  components; with every gradient needed that is ``4 * T * layer.flops()``, exactly as a dense layer's
  backward is twice its forward.

Only frozen layers (integer boxcars, phase 2) are re-routed: during structure learning the layer really
computes the dense masked products, and that is what gets counted.

Use without touching the layer code::

    with gblr_flop_counting(model), FlopCounterMode(display=False) as counter:
        model(x)
    counter.get_total_flops()

or ``count_flops(model, x)``.  To make every ``FlopCounterMode`` (``ModelSummary``, ``measure_flops``) see the
true cost without the context manager, this module installs a route for frozen layers
(:func:`gsm_lightning.layer.set_frozen_route`, done on import, and importing ``gsm_lightning`` imports this
module): the eager forward of a frozen layer goes through :func:`frozen_forward` when :func:`is_flop_counting`
is true (values are identical; outside a counter nothing changes, and the layer code knows nothing about FLOP
counting).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from ..core.layer import GBLRLinear, gblr_layers, set_frozen_route

__all__ = [
    "gblr_linear",
    "frozen_forward",
    "side_macs",
    "expected_flops",
    "is_flop_counting",
    "gblr_flop_counting",
    "count_flops",
    "flop_breakdown",
]


# --------------------------------------------------------------------------- operators
def _product(x: Tensor, v: Tensor, u: Tensor) -> Tensor:
    """``x V^T U`` (no bias) by the cheaper of the factored and the merged dense product."""
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    kr, n_in, n_out = v.shape[0], v.shape[1], u.shape[1]
    if kr * n_in * n_out + tokens * n_in * n_out < tokens * kr * (n_in + n_out):
        return F.linear(x, u.t() @ v)
    return F.linear(F.linear(x, v), u.t())


@torch.library.custom_op("gsm_lightning::gblr_linear", mutates_args=())
def _gblr_linear_op(x: Tensor, v: Tensor, u: Tensor, bias: Tensor | None, macs_in: int, macs_out: int) -> Tensor:
    y = _product(x, v, u)
    return y if bias is None else y + bias


@_gblr_linear_op.register_fake
def _(x: Tensor, v: Tensor, u: Tensor, bias: Tensor | None, macs_in: int, macs_out: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], u.shape[1])


@torch.library.custom_op("gsm_lightning::gblr_linear_backward", mutates_args=())
def _gblr_linear_backward_op(
    grad: Tensor, x: Tensor, v: Tensor, u: Tensor, macs_in: int, macs_out: int,
    need_x: bool, need_v: bool, need_u: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    g = grad.reshape(-1, u.shape[1])
    x2 = x.reshape(-1, v.shape[1])
    empty = grad.new_empty(0)
    dx = dv = du = empty
    if need_x or need_v:
        dh = g @ u.t()  # (T, K r)
        if need_x:
            dx = (dh @ v).reshape(x.shape)
        if need_v:
            dv = dh.t() @ x2
    if need_u:
        du = (x2 @ v.t()).t() @ g
    return dx, dv, du


@_gblr_linear_backward_op.register_fake
def _(grad: Tensor, x: Tensor, v: Tensor, u: Tensor, macs_in: int, macs_out: int,
      need_x: bool, need_v: bool, need_u: bool) -> tuple[Tensor, Tensor, Tensor]:
    empty = grad.new_empty(0)
    return (x.new_empty(x.shape) if need_x else empty, v.new_empty(v.shape) if need_v else empty,
            u.new_empty(u.shape) if need_u else empty)


def _setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, v, u, bias, macs_in, macs_out = inputs
    ctx.save_for_backward(x, v, u)
    ctx.macs = (macs_in, macs_out)
    ctx.has_bias = bias is not None


def _backward(ctx: Any, grad: Tensor) -> tuple:
    x, v, u = ctx.saved_tensors
    need_x, need_v, need_u, need_b = ctx.needs_input_grad[:4]
    dx = dv = du = db = None
    if need_x or need_v or need_u:
        gx, gv, gu = _gblr_linear_backward_op(grad, x, v, u, *ctx.macs, need_x, need_v, need_u)
        dx, dv, du = (gx if need_x else None), (gv if need_v else None), (gu if need_u else None)
    if ctx.has_bias and need_b:
        db = grad.reshape(-1, grad.shape[-1]).sum(0)
    return dx, dv, du, db, None, None


_gblr_linear_op.register_autograd(_backward, setup_context=_setup_context)


def _tokens(x_shape: Any) -> int:
    return math.prod(x_shape[:-1])


@register_flop_formula(torch.ops.gsm_lightning.gblr_linear)
def _gblr_linear_flop(x_shape, v_shape, u_shape, bias_shape, macs_in: int, macs_out: int, *args, **kwargs) -> int:
    return 2 * _tokens(x_shape) * (macs_in + macs_out)


@register_flop_formula(torch.ops.gsm_lightning.gblr_linear_backward)
def _gblr_linear_backward_flop(grad_shape, x_shape, v_shape, u_shape, macs_in: int, macs_out: int,
                               need_x: bool, need_v: bool, need_u: bool, *args, **kwargs) -> int:
    t = _tokens(x_shape)
    macs = 0
    if need_x or need_v:
        macs += macs_out  # dh = dy U
    if need_x:
        macs += macs_in  # dx = dh V
    if need_v:
        macs += macs_in  # dV = dh^T x
    if need_u:
        macs += macs_out  # dU = h^T dy
    return 2 * t * macs


def gblr_linear(x: Tensor, v: Tensor, u: Tensor, bias: Tensor | None, macs_in: int, macs_out: int) -> Tensor:
    """``x V^T U + b`` through the counted operator.

    Args:
        x: input ``(*, in)``.
        v: masked input factors ``(K r, in)``.
        u: masked output factors ``(K r, out)``.
        bias: ``(out,)`` or ``None``.
        macs_in / macs_out: multiply-adds per token of the input / output side (``r * sum`` of the active
            integer widths); ``FlopCounterMode`` charges ``2 * tokens * (macs_in + macs_out)``.
    """
    if v.dim() != 2 or u.dim() != 2 or v.shape[0] != u.shape[0]:
        raise ValueError(f"expected v (K*r, in) and u (K*r, out) with the same first dimension, got "
                         f"{tuple(v.shape)} and {tuple(u.shape)}")
    if x.shape[-1] != v.shape[1]:
        raise ValueError(f"input last dimension {x.shape[-1]} does not match v's {v.shape[1]}")
    if macs_in < 0 or macs_out < 0:
        raise ValueError(f"macs_in and macs_out must be >= 0, got {macs_in}, {macs_out}")
    return _gblr_linear_op(x, v, u, bias, int(macs_in), int(macs_out))


# --------------------------------------------------------------------------- layers
def side_macs(layer: GBLRLinear) -> tuple[int, int]:
    """Multiply-adds per token of the input and output side, ``r * sum(W)`` over active components.
    Their sum is ``layer.flops()``."""
    w = layer.int_widths()
    active = (w[0] > 0) & (w[1] > 0)
    r = layer.rank_per_component
    return r * int(w[0][active].sum()), r * int(w[1][active].sum())


def frozen_forward(layer: GBLRLinear, x: Tensor) -> Tensor:
    """Forward of a frozen ``layer`` through the counted operator (same values as ``layer(x)``)."""
    if not layer.is_frozen:
        raise ValueError("frozen_forward needs a frozen GBLRLinear (call freeze_structure() first): a layer that "
                         "still learns its structure computes the dense masked products")
    if x.shape[-1] != layer.in_features:
        raise ValueError(f"GBLRLinear expected input with last dimension {layer.in_features}, got shape {tuple(x.shape)}")
    v, u = layer.masked_factors()
    bias = layer.bias
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):  # custom ops are not autocast: cast as F.linear would
        dtype = torch.get_autocast_dtype(device_type)
        x, v, u = x.to(dtype), v.to(dtype), u.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return gblr_linear(x, v, u, bias, *side_macs(layer))


def expected_flops(model: nn.Module, tokens: int, backward: bool = False) -> int:
    """FLOPs (2 x multiply-adds) that ``FlopCounterMode`` charges the frozen GBLR layers of ``model`` for one
    forward over ``tokens`` tokens per layer (plus the backward with every gradient needed if ``backward``)."""
    total = sum(m.flops() for _, m in gblr_layers(model) if m.is_frozen)
    return 2 * int(tokens) * total * (3 if backward else 1)


try:  # private torch API: without it there is no automatic detection (the context manager still works)
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    from torch.utils.flop_counter import _FlopCounterMode
except ImportError:  # pragma: no cover
    _get_current_dispatch_mode_stack = None


def is_flop_counting() -> bool:
    """True while a ``FlopCounterMode`` is active (so a layer may route through the counted operator)."""
    if _get_current_dispatch_mode_stack is None or torch.compiler.is_compiling():
        return False
    stack = _get_current_dispatch_mode_stack()
    return bool(stack) and any(isinstance(mode, _FlopCounterMode) for mode in stack)


def _counted_route(layer: GBLRLinear, x: Tensor) -> Tensor | None:
    """The frozen-layer route installed below: the counted operator while a ``FlopCounterMode`` is active."""
    return frozen_forward(layer, x) if is_flop_counting() else None


set_frozen_route(_counted_route)


@contextlib.contextmanager
def gblr_flop_counting(model: nn.Module) -> Iterator[list[GBLRLinear]]:
    """Within the block, every frozen GBLR layer of ``model`` computes through the counted operator, so any
    ``FlopCounterMode`` (``ModelSummary``, ``measure_flops``) sees its true cost.  Yields the swapped layers;
    their original ``forward`` is restored on exit."""
    swapped: list[GBLRLinear] = []
    try:
        for m in model.modules():
            if isinstance(m, GBLRLinear) and m.is_frozen and "forward" not in m.__dict__:
                m.forward = _bound_frozen_forward(m)
                swapped.append(m)
        yield swapped
    finally:
        for m in swapped:
            m.__dict__.pop("forward", None)


def _bound_frozen_forward(layer: GBLRLinear):
    def forward(x: Tensor) -> Tensor:
        return frozen_forward(layer, x)

    return forward


def count_flops(model: nn.Module, *inputs: Any, backward: bool = False, **kwargs: Any) -> int:
    """FLOPs of ``model(*inputs, **kwargs)`` (and of the backward of the output's sum if ``backward``) as
    counted by ``FlopCounterMode``, with frozen GBLR layers at their true cost."""
    with gblr_flop_counting(model), FlopCounterMode(display=False) as counter:
        out = model(*inputs, **kwargs)
        if backward:
            if hasattr(out, "logits"):
                out = out.logits
            if not isinstance(out, Tensor) or not out.requires_grad:
                raise ValueError("backward=True needs a model output tensor that requires grad")
            out.float().sum().backward()
    return counter.get_total_flops()


@torch.no_grad()
def flop_breakdown(model: nn.Module, *inputs: Any, **kwargs: Any) -> dict[str, Any]:
    """One forward of ``model(*inputs, **kwargs)`` under ``FlopCounterMode`` (frozen GBLR layers through the
    counted operator), with the FLOPs each GBLR layer was charged and the tokens (rows) it processed.

    Returns a dict (all FLOPs = 2 x multiply-adds, bias adds excluded):

    * ``flops``: the ``FlopCounterMode`` total (what ``measure_flops``/``ModelSummary`` report);
    * ``analytic_flops``: the total with every GBLR layer at ``2 * tokens * layer.flops()`` (equal to ``flops``
      when all layers are frozen; for layers still learning their structure ``flops`` holds the dense masked
      products they really compute);
    * ``dense_flops``: the total with every GBLR layer replaced by its dense ``in x out`` product;
    * ``ratio``: ``analytic_flops / dense_flops``;
    * ``layers``: per GBLR layer ``{"tokens", "counted", "analytic", "dense", "frozen"}``.
    """
    named = gblr_layers(model)
    stats = {n: {"tokens": 0, "counted": 0, "analytic": 0, "dense": 0, "frozen": m.is_frozen} for n, m in named}
    counter = FlopCounterMode(display=False)
    start: dict[str, int] = {}
    handles = []

    def pre_hook(name: str, layer: GBLRLinear):
        def hook(module: nn.Module, args: tuple) -> None:
            start[name] = counter.get_total_flops()
            tokens = args[0].numel() // layer.in_features
            stats[name]["tokens"] += tokens
            stats[name]["analytic"] += 2 * tokens * layer.flops()
            stats[name]["dense"] += 2 * tokens * layer.dense_flops()

        return hook

    def post_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            stats[name]["counted"] += counter.get_total_flops() - start.pop(name)

        return hook

    try:
        for name, layer in named:
            handles.append(layer.register_forward_pre_hook(pre_hook(name, layer)))
            handles.append(layer.register_forward_hook(post_hook(name)))
        with gblr_flop_counting(model), counter:
            model(*inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()
    total = counter.get_total_flops()
    counted = sum(s["counted"] for s in stats.values())
    analytic = total - counted + sum(s["analytic"] for s in stats.values())
    dense = total - counted + sum(s["dense"] for s in stats.values())
    return {"flops": total, "analytic_flops": analytic, "dense_flops": dense,
            "ratio": analytic / dense if dense else 1.0, "layers": stats}
