"""Regrowth: windows the budget learner left short grow back along their edges, where the loss gradient asks for it.

The budget learner's cut only shrinks widths, and a width step only grows a window where the factor entries just
outside it already help, yet those entries get no gradient while they are masked out.  So a window cut too short
early in phase 1 stays short, and the FLOPs it gave up stay unused or go to a weak extra component.  On the
low-rank teacher of the structure-recovery benchmark this is what 5 of 10 seeds did: one or two of the 8 components
ended a few units short of full width (a FLOPs ratio of 0.122-0.125 against the budget 0.125), and the relative error
was 1e-4 to 3e-2 instead of the 4e-7 of a fixed low-rank student (BENCHMARKS.md).

:class:`Regrowth` adds the step that is missing, after RigL (Evci et al., 2020: drop by magnitude, grow by gradient).
Over the last part of phase 1 it measures, for every active component, the loss gradient at every entry of its
masked factors, ``G_in[k] = sum_t (U_k dy_t) x_t`` and ``G_out[k] = sum_t (V_k x_t) dy_t`` (``x`` the layer's input,
``dy`` the loss gradient at its output; inside the window this is the factor's own gradient, outside it the gradient
an entry there would get).  Every ``interval`` it grows the windows edge by edge, the next entry of largest
``|G|^2`` per FLOP first, up to the budget, and zeroes the factor entries it adds, so the layer's function does not
change.  With ``overshoot > 0`` it grows above the budget (by ``overshoot``, annealed to 0 by a half cosine) and the
learner's next cut takes the ratio back, mostly from weak components (its energy weighting): a drop by energy and a
growth by gradient, which also frees FLOPs held by a weak component.  At the phase switch :meth:`Regrowth.finish`
grows into whatever the last cut and the integer grid left unused, up to the budget exactly.

Plain PyTorch; :class:`~gsm_lightning.learn.rules.BudgetRule` owns one (on by default, ``overshoot=0``).
"""

from __future__ import annotations

import functools
import heapq
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..core.flops import grid_widths, layers_flops
from ..core.layer import GBLRLinear, gblr_layers
from ..core.masks import boxcar_mask
from .probe import GradientProbe, attach_probes

__all__ = ["Regrowth", "edge_gradients", "grow_edges"]


