"""Budget-tracking structure learner (plain PyTorch, no Lightning).

The paper's rule (:func:`gsm_lightning.proximal.proximal_step`) soft-thresholds every width by
``lambda * lr`` while the FLOPs ratio is above the budget.  Measured on teacher-student tests it
rarely reaches the budget: Adam makes each width step ~``lr`` whatever the gradient, so a shrink of
``lambda * lr`` with ``lambda < 1`` never wins, and a uniform shift keeps whatever tiling the
initialisation had.  :class:`BudgetLearner` replaces it with three pieces, each switchable for
ablations:

1. **A target path for the FLOPs ratio** (``path_steps``): cosine from the ratio at the first step to
   the budget, then held.  After every real optimizer step, if the ratio is above the path, the widths
   are cut by ``tau * c`` with the smallest ``tau`` (bisection on the exact integer-grid cost) that
   meets it.  The budget is thus reached by learning, early, and held while the structure settles.
2. **Where the cut falls** (``cut_weighting``): ``c = side * energy`` per component and side.
   ``side`` is the side's FLOPs per unit width, ``r * n_side``, over its mean over the model
   (``"flops"``: a cut in FLOPs units, the proximal operator of the cost) or 1 (``"uniform"``).
   ``energy`` (``"energy"``, the default, on top of ``"flops"``) is ``clip(mean_e / e_k, 0.1, 100)``
   with ``e_k = ||m_in V_k|| ||m_out U_k||`` over the layer's active components: weak components are
   cut faster, which pulls toward a few strong wide components (what a low-rank target needs).  It
   starts at ``energy_start_step`` since energies at initialisation mean nothing.  ``"density"`` uses
   ``e_k`` over the component's FLOPs instead, so a wide component must earn its cost; ``cost_power`` between
   the two (``e_k`` over the FLOPs to that power) keeps the energy's pull toward a few strong components and
   stops it from cutting a narrow component only for being narrow.
3. **The width step** (``width_step``): ``"side_rms"`` moves the widths itself by
   ``lr * clip(g / rms_side, +-step_clip)`` with one running RMS of the gradient per layer side (beta2
   0.999), so a strong gradient moves its component further than a weak one; ``"adam"`` leaves them
   to the optimizer's structure group (per-coordinate Adam, as in the paper).

Locations are always wrapped into ``[0, 1)`` and stay with the optimizer.

``allocation="layer"`` holds every layer to the path on its own (one cut per layer) instead of the model as a
whole (one cut for all, the default ``"global"``): the structure within each layer is still learned, the share of
FLOPs each layer gets is not (every layer ends at the budget, as a uniform hand-picked allocation would).

``tracking="dual"`` replaces the exact cut by a soft threshold ``tau * c`` applied every step, with ``tau``
a dual variable (Lagrange multiplier) adapted by feedback, ``tau <- max(0, tau + dual_gain * (ratio -
target))``.  It is there for the ablation: it lags, overshoots and kills components (BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..core.flops import component_grid_cost, cut_threshold, grid_cost, np_component_grid_cost
from ..core.layer import GBLRLinear, gblr_layers
from ..core.masks import boxcar_sums

__all__ = ["BudgetPath", "BudgetLearner", "WidthStep", "CutWeighting", "Tracking", "WidthNorm", "Allocation"]

WidthStep = Literal["side_rms", "adam"]
CutWeighting = Literal["energy", "density", "density_energy", "flops", "uniform"]
Tracking = Literal["project", "dual"]
WidthNorm = Literal["side", "model"]
Allocation = Literal["global", "layer"]


@dataclass
class BudgetPath:
    """Target FLOPs ratio after ``step`` steps: cosine from ``start`` to ``budget`` over ``steps`` steps,
    then ``budget``."""

    start: float
    budget: float
    steps: int

    def __call__(self, step: int) -> float:
        if self.steps <= 0 or step >= self.steps:
            return self.budget
        if self.start <= self.budget:
            return self.budget
        t = max(step, 0) / self.steps
        return self.budget + (self.start - self.budget) * 0.5 * (1.0 + math.cos(math.pi * t))


class _Flat:
    """All non-frozen GBLR layers' widths as one ``(2, K_total)`` tensor, for a vectorised cost.  The layers'
    sizes (``n``, ``r``, dense cost) are built once per set of layers (``static``) and reused every step."""

    def __init__(self, layers: list[GBLRLinear], static: tuple[Tensor, Tensor, float] | None = None) -> None:
        self.layers = layers
        self.sizes = [m.num_components for m in layers]
        if static is None:
            static = _Flat.static(layers)
        self.n, self.r, self.dense = static
        self.side_mean: Tensor | None = None  # the cut's FLOPs unit when components were dropped (None: the mean here)
        self.widths = torch.cat([m.widths.detach() for m in layers], dim=1)
        self.widths = self.widths.to(torch.promote_types(self.widths.dtype, torch.float32)).clamp(0, 1)

    @staticmethod
    def static(layers: list[GBLRLinear]) -> tuple[Tensor, Tensor, float]:
        dev = layers[0].widths.device
        n = torch.cat([torch.tensor([[m.in_features], [m.out_features]], device=dev, dtype=torch.float32)
                       .expand(2, m.num_components) for m in layers], dim=1)
        r = torch.cat([torch.full((m.num_components,), float(m.rank_per_component), device=dev) for m in layers])
        return n, r, float(sum(m.dense_flops() for m in layers))

    @staticmethod
    def key(layers: list[GBLRLinear]) -> tuple:
        return tuple((id(m), m.num_components, m.in_features, m.out_features, m.rank_per_component, m.widths.device)
                     for m in layers)

    @functools.cached_property
    def segment(self) -> Tensor:
        """The index of every component's layer, ``(K_total,)``."""
        dev = self.widths.device
        return torch.repeat_interleave(torch.arange(len(self.sizes), device=dev), torch.tensor(self.sizes, device=dev))

    @functools.cached_property
    def layer_dense(self) -> Tensor:
        """Every layer's dense multiply-adds per token, ``(L,)``."""
        return torch.tensor([float(m.dense_flops()) for m in self.layers], device=self.widths.device)

    def ratio(self, widths: Tensor) -> float:
        return float(grid_cost(widths, self.n[0], self.n[1], self.r)) / self.dense

    def write(self, widths: Tensor) -> None:
        for m, w in zip(self.layers, widths.split(self.sizes, dim=1)):
            m.widths.copy_(w.to(m.widths.dtype))


