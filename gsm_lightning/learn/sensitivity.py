"""A structure rule that removes whole components by their measured effect on the loss per FLOP.

:class:`SensitivityRule` is for pretrained conversions.  The conversion starts ``headroom`` times above the budget
(the whitened fit of the pretrained weights at that larger budget, spread over the layers as the conversion's
allocation says); phase 1 then distils with all of it and removes, along a cosine path to the budget, the
components whose removal the loss notices least per FLOP they cost.  FLOPs thus move between layers, and between the
components of a layer, by what the distillation loss measures while it trains, not by gradient steps on widths (which
on a calibrated start undo the fit: BENCHMARKS.md, the MiniLM compression table).

The measure is Optimal Brain Damage's: scaling component ``k`` by ``s_k`` (``W = sum_k s_k W_k``, ``s = 1``), removing
it (``s_k: 1 -> 0``) changes the loss by about ``-g_k + H_kk / 2`` with ``g_k = dL/ds_k``.  Near a fitted optimum
``g_k`` is small and the curvature term decides; the rule estimates ``H_kk`` over samples as
``F_k = sum_b g_{k,b}^2``, where ``g_{k,b} = sum_{t in b} (U_k dy_t) . (V_k x_t)`` is sample ``b``'s own contribution
(its tokens ``t``).  With ``fisher="empirical"`` ``dy`` is the loss gradient at the layer's output (the empirical
Fisher: a forward hook keeps the layer's input and hooks its output's gradient); with ``fisher="output"`` it is the
gradient of ``z . output`` for a drawn ``z ~ N(0, I)``, from a backward of the rule's own (the Gauss-Newton
curvature of the output, which does not shrink with the student's error).  ``F_k`` is summed over the optimizer
steps since the last removal with an exponential decay ``beta`` per step.  Components of smallest ``F_k / flops_k``
go first, ``flops_k = r * (w_in + w_out)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..core.flops import grid_widths, layers_flops
from ..core.layer import GBLRLinear, gblr_layers
from .budget_learner import BudgetPath
from .probe import GradientProbe, attach_probes
from .rules import StructureRule, _fraction

__all__ = ["SensitivityRule", "component_sensitivity", "per_sample_sensitivity"]

FISHERS = ("empirical", "output")


def component_sensitivity(layer: GBLRLinear) -> Tensor | None:
    """``dL/ds_k`` per component ``(K,)``: the loss gradient along each component's own scale, from the gradients of
    its output factors (None before the first backward)."""
    grad = layer.weight_out.grad
    if grad is None:
        return None
    return (layer.weight_out.detach() * grad).sum((1, 2)).float()


@torch.no_grad()
def per_sample_sensitivity(layer: GBLRLinear, x: Tensor, dy: Tensor, index: Tensor | None = None) -> Tensor:
    """``g_{k,b}`` ``(B, K)``: each sample's contribution to ``dL/ds_k``, from the layer's input ``x`` and the loss
    gradient at its output ``dy`` (``(B, ..., in)`` and ``(B, ..., out)``; a 2-D input is one token per sample).
    Summed over samples it is :func:`component_sensitivity`.  ``index``: only these components (``(K',)``)."""
    v, u = layer.masked_factors()
    r = layer.rank_per_component
    if index is not None:
        rows = (index[:, None] * r + torch.arange(r, device=index.device)).flatten()
        v, u = v[rows], u[rows]
    x = x.detach().reshape(x.shape[0], -1, x.shape[-1]).to(v.dtype)
    dy = dy.detach().reshape(dy.shape[0], -1, dy.shape[-1]).to(u.dtype)
    per_token = (x @ v.t()) * (dy @ u.t())  # (B, T, K'r)
    return per_token.sum(1).view(x.shape[0], -1, r).sum(-1).float()


class _Probe(GradientProbe):
    """Adds ``sum_b g_{k,b}^2`` of the active components to the rule's pending sums."""

    def add(self, layer: GBLRLinear, x: Tensor, index: Tensor, dy: Tensor, scale: float = 1.0) -> None:
        g = per_sample_sensitivity(layer, x, dy, index)
        pending = self.owner.pending.get(self.name)
        if pending is None or pending.shape[0] != layer.num_components:
            pending = self.owner.pending[self.name] = torch.zeros(layer.num_components, device=g.device)
        pending.index_add_(0, index, g.square().sum(0) * scale)


class _OutputProbe(_Probe):
    """For ``fisher="output"``: keeps the layer's input, active components and output of the training forward, for
    the rule's own backward from the model's output (:meth:`SensitivityRule.observe_output`); the loss's backward
    is not measured."""

    def capture(self, layer: GBLRLinear, x: Tensor, index: Tensor, output: Tensor) -> None:
        self.owner.captured[self.name] = (self, layer, x, index, output)


class SensitivityRule(StructureRule):
    """Start above the budget, distil, and remove whole components by their Fisher sensitivity per FLOP.

    While removals are still to come, a forward hook on every non-frozen GBLR layer measures, on each training
    batch, the Fisher ``sum_b g_{k,b}^2`` of each active component's scale over the batch's samples
    (:func:`per_sample_sensitivity`): the empirical Fisher of the training loss (``fisher="empirical"``: ``g`` from
    the loss's own gradient), or the Gauss-Newton curvature of the model's output (``fisher="output"``: ``g`` from a
    backward of ``z . output`` with ``z ~ N(0, I)``, so ``E[g_k^2] = ||d output / d s_k||^2``, the squared change of
    the output that removing the component makes, to first order; for L2-normalised embeddings exactly the
    curvature of the cosine loss, ``1 - cos = ||s - t||^2 / 2``).  The empirical Fisher weighs each component by how
    it aligns with the current error, which shrinks as the fit improves; the output curvature does not depend on the
    error.  After every real optimizer step the rule adds it to ``F_k`` (decayed by
    ``beta`` per step).  After ``warmup`` of phase 1, while the converted layers' FLOPs ratio is above a cosine path
    from the starting ratio to the budget (reached after ``path_fraction`` of phase 1), it removes the active
    components of smallest ``F_k / flops_k`` over all layers until the ratio is on the path: both widths of a removed
    component are set to 0, so it costs nothing and is dropped at the phase switch.  Widths never take gradient
    steps; locations stay with the optimizer.  The measurement costs about one extra product of the active
    components per layer and step, until the path ends.

    Only for a pretrained conversion (``Conversion(init="pretrained")``): the conversion fits at
    ``min(headroom * budget, max_start)``.  From a random init the layers start at their ``width_init`` cost and the
    rule only removes components.  Under DDP the ranks' sums are all-reduced before each removal, so every rank
    removes the same components.  Eager mode only (the hooks read the structure on the host); under float16 AMP the
    sums carry the loss scale squared, which shifts when the scaler changes it.

    Args:
        headroom: the conversion's budget over the module's budget (>= 1; 1 starts at the budget and removes nothing
            unless the layers are over it).
        path_fraction: part of phase 1 over which the ratio reaches the budget (then held).
        warmup: part of phase 1 that only measures, before the first removal.
        beta: decay per optimizer step of the summed Fisher.
        max_start: cap of the starting ratio (below 1: a layer at its dense cost gains nothing from being GBLR).
        structure_lr: learning rate of the locations (the widths have lr 0 in the optimizer).
        start_step: optimizer steps before any removal (on top of ``warmup``).
        fisher: ``"empirical"`` (the loss's gradient, measured in the loss's backward) or ``"output"`` (one extra
            backward per training step from the model's output to the converted layers, while removals are to
            come; no weight gradients).
        draws: ``fisher="output"``: draws of ``z`` per training step (one backward each).

    Examples::

        GSMModule(encoder, budget=0.3, conversion=Conversion(init="pretrained", calibration=Calibration()),
                  rule=SensitivityRule(headroom=1.5, fisher="output"),
                  distillation=Distillation(loss="cosine", label_free=True))
    """

    moves_widths = True

    def __init__(self, headroom: float = 1.5, path_fraction: float = 0.6, warmup: float = 0.1, beta: float = 0.9,
                 max_start: float = 0.9, structure_lr: float = 1e-4, start_step: int = 0,
                 fisher: str = "empirical", draws: int = 1) -> None:
        super().__init__(structure_lr, start_step)
        if fisher not in FISHERS:
            raise ValueError(f"fisher must be one of {', '.join(map(repr, FISHERS))}, got {fisher!r}")
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
            raise ValueError(f"draws must be an integer >= 1 (backward passes per step for fisher='output'), "
                             f"got {draws!r}")
        if isinstance(headroom, bool) or not isinstance(headroom, (int, float)) or not 1 <= headroom <= 10:
            raise ValueError(f"headroom must be a number in [1, 10] (the conversion's budget over the module's), "
                             f"got {headroom!r}")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        if isinstance(max_start, bool) or not isinstance(max_start, (int, float)) or not 0 < max_start <= 1:
            raise ValueError(f"max_start must be in (0, 1], got {max_start!r}")
        self.headroom = float(headroom)
        self.path_fraction = _fraction("path_fraction", path_fraction)
        self.warmup = _fraction("warmup", warmup)
        if self.warmup > self.path_fraction:
            raise ValueError(f"warmup ({self.warmup:g}) must not be after the end of the path "
                             f"(path_fraction {self.path_fraction:g})")
        self.beta = float(beta)
        self.max_start = float(max_start)
        self.path_steps = 0
        self.warmup_steps = 0
        self.steps = 0
        self.start_ratio: float | None = None
        self.fisher: dict[str, Tensor] = {}
        self.pending: dict[str, Tensor] = {}
        self.removed = 0
        self.fisher_kind = fisher
        self.draws = int(draws)
        self.captured: dict[str, tuple[Any, ...]] = {}
        self._hooks: list[Any] = []

    # ------------------------------------------------------------ lifecycle
    def conversion_budget(self, budget: float) -> float:
        return max(budget, min(self.headroom * budget, self.max_start))

    def start(self, phase1_steps: int) -> None:
        self.path_steps = int(round(self.path_fraction * phase1_steps))
        self.warmup_steps = int(round(self.warmup * phase1_steps))

    def attach(self, model: nn.Module) -> None:
        self.detach()
        if self.measuring:
            self._hooks = attach_probes(model, _OutputProbe if self.fisher_kind == "output" else _Probe, self)

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.captured = {}

    def observe_output(self, output: Any) -> None:
        """``fisher="output"``: backward ``z . output`` (``z ~ N(0, I)``, ``draws`` times) to the captured layer
        outputs and add each component's ``g_{k,b}^2`` to the pending sums.  ``z`` comes from a generator seeded by
        the step count, so a run and its resume draw the same; the training RNG is untouched."""
        captured, self.captured = self.captured, {}
        if self.fisher_kind != "output" or not captured or not isinstance(output, Tensor) or not output.requires_grad:
            return
        entries = list(captured.values())
        gen = torch.Generator(device=output.device).manual_seed(1_000_003 + self.steps)
        for _ in range(self.draws):
            z = torch.randn(output.shape, generator=gen, device=output.device, dtype=output.dtype)
            dys = torch.autograd.grad(output, [e[4] for e in entries], grad_outputs=z, retain_graph=True,
                                      allow_unused=True)
            for (probe, layer, x, index, _), dy in zip(entries, dys):
                if dy is not None:
                    probe.add(layer, x, index, dy, 1.0 / self.draws)

    @property
    def measuring(self) -> bool:
        """True while removals are still to come (the path has not ended)."""
        return self.steps < max(self.path_steps, self.warmup_steps + 1)

    def target(self) -> float | None:
        if self.start_ratio is None:
            return None
        return self._path()(max(self.steps - self.warmup_steps, 0))

    def _path(self) -> BudgetPath:
        return BudgetPath(self.start_ratio if self.start_ratio is not None else self.budget, self.budget,
                          max(self.path_steps - self.warmup_steps, 0))

    @torch.no_grad()
    def step(self, model: nn.Module, lr: float, active: bool = True) -> dict[str, float]:
        layers = gblr_layers(model, include_frozen=False)
        cost = layers_flops(m for _, m in layers)
        flops, dense, ratio = cost["flops"], cost["dense_flops"], cost["ratio"]
        if self.start_ratio is None:
            self.start_ratio = ratio
        self._fold(layers)
        self.steps += 1
        target = self._path()(max(self.steps - self.warmup_steps, 0))
        removed = 0
        if active and self.steps > self.warmup_steps and layers and ratio > target:
            removed = self._remove(layers, flops - target * dense)
        self.removed += removed
        if not self.measuring:
            self.detach()
        return {"flops_ratio": ratio, "target": target, "removed": float(removed)}

    def _fold(self, layers: list[tuple[str, GBLRLinear]]) -> None:
        """Add the step's measured sums (all-reduced over DDP ranks) to the decayed ``F``."""
        if not self._hooks and not self.pending:
            return
        step = [self.pending.get(n, torch.zeros(m.num_components, device=m.widths.device)) for n, m in layers]
        if step and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat(step)
            dist.all_reduce(flat)
            step = list(flat.split([s.numel() for s in step]))
        for (name, _), add in zip(layers, step):
            f = self.fisher.get(name)
            if f is None or f.shape != add.shape:
                f = self.fisher[name] = torch.zeros_like(add)
            elif f.device != add.device:  # restored from a checkpoint onto another device
                f = self.fisher[name] = f.to(add.device)
            f.mul_(self.beta).add_(add)
        self.pending = {}

    @torch.no_grad()
    def _remove(self, layers: list[tuple[str, GBLRLinear]], excess: float) -> int:
        """Remove the active components of least Fisher per FLOP until at least ``excess`` FLOPs are gone."""
        scores, costs, owner, index = [], [], [], []
        for i, (name, m) in enumerate(layers):
            w = grid_widths(m.widths, m.in_features, m.out_features)
            idx = ((w[0] > 0) & (w[1] > 0)).nonzero().flatten()
            if idx.numel() == 0:
                continue
            cost = (m.rank_per_component * (w[0] + w[1]))[idx].double()
            f = self.fisher.get(name)
            fisher = (f[idx].double().to(cost.device) if f is not None and f.shape[0] == m.num_components
                      else torch.zeros_like(cost))
            scores.append(fisher / cost)
            costs.append(cost)
            owner.append(torch.full_like(idx, i))
            index.append(idx)
        if not scores:
            return 0
        score, cost, who, idx = torch.cat(scores), torch.cat(costs), torch.cat(owner), torch.cat(index)
        order = torch.argsort(score, stable=True)
        freed = torch.cumsum(cost[order], 0)
        n = min(int(torch.searchsorted(freed, torch.tensor(excess, dtype=freed.dtype)).item()) + 1, order.numel())
        chosen = order[:n]
        for i in who[chosen].unique().tolist():
            m = layers[i][1]
            m.widths[:, idx[chosen[who[chosen] == i]]] = 0.0
            m.invalidate_cache()
        return n

    def drop_components(self, keeps: Mapping[str, Tensor], sizes: Mapping[str, int]) -> bool:
        """Supported: a removed component has width 0 on both sides and nothing widens it again; its rows of the
        Fisher sums go with it."""
        for store in (self.fisher, self.pending):
            for name, keep in keeps.items():
                f = store.get(name)
                if f is not None and f.shape[0] == sizes[name]:
                    store[name] = f.index_select(0, keep.to(f.device))
        return True

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "start_ratio": self.start_ratio, "removed": self.removed,
                "fisher": {k: v.detach().cpu().clone() for k, v in self.fisher.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        self.start_ratio = state.get("start_ratio")
        self.removed = int(state.get("removed", 0))
        self.fisher = {k: torch.as_tensor(v).clone() for k, v in dict(state.get("fisher", {})).items()}
        self.pending = {}

    def __getstate__(self) -> dict[str, Any]:  # hook handles and pending sums belong to one process's fit
        state = dict(self.__dict__)
        state["_hooks"], state["pending"], state["captured"] = [], {}, {}
        return state

    def describe(self) -> str:
        return f"headroom={self.headroom:g}, path_fraction={self.path_fraction:g}, fisher={self.fisher_kind}"

    def hint_for_projection(self) -> str:
        return "lower path_fraction or raise phase1_epochs"

    def init_args(self) -> dict[str, Any]:
        return {"headroom": self.headroom, "path_fraction": self.path_fraction, "warmup": self.warmup,
                "beta": self.beta, "max_start": self.max_start, **super().init_args(), "fisher": self.fisher_kind,
                "draws": self.draws}