@torch.no_grad()
def edge_gradients(layer: GBLRLinear, x: Tensor, dy: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """The loss gradient at every entry of the masked factors of components ``index`` (``(K',)``), from the layer's
    input ``x`` (``(..., in)``) and the loss gradient at its output ``dy`` (``(..., out)``): ``(K', r, in)`` and
    ``(K', r, out)``.  Inside a window it equals the gradient of the masked factor; outside it is the gradient an
    entry there would get."""
    v, u = layer.masked_factors()
    r = layer.rank_per_component
    rows = (index[:, None] * r + torch.arange(r, device=index.device)).flatten()
    v, u = v.detach()[rows], u.detach()[rows]
    x = x.detach().reshape(-1, x.shape[-1]).to(v.dtype)
    dy = dy.detach().reshape(-1, dy.shape[-1]).to(u.dtype)
    g_out = (x @ v.t()).t() @ dy  # (K'r, out): d/d(masked U_k) = sum_t (V_k x_t) dy_t
    g_in = (dy @ u.t()).t() @ x  # (K'r, in): d/d(masked V_k) = sum_t (U_k dy_t) x_t
    return g_in.view(-1, r, layer.in_features), g_out.view(-1, r, layer.out_features)


@torch.no_grad()
def grow_edges(layers: list[GBLRLinear], grow_flops: float, scores: list[tuple[Tensor, Tensor] | None]) -> float:
    """Grow the windows of the active components of ``layers`` edge by edge, by at most ``grow_flops`` multiply-adds
    per token, the next entry of largest score per FLOP first; zero the factor entries added.  Returns the FLOPs
    added.

    ``scores[i]``: ``(K, in)`` and ``(K, out)`` non-negative scores of layer ``i``'s entries (None: the layer does not
    grow).  A window grows at either end (cyclically), one grid step at a time, up to its whole side; components
    empty on a side stay empty.  Widths and locations end on the grid."""
    # Host lists, not tensor element reads: the loop below runs once per grid step grown and once per candidate
    # left when the room is spent (about 10 us per tensor read against 0.1 us per list read).
    heap: list[tuple[float, int, int, int, int, int]] = []
    state: list[dict[str, Any]] = []
    min_r = math.inf
    for i, m in enumerate(layers):
        w = grid_widths(m.widths, m.in_features, m.out_features).cpu()
        loc = m.int_locations().cpu()
        st = {"w": w.tolist(), "loc": loc.tolist(), "w0": w, "loc0": loc, "sides": None}
        state.append(st)
        if scores[i] is None:
            continue
        st["sides"] = sides = [scores[i][0].double().cpu(), scores[i][1].double().cpu()]
        r = m.rank_per_component
        min_r = min(min_r, r)
        live = ((w[0] > 0) & (w[1] > 0)).nonzero().flatten()
        for s, n in ((0, m.in_features), (1, m.out_features)):
            k = live[w[s, live] < n]  # a window already spanning its side does not grow
            if not len(k):
                continue
            before = (loc[s, k] - 1) % n
            after = (loc[s, k] + w[s, k]) % n
            for d, pos in ((-1, before), (1, after)):
                vals = sides[s][k, pos].tolist()
                heap += [(-v / r, i, kk, s, d, pp) for v, kk, pp in zip(vals, k.tolist(), pos.tolist())]
    heapq.heapify(heap)  # the entries are distinct tuples: the pops do not depend on the insertion order
    added = 0
    while heap and added + min_r <= grow_flops:  # past that no layer's next entry fits
        _, i, k, s, d, _ = heapq.heappop(heap)
        m, st = layers[i], state[i]
        w, loc = st["w"][s], st["loc"][s]
        n = (m.in_features, m.out_features)[s]
        r = m.rank_per_component
        if w[k] >= n or added + r > grow_flops:
            continue
        added += r
        if d < 0:
            loc[k] = (loc[k] - 1) % n
        w[k] += 1
        if w[k] < n:
            nxt = (loc[k] - 1) % n if d < 0 else (loc[k] + w[k]) % n
            heapq.heappush(heap, (-float(st["sides"][s][k, nxt]) / r, i, k, s, d, nxt))
    for st in state:
        st["w"] = torch.tensor(st["w"], dtype=st["w0"].dtype)
        st["loc"] = torch.tensor(st["loc"], dtype=st["loc0"].dtype)
    for m, st in zip(layers, state):
        if torch.equal(st["w"], st["w0"]) and torch.equal(st["loc"], st["loc0"]):
            continue
        dev = m.widths.device
        for s, (factor, n) in enumerate(((m.weight_in, m.in_features), (m.weight_out, m.out_features))):
            new = (boxcar_mask(st["w"][s].to(dev), st["loc"][s].to(dev), n, torch.bool)
                   & ~boxcar_mask(st["w0"][s].to(dev), st["loc0"][s].to(dev), n, torch.bool))
            factor.masked_fill_(new.unsqueeze(1), 0.0)
        grid = torch.tensor([[m.in_features], [m.out_features]], dtype=torch.float32)
        m.widths.copy_((st["w"].float() / grid).to(dev))
        m.locations.copy_((st["loc"].float() / grid).to(dev))
        m.invalidate_cache()
    return float(added)


class _Probe(GradientProbe):
    """Adds the entries' gradients of the active components to the regrowth's sums.

    When the layer's forward ran the full product (``GBLRLinear.keep_factors``: the live components' masked factors
    ``v``, ``u`` used over their whole sides), those gradients are the gradients of ``v`` and ``u`` that the loss's
    backward computes anyway: hooks on them add their active rows, at no extra product.  Otherwise (a windowed or
    split product, which leaves the entries outside the windows without a gradient) :func:`edge_gradients` computes
    them from the layer's input and output gradient (two products per side)."""

    _found: tuple[Tensor | None, Tensor, Tensor] | None = None

    def __call__(self, layer: GBLRLinear, inputs: tuple[Any, ...], output: Any) -> None:
        self._found, layer._last_factors = layer._last_factors, None  # taken on every forward: no graph kept
        try:
            super().__call__(layer, inputs, output)
        finally:
            self._found = None

    def capture(self, layer: GBLRLinear, x: Tensor, index: Tensor, output: Tensor) -> None:
        found = self._found
        if found is None or not (found[1].requires_grad and found[2].requires_grad):
            return super().capture(layer, x, index, output)
        live, v, u = found
        r = layer.rank_per_component
        pos = index if live is None else torch.searchsorted(live, index)  # the active rows among the live ones
        rows = (pos[:, None] * r + torch.arange(r, device=pos.device)).flatten()
        v.register_hook(functools.partial(self._add_side, layer, index, rows, 0))
        u.register_hook(functools.partial(self._add_side, layer, index, rows, 1))

    def _add_side(self, layer: GBLRLinear, index: Tensor, rows: Tensor, side: int, grad: Tensor) -> None:
        n = (layer.in_features, layer.out_features)[side]
        rows_of_active = grad.detach()[rows].view(-1, layer.rank_per_component, n)
        self._sums(layer, grad.device)[side].index_add_(0, index, rows_of_active.float())

    def add(self, layer: GBLRLinear, x: Tensor, index: Tensor, dy: Tensor) -> None:
        g_in, g_out = edge_gradients(layer, x, dy, index)
        sums = self._sums(layer, g_in.device)
        sums[0].index_add_(0, index, g_in.float())
        sums[1].index_add_(0, index, g_out.float())

    def _sums(self, layer: GBLRLinear, device: torch.device) -> tuple[Tensor, Tensor]:
        sums = self.owner.sums.get(self.name)
        k, r = layer.num_components, layer.rank_per_component
        if sums is not None and sums[0].device != device:  # restored from a checkpoint onto another device
            sums = self.owner.sums[self.name] = (sums[0].to(device), sums[1].to(device))
        if sums is None or sums[0].shape[0] != k:
            sums = self.owner.sums[self.name] = (
                torch.zeros(k, r, layer.in_features, device=device, dtype=torch.float32),
                torch.zeros(k, r, layer.out_features, device=device, dtype=torch.float32))
        return sums


class Regrowth:
    """Grow short windows back by the gradient over the last part of phase 1 (see the module docstring).

    Args:
        start: part of phase 1 after which windows grow (the rule's path must have reached the budget by then:
            :class:`~gsm_lightning.learn.rules.BudgetRule` starts it at ``max(start, path_fraction)``).
        interval: part of phase 1 between two growths; the gradients are summed over the interval before each.
        overshoot: the first growth takes the FLOPs ratio to ``(1 + overshoot) * budget``, later ones to less (annealed
            to 0 at the end of phase 1 by a half cosine); the rule's next cut brings it back, weak components first.
            0 (default) only fills what the cuts left unused (BENCHMARKS.md, structure recovery, compares 0 and
            0.05).
        measure: the part of each interval, at its end, whose gradients are summed (1: all of it).  The
            measurement costs about two extra products of the active components per layer on each measured step
            (BENCHMARKS.md, whole-fit wall-clock, has what it costs the quickstart).

    Under DDP the sums are all-reduced before each growth, so
    every rank grows the same windows.  Eager mode only (the hooks read the structure on the host).

    Examples::

        GSMModule(backbone, budget=0.3, rule=BudgetRule(regrowth=Regrowth(start=0.7, overshoot=0.1)))
    """

    _layers: list[GBLRLinear] = []  # (a Regrowth pickled before the attribute existed)

    def __init__(self, start: float = 0.65, interval: float = 0.03, overshoot: float = 0.0,
                 measure: float = 0.25) -> None:
        for name, value in (("start", start), ("interval", interval)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be a fraction of phase 1 in [0, 1], got {value!r}")
        if interval <= 0:
            raise ValueError(f"interval must be > 0 (a fraction of phase 1 between two growths), got {interval!r}")
        if isinstance(measure, bool) or not isinstance(measure, (int, float)) or not 0 < measure <= 1:
            raise ValueError(f"measure must be in (0, 1] (the part of each interval, before its growth, whose "
                             f"gradients are summed), got {measure!r}")
        self.measure = float(measure)
        if isinstance(overshoot, bool) or not isinstance(overshoot, (int, float)) or not 0 <= overshoot <= 1:
            raise ValueError(f"overshoot must be in [0, 1] (the growth's excess over the budget, as a fraction of "
                             f"it), got {overshoot!r}")
        self.start, self.interval, self.overshoot = float(start), float(interval), float(overshoot)
        self.start_step = self.interval_steps = self.end_step = self.measure_steps = 0
        self.steps = 0
        self.grown = 0.0
        self.sums: dict[str, tuple[Tensor, Tensor]] = {}
        self._hooks: list[Any] = []
        self._layers: list[GBLRLinear] = []  # the layers whose forwards keep their factors for the probes

    # ------------------------------------------------------------ lifecycle
    def begin(self, phase1_steps: int, earliest: float = 0.0) -> None:
        """The schedule in optimizer steps, for ``phase1_steps`` steps of phase 1; growth not before ``earliest``."""
        self.end_step = int(phase1_steps)
        self.interval_steps = max(1, int(round(self.interval * phase1_steps)))
        self.start_step = int(round(max(self.start, earliest) * phase1_steps))
        self.measure_steps = max(1, int(round(self.measure * self.interval_steps)))

    @property
    def measuring(self) -> bool:
        """True on the last ``measure`` of each interval before a growth (the next optimizer step is
        ``steps + 1``), from one interval before the first growth to the end of phase 1 (whose remainder feeds the
        switch's growth)."""
        if self.end_step <= 0 or not self.start_step - self.interval_steps <= self.steps < self.end_step:
            return False
        until_growth = (self.start_step - self.steps - 1) % self.interval_steps  # steps after the next one
        return until_growth < self.measure_steps or self.end_step - self.steps <= self.measure_steps

    def attach(self, model: nn.Module) -> None:
        self.detach()
        if self.end_step > 0 and self.steps < self.end_step:
            self._hooks = attach_probes(model, _Probe, self)
            self._layers = [m for _, m in gblr_layers(model, include_frozen=False)]
            for m in self._layers:
                m.keep_factors = True

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for m in self._layers:
            m.keep_factors, m._last_factors = False, None
        self._layers = []

    @torch.no_grad()
    def step(self, model: nn.Module, budget: float, active: bool = True, per_layer: bool = False) -> float:
        """After the rule's own step: count it, and grow when one is due (and ``active``).  Returns the FLOPs ratio
        added.  ``per_layer``: every layer grows into its own room under ``budget`` (a rule that holds each layer to
        the budget), not the model into the model's."""
        self.steps += 1
        s = self.steps - self.start_step
        if not active or s < 0 or s % self.interval_steps or self.steps >= self.end_step:
            return 0.0
        return self._grow(model, budget * (1.0 + self.current_overshoot()), per_layer)

    def current_overshoot(self) -> float:
        """``overshoot``, annealed to 0 by a half cosine from the first growth to the end of phase 1 (as RigL anneals
        its drop fraction): large swaps first, then the structure settles."""
        span = max(self.end_step - self.start_step, 1)
        t = min(max(self.steps - self.start_step, 0) / span, 1.0)
        return self.overshoot * 0.5 * (1.0 + math.cos(math.pi * t))

    @torch.no_grad()
    def finish(self, model: nn.Module, budget: float, per_layer: bool = False) -> float:
        """At the phase switch: grow into what is left under ``budget``, by the gradients summed since the last
        growth (``per_layer`` as in :meth:`step`).  Returns the FLOPs ratio added."""
        self.detach()
        if not self.sums:
            return 0.0
        return self._grow(model, budget, per_layer)

    def _grow(self, model: nn.Module, target: float, per_layer: bool = False) -> float:
        named = gblr_layers(model, include_frozen=False)
        self._all_reduce(named)
        if not all(bool(torch.isfinite(m.widths).all() and torch.isfinite(m.locations).all()) for _, m in named):
            self.sums = {}
            return 0.0  # a non-finite structure is the module's to report (with the learning rates), not grown
        layers = [m for _, m in named]
        cost = layers_flops(layers)
        room = target * cost["dense_flops"] - cost["flops"]
        scores = []
        for name, m in named:
            sums = self.sums.get(name)
            ok = sums is not None and sums[0].shape[0] == m.num_components
            scores.append((sums[0].square().sum(1), sums[1].square().sum(1)) if ok else None)
        if per_layer:
            added = 0.0
            for m, score in zip(layers, scores):
                own = layers_flops([m])
                room_m = target * own["dense_flops"] - own["flops"]
                added += grow_edges([m], room_m, [score]) if room_m >= 1 else 0.0
        else:
            added = grow_edges(layers, room, scores) if room >= 1 else 0.0
        self.sums = {}
        ratio = added / cost["dense_flops"] if cost["dense_flops"] else 0.0
        self.grown += ratio
        return ratio

    def _all_reduce(self, named: list[tuple[str, GBLRLinear]]) -> None:
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        # every rank sums the same tensors in the same order (zeros where a rank measured nothing)
        flat = []
        for name, m in named:
            sums, dev = self.sums.get(name), m.widths.device
            if sums is None or sums[0].shape[0] != m.num_components:
                k, r = m.num_components, m.rank_per_component
                sums = (torch.zeros(k, r, m.in_features, device=dev), torch.zeros(k, r, m.out_features, device=dev))
            flat.append((sums[0].to(dev), sums[1].to(dev)))  # a checkpoint's sums come back on the CPU
        tensor = torch.cat([t.flatten() for pair in flat for t in pair])
        dist.all_reduce(tensor)
        out, offset = {}, 0
        for (name, _), pair in zip(named, flat):
            parts = []
            for t in pair:
                parts.append(tensor[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
            out[name] = (parts[0], parts[1])
        self.sums = out

    def drop_components(self, keeps: Mapping[str, Tensor], sizes: Mapping[str, int]) -> None:
        """Layers ``keeps`` (name -> indices kept of ``sizes[name]`` components) drop their other components: their
        rows of the sums go too."""
        for name, keep in keeps.items():
            sums = self.sums.get(name)
            if sums is not None and sums[0].shape[0] == sizes[name]:
                self.sums[name] = (sums[0].index_select(0, keep.to(sums[0].device)),
                                   sums[1].index_select(0, keep.to(sums[1].device)))

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "grown": self.grown,
                "sums": {k: (a.detach().cpu().clone(), b.detach().cpu().clone()) for k, (a, b) in self.sums.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        self.grown = float(state.get("grown", 0.0))
        self.sums = {k: (torch.as_tensor(a).clone(), torch.as_tensor(b).clone())
                     for k, (a, b) in dict(state.get("sums", {})).items()}

    def __getstate__(self) -> dict[str, Any]:  # hook handles belong to one process's fit
        state = dict(self.__dict__)
        state["_hooks"], state["_layers"] = [], []
        return state

    def init_args(self) -> dict[str, Any]:
        return {"start": self.start, "interval": self.interval, "overshoot": self.overshoot, "measure": self.measure}

    def config(self) -> dict[str, Any]:
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": self.init_args()}

    def __repr__(self) -> str:
        return (f"Regrowth(start={self.start:g}, interval={self.interval:g}, overshoot={self.overshoot:g}, "
                f"measure={self.measure:g})")