def _column_energy(factors: list[Tensor]) -> Tensor:
    """``sum_r f[k, r, j]^2`` of same-shape ``(K, r, n)`` factors, stacked: ``(G, K, n)`` in float32 or wider."""
    f = torch.stack([t.detach() for t in factors])  # a new tensor: squared in place
    f = f.to(torch.promote_types(f.dtype, torch.float32)).square_()
    return f[:, :, 0] if f.shape[2] == 1 else f.sum(2)


class BudgetLearner:
    """Width updates and budget-tracking cuts for every non-frozen GBLR layer of a model.

    Call :meth:`step` once per real optimizer step, after it (``GSMModule`` does so from an optimizer
    step post-hook).  With ``width_step="side_rms"`` the widths must not be moved by the optimizer
    (``GSMModule`` gives them a group with ``lr=0`` so that gradient clearing, unscaling and clipping
    still apply to them).

    Args:
        budget: target FLOPs ratio (structured over dense multiply-adds, FLOPs-weighted over layers).
        path_steps: steps of the cosine path from the starting ratio to the budget (0: the budget at once).
        width_step: ``"side_rms"`` or ``"adam"`` (see the module docstring).
        cut_weighting: ``"energy"``, ``"density"``, ``"density_energy"`` (density along the path, energy once
            the budget is held), ``"flops"`` or ``"uniform"``.
        energy_start_step: first step at which the energy weighting applies.
        energy_clip: bounds of the energy weight.
        energy_power: the energy weight is ``clip(mean_e / e_k, *energy_clip) ** energy_power``, clipped again
            (default 2: weak components are pulled toward zero harder than linearly; 1 was the default before).
        cost_power: with ``cut_weighting="energy"`` (and the energy part of ``"density_energy"``), ``e_k`` is the
            component's energy over its FLOPs (``w_in + w_out`` grid units) to this power: 0 the plain energy (the
            default before 2026-12-07), 1 the ``"density"`` weighting.  Between them (default 0.3) a narrow component
            (a block) is not cut first for holding less energy than a wide one, and the cut still concentrates on the
            weak: it recovers a block-diagonal + low-rank teacher that 0 misses, is level on Fashion-MNIST, and lets
            2 of 10 seeds of a plain low-rank teacher end split (1 of 10 at 0; BENCHMARKS.md, structure recovery).
        step_clip: bound of the normalised width step, in units of ``lr``.
        width_lr_scale: the ``side_rms`` width step uses ``width_lr_scale * lr`` (locations keep ``lr``).
        beta2: decay of the per-side mean-square gradient.
        tracking: ``"project"`` (exact cut onto the path) or ``"dual"`` (feedback-adapted soft threshold).
        dual_gain: feedback gain of ``tracking="dual"`` (threshold change per step per unit of ratio error).
        width_norm: what the ``side_rms`` step divides the gradient by: ``"side"`` (one running RMS per layer side:
            every side moves at the same rate whatever its gradient's scale, the default) or ``"model"`` (the
            gradient per FLOP, ``g / (r n_side)``, over one running RMS for the whole model: a side whose widths buy
            more loss per FLOP moves faster than another, so FLOPs can move between layers by measured gain).
        allocation: ``"global"`` (the default: one cut for the model, so the learner also chooses how the FLOPs are
            shared between layers) or ``"layer"`` (every layer is cut onto the path on its own and ends at the
            budget: the within-layer structure is learned, the allocation is uniform).  ``"layer"`` needs
            ``tracking="project"``.
    """

    def __init__(
        self,
        budget: float,
        path_steps: int,
        width_step: WidthStep = "side_rms",
        cut_weighting: CutWeighting = "energy",
        energy_start_step: int = 0,
        energy_clip: tuple[float, float] = (0.1, 100.0),
        energy_power: float = 2.0,
        step_clip: float = 3.0,
        width_lr_scale: float = 1.0,
        beta2: float = 0.999,
        eps: float = 1e-12,
        tracking: Tracking = "project",
        dual_gain: float = 0.01,
        width_norm: WidthNorm = "side",
        cost_power: float = 0.3,
        allocation: Allocation = "global",
    ) -> None:
        if not 0 < budget <= 1:
            raise ValueError(f"budget must be in (0, 1], got {budget}")
        if width_step not in ("side_rms", "adam"):
            raise ValueError(f"unknown width_step {width_step!r}; expected 'side_rms' or 'adam'")
        if cut_weighting not in ("energy", "density", "density_energy", "flops", "uniform"):
            raise ValueError(f"unknown cut_weighting {cut_weighting!r}; expected 'energy', 'density', "
                             "'density_energy', 'flops' or 'uniform'")
        if width_norm not in ("side", "model"):
            raise ValueError(f"unknown width_norm {width_norm!r}; expected 'side' or 'model'")
        if tracking not in ("project", "dual"):
            raise ValueError(f"unknown tracking {tracking!r}; expected 'project' or 'dual'")
        if allocation not in ("global", "layer"):
            raise ValueError(f"unknown allocation {allocation!r}; expected 'global' or 'layer'")
        if allocation == "layer" and tracking != "project":
            raise ValueError("allocation='layer' cuts each layer exactly onto the path; it needs tracking='project' "
                             f"(got tracking={tracking!r})")
        if not dual_gain > 0:
            raise ValueError(f"dual_gain must be > 0, got {dual_gain}")
        if path_steps < 0 or energy_start_step < 0:
            raise ValueError(f"path_steps and energy_start_step must be >= 0, got {path_steps}, {energy_start_step}")
        if not 0 < energy_clip[0] <= 1 <= energy_clip[1]:
            raise ValueError(f"energy_clip must be (low <= 1, high >= 1) with low > 0, got {energy_clip}")
        if isinstance(energy_power, bool) or not isinstance(energy_power, (int, float)) or not energy_power > 0:
            raise ValueError(f"energy_power must be a number > 0, got {energy_power!r}")
        if isinstance(cost_power, bool) or not isinstance(cost_power, (int, float)) or not 0 <= cost_power <= 1:
            raise ValueError(f"cost_power must be a number in [0, 1] (0: energy, 1: energy per FLOP), got {cost_power!r}")
        if not step_clip > 0 or not 0 <= beta2 < 1 or not width_lr_scale > 0:
            raise ValueError(f"step_clip and width_lr_scale must be > 0 and beta2 in [0, 1), got {step_clip}, "
                             f"{width_lr_scale}, {beta2}")
        self.width_lr_scale = float(width_lr_scale)
        self.width_norm = width_norm
        self.budget = float(budget)
        self.allocation = allocation
        self.path_steps = int(path_steps)
        self.width_step = width_step
        self.cut_weighting = cut_weighting
        self.energy_start_step = int(energy_start_step)
        self.energy_clip = (float(energy_clip[0]), float(energy_clip[1]))
        self.energy_power = float(energy_power)
        self.cost_power = float(cost_power)
        self.step_clip = float(step_clip)
        self.beta2 = float(beta2)
        self.eps = float(eps)
        self.tracking = tracking
        self.dual_gain = float(dual_gain)
        self.dual_tau = 0.0
        self.steps = 0
        self.start_ratio: float | None = None
        self.mean_sq: dict[str, Tensor] = {}
        # components a layer had before any was dropped (drop_components): the width step's mean square and the cut's
        # FLOPs unit are over those, so that dropping empty components changes neither
        self.slots: dict[str, int] = {}
        self._static: tuple[tuple, tuple[Tensor, Tensor, float]] | None = None
        self._side_mean: tuple[tuple, Tensor] | None = None

    @property
    def moves_widths(self) -> bool:
        """True when this learner (not the optimizer) applies the width gradient step."""
        return self.width_step == "side_rms"

    def target(self, step: int | None = None) -> float:
        """The path's target ratio at ``step`` (default: the current step)."""
        start = self.budget if self.start_ratio is None else self.start_ratio
        return BudgetPath(start, self.budget, self.path_steps)(self.steps if step is None else step)

    # --------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, model: nn.Module, lr: float, cut: bool = True) -> dict[str, float]:
        """One update after a real optimizer step: width step (``side_rms``), cut onto the path (when
        ``cut``), locations wrapped.  ``lr`` is the structure group's current learning rate.
        Returns ``{"flops_ratio": before the cut, "target", "cut": tau, "shrink": 1.0 if cut}``."""
        named = gblr_layers(model, include_frozen=False)
        if not named:
            return {}
        layers = [m for _, m in named]
        for layer in layers:
            layer.locations.copy_(torch.remainder(layer.locations, 1.0))
        key = _Flat.key(layers)
        if self._static is None or self._static[0] != key:
            self._static = (key, _Flat.static(layers))
        flat = _Flat(layers, self._static[1])
        flat.side_mean = self._nominal_side_mean(named, key)
        if self.moves_widths and self.width_norm == "model":
            self._model_width_step(named, lr * self.width_lr_scale)
            flat = _Flat(layers, self._static[1])
            flat.side_mean = self._nominal_side_mean(named, key)
        elif self.moves_widths:
            flat.widths = self._side_width_step(named, flat, lr * self.width_lr_scale)
        ratio = flat.ratio(flat.widths)
        if self.start_ratio is None:
            self.start_ratio = max(ratio, self.budget)
        target = self.target()
        tau = 0.0
        if cut and self.tracking == "dual":
            self.dual_tau = max(0.0, self.dual_tau + self.dual_gain * (ratio - target))
            tau = self.dual_tau
        if cut and self.allocation == "layer":
            layer_ratio = self._layer_ratios(flat, flat.widths)
            if bool((layer_ratio > target).any()):
                weights = self._cut_weights(layers, flat)
                taus = self._solve_layer_taus(flat, weights, target, layer_ratio)
                flat.widths = (flat.widths - taus.index_select(0, flat.segment) * weights).clamp(0, 1)
                tau = float(taus.max())
        elif cut and (tau > 0 or (self.tracking == "project" and ratio > target)):
            weights = self._cut_weights(layers, flat)
            if self.tracking == "project":
                tau = self._solve_tau(flat, weights, target)
            flat.widths = (flat.widths - tau * weights).clamp(0, 1)
        flat.write(flat.widths)
        self.steps += 1
        return {"flops_ratio": ratio, "target": target, "cut": tau, "shrink": float(tau > 0)}

    def drop_components(self, keeps: Mapping[str, Tensor], sizes: Mapping[str, int]) -> None:
        """Layers ``keeps`` (name -> indices kept of ``sizes[name]`` components) are about to drop their components
        empty on both sides: remember how many they had (:attr:`slots`), so that the width step's mean square and the
        cut's FLOPs unit stay what they were (the dropped components' widths and gradients are 0)."""
        for name in keeps:
            self.slots.setdefault(name, int(sizes[name]))

    def _nominal_side_mean(self, named: list[tuple[str, GBLRLinear]], key: tuple) -> Tensor | None:
        """The mean FLOPs per unit width of a component side over the model's components before any was dropped
        (the same tensor mean as with them), or None when none was (then the cut takes the mean itself)."""
        counts = tuple(self.slots.get(name, m.num_components) for name, m in named)
        if all(c == m.num_components for c, (_, m) in zip(counts, named)):
            return None
        if self._side_mean is None or self._side_mean[0] != (key, counts):
            dev = named[0][1].widths.device
            cost = torch.cat([torch.tensor([[float(m.in_features)], [float(m.out_features)]], device=dev).expand(2, c)
                              * float(m.rank_per_component) for c, (_, m) in zip(counts, named)], dim=1)
            self._side_mean = ((key, counts), cost.mean())
        return self._side_mean[1]

    def _side_width_step(self, named: list[tuple[str, GBLRLinear]], flat: _Flat, lr: float) -> Tensor:
        """``width_norm="side"``, all layers at once: ``w -= lr * clip(g / rms_side, +-step_clip)`` with one running
        mean square of the gradient per layer side (a layer without a gradient keeps its widths and its state)."""
        with_grad = [(i, name, m) for i, (name, m) in enumerate(named) if m.widths.grad is not None]
        if not with_grad:
            return flat.widths
        dev = flat.widths.device
        grads = [m.widths.grad.detach().to(flat.widths.dtype) for _, _, m in with_grad]
        sizes = torch.tensor([g.shape[1] for g in grads], device=dev)
        segment = torch.repeat_interleave(torch.arange(len(grads), device=dev), sizes)
        g = torch.cat(grads, dim=1)
        slots = sizes if not self.slots else torch.tensor(
            [self.slots.get(name, int(gr.shape[1])) for (_, name, _), gr in zip(with_grad, grads)], device=dev)
        sq = torch.zeros(2, len(grads), device=dev, dtype=g.dtype).index_add_(1, segment, g.pow(2)) / slots
        ms = torch.stack([self.mean_sq[name].to(device=dev, dtype=torch.float32) if name in self.mean_sq
                          else torch.zeros(2, device=dev) for _, name, _ in with_grad], dim=1)
        ms = ms * self.beta2 + (1 - self.beta2) * sq.float()
        for j, (_, name, _) in enumerate(with_grad):
            self.mean_sq[name] = ms[:, j]
        rms = (ms / (1 - self.beta2 ** (self.steps + 1))).sqrt().clamp_min(self.eps)
        step = (g / rms.to(g.dtype).index_select(1, segment)).clamp(-self.step_clip, self.step_clip)
        if len(with_grad) == len(named):
            return (flat.widths - lr * step).clamp(0, 1)
        starts = [0, *itertools.accumulate(flat.sizes)]
        columns = torch.cat([torch.arange(starts[i], starts[i + 1], device=dev) for i, _, _ in with_grad])
        return flat.widths.index_add(1, columns, -lr * step).clamp(0, 1)

    def _model_width_step(self, named: list[tuple[str, GBLRLinear]], lr: float) -> None:
        """``width_norm="model"``: ``w -= lr * clip(p / rms, +-step_clip)`` with ``p = g / (r n_side)`` the gradient
        per FLOP of each side and one running RMS of ``p`` over every width of the model."""
        layers = [m for _, m in named]
        per_flop = []
        for layer in layers:
            g = layer.widths.grad
            if g is None:
                per_flop.append(None)
                continue
            n = torch.tensor([layer.in_features, layer.out_features], device=g.device, dtype=torch.float32)
            per_flop.append(g.detach().float() / (layer.rank_per_component * n)[:, None])
        present = [p for p in per_flop if p is not None]
        if not present:
            return
        sq = torch.cat([p.flatten() for p in present]).pow(2)
        if self.slots:  # over the components before any was dropped (theirs were 0)
            sq = sq.sum() / (2 * sum(self.slots.get(n, m.num_components) for (n, m), p in zip(named, per_flop)
                                     if p is not None))
        else:
            sq = sq.mean()
        ms = self.mean_sq.get("__model__")
        ms = torch.zeros((), device=sq.device) if ms is None else ms.to(sq.device)
        ms = ms * self.beta2 + (1 - self.beta2) * sq
        self.mean_sq["__model__"] = ms
        rms = (ms / (1 - self.beta2 ** (self.steps + 1))).sqrt().clamp_min(self.eps)
        for layer, p in zip(layers, per_flop):
            if p is not None:
                step = (p / rms).clamp(-self.step_clip, self.step_clip)
                layer.widths.sub_((lr * step).to(layer.widths.dtype)).clamp_(0, 1)

    def _cut_weights(self, layers: list[GBLRLinear], flat: _Flat) -> Tensor:
        if self.cut_weighting == "uniform":
            side = torch.ones_like(flat.widths)
        else:
            cost = flat.n * flat.r  # FLOPs per unit width fraction of each side
            side = cost / (cost.mean() if flat.side_mean is None else flat.side_mean)
        if self.cut_weighting in ("flops", "uniform") or self.steps < self.energy_start_step:
            return side
        lo, hi = self.energy_clip
        mode = self.cut_weighting
        if mode == "density_energy":  # energy per FLOP along the path, energy once the budget is held
            mode = "density" if self.steps < self.path_steps else "energy"
        comp = self._energy_weights(layers, flat, lo, hi, self.cost_power if mode == "energy" else 1.0)
        if self.energy_power != 1.0:
            comp = comp.pow(self.energy_power).clamp(lo, hi)
        return side * comp

    @staticmethod
    def _energy_weights(layers: list[GBLRLinear], flat: _Flat, lo: float, hi: float, cost_power: float = 0.0) -> Tensor:
        """``clip(mean_e / e_k, lo, hi)`` per component, side by side as in ``flat``, with ``e_k`` the product of the
        masked factor norms (boxcars of ``flat``'s widths) over the component's FLOPs to the power ``cost_power``, and
        ``mean_e`` the mean over the layer's active components (``hi`` for inactive ones).  Layers of one shape are
        computed together (one stack of their factors per shape, not a dozen small ops per layer)."""
        widths = flat.widths.split(flat.sizes, dim=1)
        groups: dict[tuple, list[int]] = {}
        for i, m in enumerate(layers):
            key = (m.in_features, m.out_features, m.num_components, m.rank_per_component, m.weight_in.device)
            groups.setdefault(key, []).append(i)
        out: list[Tensor | None] = [None] * len(layers)
        for (n_in, n_out, *_), index in groups.items():
            w = torch.stack([widths[i] for i in index])  # (G, 2, K)
            loc = torch.stack([layers[i].locations.detach() for i in index])
            e_in = boxcar_sums(_column_energy([layers[i].weight_in for i in index]), w[:, 0], loc[:, 0]).sqrt()
            e_out = boxcar_sums(_column_energy([layers[i].weight_out for i in index]), w[:, 1], loc[:, 1]).sqrt()
            energy = e_in * e_out  # (G, K)
            grid_in, grid_out = (torch.round(w[:, j].clamp(0, 1) * n) for j, n in ((0, n_in), (1, n_out)))
            if cost_power:
                energy = energy / (grid_in + grid_out).clamp_min(1).to(energy.dtype) ** cost_power
            active = (grid_in > 0) & (grid_out > 0) & (energy > 0)
            mean = (energy * active).sum(-1, keepdim=True) / active.sum(-1, keepdim=True).clamp_min(1)
            weight = torch.where(active, (mean / energy).clamp(lo, hi), torch.full_like(energy, hi))
            for row, i in zip(weight, index):
                out[i] = row
        return torch.cat(out)

    @staticmethod
    def _solve_tau(flat: _Flat, weights: Tensor, target: float, iters: int = 40) -> float:
        """Smallest ``tau`` (to bisection precision) with ``ratio(widths - tau * weights) <= target``."""
        return cut_threshold(flat.widths, weights, flat.n[0], flat.n[1], flat.r, lambda cost: cost / flat.dense <= target,
                             iters=iters)

    @staticmethod
    def _layer_ratios(flat: _Flat, widths: Tensor) -> Tensor:
        """Every layer's FLOPs ratio at ``widths`` (``flat``'s layout, batched over leading dims): ``(..., L)``."""
        cost = component_grid_cost(widths, flat.n[0], flat.n[1], flat.r)
        per_layer = torch.zeros(*cost.shape[:-1], len(flat.sizes), device=cost.device, dtype=cost.dtype)
        return per_layer.index_add_(-1, flat.segment, cost) / flat.layer_dense.to(cost.dtype)

    @staticmethod
    def _solve_layer_taus(flat: _Flat, weights: Tensor, target: float, layer_ratio: Tensor,
                          iters: int = 40) -> Tensor:
        """``allocation="layer"``: for every layer above ``target``, the smallest ``tau`` (to bisection precision)
        with the layer's ratio at ``widths - tau * weights`` at most ``target``; 0 for the others.  All layers are
        bisected together, ``(L,)``, in ``widths``' dtype (each midpoint rounded to it).

        The ``iters`` rounds are small host computations, so they run in NumPy (:func:`np_component_grid_cost`, then
        the per-layer ratios of :meth:`_layer_ratios` in the same dtype); the per-layer sums of the integer-valued
        costs are exact."""
        w, c = flat.widths.detach().cpu().numpy(), weights.detach().to(flat.widths.dtype).cpu().numpy()
        dtype = w.dtype.type
        n_in, n_out, r = (t.detach().cpu().numpy().astype(w.dtype) for t in (flat.n[0], flat.n[1], flat.r))
        dense = flat.layer_dense.detach().cpu().numpy().astype(w.dtype)
        starts = np.concatenate([[0], np.cumsum(flat.sizes)[:-1]])
        segment = np.repeat(np.arange(len(flat.sizes)), flat.sizes)
        big = np.where(c > 0, w / np.maximum(c, dtype(1e-30)), dtype(0)).max(0)
        hi = np.maximum.reduceat(big, starts) + dtype(1e-6)
        lo = np.zeros_like(hi)
        limit = dtype(target)

        def fits(mid: np.ndarray) -> np.ndarray:
            cost = np_component_grid_cost(w - mid[segment] * c, n_in, n_out, r)
            return (np.add.reduceat(cost.astype(np.float64), starts).astype(w.dtype) / dense) <= limit

        for _ in range(iters):
            mid = dtype(0.5) * (lo + hi)
            ok = fits(mid)
            hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid)
        hi_t = torch.from_numpy(hi).to(flat.widths.device)
        return torch.where(layer_ratio > target, hi_t, torch.zeros_like(hi_t))

    # ---------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "start_ratio": self.start_ratio, "dual_tau": self.dual_tau,
                "mean_sq": {k: v.detach().cpu().clone() for k, v in self.mean_sq.items()}, "slots": dict(self.slots)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        self.start_ratio = state.get("start_ratio")
        self.dual_tau = float(state.get("dual_tau", 0.0))
        self.mean_sq = {k: v.clone() for k, v in state.get("mean_sq", {}).items()}
        self.slots = {k: int(v) for k, v in state.get("slots", {}).items()}

    def __repr__(self) -> str:
        return (f"BudgetLearner(budget={self.budget:g}, path_steps={self.path_steps}, width_step={self.width_step!r}, "
                f"cut_weighting={self.cut_weighting!r}, energy_start_step={self.energy_start_step}"
                + (f", allocation={self.allocation!r})" if self.allocation != "global" else ")"))
