"""A forward hook that measures on the loss gradient at a GBLR layer's output, for rules that learn from it.

:class:`GradientProbe` is the common part of :class:`~gsm_lightning.learn.sensitivity.SensitivityRule`'s Fisher
measure and :class:`~gsm_lightning.learn.regrowth.Regrowth`'s edge gradients: on a training forward of a non-frozen
layer, while its owner is ``measuring``, it keeps the input and the active components and hooks the output's gradient;
the subclass's :meth:`GradientProbe.add` gets ``(layer, x, index, dy)``.  A class, not a closure, so that a module
with the hook still pickles.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from ..core.layer import GBLRLinear, gblr_layers

__all__ = ["GradientProbe", "attach_probes"]


class GradientProbe:
    """Forward hook of one layer, for an ``owner`` with a boolean ``measuring``; subclasses implement :meth:`add`."""

    def __init__(self, owner: Any, name: str) -> None:
        self.owner, self.name = owner, name

    def __call__(self, layer: GBLRLinear, inputs: tuple[Any, ...], output: Any) -> None:
        if (not self.owner.measuring or layer.is_frozen or not torch.is_grad_enabled() or not isinstance(output, Tensor)
                or not output.requires_grad):
            return
        if not bool(torch.isfinite(layer.widths).all() and torch.isfinite(layer.locations).all()):
            return  # the module's own check names the cause (a learning rate, the data)
        index = layer.active_components().nonzero().flatten()
        if index.numel() == 0:
            return
        self.capture(layer, inputs[0], index, output)

    def capture(self, layer: GBLRLinear, x: Tensor, index: Tensor, output: Tensor) -> None:
        """What the forward hook keeps: by default a hook on the output's gradient that calls :meth:`add` in the
        loss's backward."""
        output.register_hook(functools.partial(self.add, layer, x, index))

    def add(self, layer: GBLRLinear, x: Tensor, index: Tensor, dy: Tensor) -> None:
        """Measure on one backward: ``x`` the layer's input, ``index`` its active components, ``dy`` the loss
        gradient at its output."""
        raise NotImplementedError


def attach_probes(model: nn.Module, probe: type[GradientProbe], owner: Any) -> list[Any]:
    """A ``probe(owner, name)`` forward hook on every non-frozen GBLR layer of ``model``; returns the handles."""
    return [m.register_forward_hook(probe(owner, name)) for name, m in gblr_layers(model, include_frozen=False)]
