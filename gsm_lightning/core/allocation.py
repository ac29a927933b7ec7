"""Measured allocation: how much of one FLOPs budget each converted layer gets, judged on the model's outputs.

A layer-local proxy (the whitened singular values, :func:`~gsm_lightning.core.baselines.allocate_ranks_greedy`)
compares errors in each layer's own output units, which says little about what an error does to the model's output:
on all-MiniLM-L6-v2 it starves the FFN output layers and keeps less than a uniform allocation (0.693 against 0.813
cosine at 50 %, ``benchmarks/allocation_probe.py``).  Here each layer alone is truncated to each ratio of a grid (its
whitened SVD, the exact optimum of its output error) and the change of the *model's* output on calibration batches
is measured; a greedy then spends the budget on the steps with the largest measured gain per FLOP.  On MiniLM this
keeps 0.842 (50 %) and 0.726 (30 %) against uniform's 0.813 and 0.667, before any training.

The curves cost one forward pass of the batches per layer and grid point: keep the batches few.  The cheap form
measures one point per layer and extrapolates (:func:`layer_gains`): the model's output error of a layer truncated
to rank r is taken as ``g * sum_{i > r} sigma_i^2``, the layer's whitened tail energy times a gain ``g`` measured at
one rank; on MiniLM it keeps 0.841 / 0.725 against the 10-point curves' 0.842 / 0.726 (50 / 30 %).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from .whitening import InputStats, whitened_svd

__all__ = ["DEFAULT_GRID", "allocate_from_curves", "layer_gains", "layer_sensitivity", "output_tensor",
           "ranks_to_ratios"]

DEFAULT_GRID: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def output_tensor(output: Any) -> Tensor:
    """The tensor a model's output is judged by: the output itself, ``.logits``, ``.last_hidden_state``, or the first
    tensor of a tuple, list or mapping."""
    if isinstance(output, Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        value = getattr(output, key, None)
        if isinstance(value, Tensor):
            return value
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    for value in values:
        if isinstance(value, Tensor):
            return value
    raise TypeError(f"cannot find a tensor in the model's output of type {type(output).__name__}: give "
                    "layer_sensitivity an output= function that returns one")


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield


class _BlockReplay:
    """The outputs of a model's repeated blocks (the longest ``nn.ModuleList`` holding the measured layers), recorded
    on the reference pass and replayed for the blocks before the one whose layer is truncated: those blocks and their
    inputs are unchanged, so their outputs are too, and only the blocks from the truncated one on are recomputed
    (on MiniLM-L6 about 40 % fewer block forwards).  Used only when every block runs exactly once per batch and a
    replayed pass of the unchanged model reproduces the reference output bit for bit (:meth:`check`); otherwise the
    full model runs, as before."""

    def __init__(self, blocks: list[nn.Module], block_of: dict[str, int]) -> None:
        self.blocks, self.block_of = blocks, block_of
        self.outputs: list[list[Any]] = []

    @staticmethod
    def find(model: nn.Module, names: list[str]) -> _BlockReplay | None:
        best: tuple[list[nn.Module], dict[str, int]] | None = None
        for prefix, module in model.named_modules():
            if not isinstance(module, nn.ModuleList) or len(module) < 2:
                continue
            block_of = {}
            for name in names:
                if prefix and not name.startswith(prefix + "."):
                    continue
                head, _, tail = (name[len(prefix) + 1:] if prefix else name).partition(".")
                if tail and head.isdigit() and int(head) < len(module):
                    block_of[name] = int(head)
            if block_of and max(block_of.values()) > 0 and (best is None or len(block_of) > len(best[1])):
                best = (list(module), block_of)
        return None if best is None else _BlockReplay(*best)

    @contextlib.contextmanager
    def recording(self, n_batches: int) -> Iterator[None]:
        self.outputs = [[] for _ in self.blocks]
        order: list[int] = []

        def hook(i: int):
            def record(module: nn.Module, args: Any, out: Any) -> None:
                order.append(i)
                self.outputs[i].append(tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t, out))
            return record

        handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(self.blocks)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        if order != list(range(len(self.blocks))) * n_batches:  # each block once per batch, in order; else no replay
            self.outputs = []

    @contextlib.contextmanager
    def replaying(self, batch: int, first_block: int) -> Iterator[None]:
        replaced = self.blocks[:first_block]
        for i, block in enumerate(replaced):  # a copy each time: a later block may change its input in place
            block.forward = lambda *a, _out=self.outputs[i][batch], **k: tree_map(
                lambda t: t.clone() if isinstance(t, Tensor) else t, _out)
        try:
            yield
        finally:
            for block in replaced:
                del block.forward

    def check(self, run: Callable[[int], Tensor], reference: list[Tensor]) -> bool:
        if not self.outputs:
            return False
        for i, ref in enumerate(reference):
            with self.replaying(i, len(self.blocks) - 1):
                if not torch.equal(run(i).detach(), ref):
                    return False
        return True


def _rank_at(out_f: int, in_f: int, ratio: float) -> int:
    return max(1, min(min(out_f, in_f), int(math.floor(ratio * out_f * in_f / (out_f + in_f) + 1e-9))))


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module,
    calibration: Mapping[str, InputStats | Tensor],
    batches: Iterable[Any],
    grid: Sequence[float] = DEFAULT_GRID,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    output: Callable[[Any], Tensor] = output_tensor,
    reduce: Callable[[Tensor], Any] | None = None,
) -> dict[str, list[tuple[int, float]]]:
    """Measured cost curves: for each layer of ``calibration`` (``{name: input statistics}`` of dense ``nn.Linear``
    layers of ``model``) and each ratio of ``grid``, the relative output error
    ``sum ||y' - y||^2 / sum ||y||^2`` of the model over ``batches`` when that layer alone is its whitened rank-r SVD
    (``r`` the largest rank within the ratio's FLOPs), all other layers dense.

    Args:
        model: the dense model (its weights are swapped in place one layer at a time and restored bit for bit).
        calibration: the statistics of :func:`~gsm_lightning.core.calibration.collect_input_stats`.
        batches: the batches to judge on (materialised once; each is run ``len(grid) * len(calibration) + 1`` times).
        grid: FLOPs ratios in (0, 1] to measure (points with equal ranks are measured once).
        forward: ``f(model, batch) -> output`` (default: ``model(**batch)`` for a mapping, else ``model(batch)``).
        output: the tensor of an output to compare (default :func:`output_tensor`).
        reduce: sums a tensor across processes (default: ``all_reduce`` when ``torch.distributed`` is initialised),
            so that every rank measures the same curves on the union of the ranks' batches.

    Returns:
        ``{name: [(rank, error), ...]}`` sorted by rank (a ratio of 1 is the largest rank that costs no more than
        dense, ``out * in / (out + in)``, not the dense layer).  The model is left as it came, weights and train/eval
        mode.
    """
    from .calibration import _default_forward, _default_reduce

    if not calibration:
        raise ValueError("layer_sensitivity: no layer given (calibration is empty)")
    bad = [g for g in grid if not isinstance(g, (int, float)) or isinstance(g, bool) or not 0 < g <= 1]
    if not grid or bad:
        raise ValueError(f"layer_sensitivity: grid must be non-empty FLOPs ratios in (0, 1], got {list(grid)!r}")
    forward = forward or _default_forward
    reduce = reduce if reduce is not None else _default_reduce()
    batches = list(batches)
    if not batches:
        raise ValueError("layer_sensitivity: batches is empty; give at least one batch")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    layers = {}
    for name in calibration:
        layer = model.get_submodule(name)
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"layer_sensitivity: {name!r} is a {type(layer).__name__}; measure the dense model "
                             "(nn.Linear layers) before converting it")
        layers[name] = layer
    replay = _BlockReplay.find(model, list(layers))
    try:
        with replay.recording(len(batches)) if replay is not None else _nothing():
            reference = [output(forward(model, b)).detach() for b in batches]
        if replay is not None and not replay.check(lambda i: output(forward(model, batches[i])), reference):
            replay = None

        def error(first_block: int = 0) -> float:
            num = torch.zeros((), dtype=torch.float64, device=reference[0].device)
            den = torch.zeros_like(num)
            for i, (batch, ref) in enumerate(zip(batches, reference)):
                with replay.replaying(i, first_block) if replay is not None else _nothing():
                    y = output(forward(model, batch))
                num += (y.double() - ref.double()).pow(2).sum()
                den += ref.double().pow(2).sum()
            both = torch.stack([num, den])
            if reduce is not None:
                reduce(both)
            return float(both[0] / both[1].clamp_min(1e-300))

        curves: dict[str, list[tuple[int, float]]] = {}
        for name, layer in layers.items():
            weight = layer.weight.detach().clone()
            out_f, in_f = weight.shape
            points: dict[int, float] = {}
            ranks = list(dict.fromkeys(_rank_at(out_f, in_f, float(ratio)) for ratio in grid))
            svd = whitened_svd(weight, calibration[name], max(ranks))  # one SVD for every rank of the grid
            try:
                for rank in ranks:
                    u, v = svd.factors(rank)
                    layer.weight.copy_((u @ v.t()).to(weight.dtype))
                    points[rank] = error(replay.block_of.get(name, 0) if replay is not None else 0)
            finally:
                layer.weight.copy_(weight)
            curves[name] = sorted(points.items())
    finally:
        for m, training in modes:
            m.training = training
    return curves


def layer_gains(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    weights: Mapping[str, Tensor],
    calibration: Mapping[str, InputStats | Tensor],
) -> dict[str, float]:
    """Per-layer gains ``g`` such that the measured error at each point of ``curves`` is ``g * tail(r)``, ``tail(r)``
    the layer's whitened tail energy ``sum_{i > r} sigma_i^2`` (its own output error at rank r, in its output units):
    the least-squares ``g`` over the layer's points.  A layer whose tail is zero at every measured point (exact there)
    gets the median gain of the others.  Use the gains with
    :func:`~gsm_lightning.core.baselines.allocate_ranks_greedy` (``gains=``)."""
    from .whitening import whitened_singular_values

    gains: dict[str, float | None] = {}
    for name, points in curves.items():
        energy = whitened_singular_values(weights[name], calibration[name]).pow(2)
        tails = [(float(energy[r:].sum()), float(e)) for r, e in points]
        den = sum(t * t for t, _ in tails)
        gains[name] = sum(t * e for t, e in tails) / den if den > 0 else None
    known = sorted(g for g in gains.values() if g is not None)
    fill = known[len(known) // 2] if known else 1.0
    return {n: (g if g is not None else fill) for n, g in gains.items()}


def allocate_from_curves(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    shapes: Mapping[str, tuple[int, int]],
    budget: float,
) -> dict[str, int]:
    """Ranks under ONE FLOPs budget ``budget * sum(out * in)`` from measured curves (:func:`layer_sensitivity`).

    Each layer's points are ``(rank, error)`` at cost ``rank * (out + in)``.  Every layer starts at its cheapest point;
    then the move with the largest error drop per added multiply-add that still fits is taken (a move may skip
    points, so a layer whose curve is flat and then drops is not stuck), until none fits or none helps.  Layers are
    assumed to add their errors.

    Args:
        curves: ``{name: [(rank, error), ...]}``.
        shapes: ``{name: (out_features, in_features)}``.
        budget: in (0, 1].

    Returns:
        ``{name: rank}``, one of each layer's measured ranks.
    Raises ``ValueError`` if the cheapest points do not fit the budget.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"budget must be a number in (0, 1], got {budget!r}")
    missing = [n for n in curves if n not in shapes]
    if missing:
        raise ValueError(f"allocate_from_curves: no shape for {missing}")
    total = budget * sum(out_f * in_f for out_f, in_f in (shapes[n] for n in curves))
    options: dict[str, list[tuple[float, float, int]]] = {}
    for name, points in curves.items():
        out_f, in_f = shapes[name]
        if not points:
            raise ValueError(f"allocate_from_curves: layer {name!r} has no measured point")
        options[name] = sorted((rank * (out_f + in_f), float(err), rank) for rank, err in points)
    pos = {n: 0 for n in options}
    spent = sum(opts[0][0] for opts in options.values())
    if spent > total * (1 + 1e-12):
        raise ValueError(f"budget {budget:g} does not pay for the cheapest measured point of every layer "
                         f"({spent / (total / budget):.4f} of dense); lower the smallest grid ratio")
    while True:
        best = None
        for name, opts in options.items():
            cost0, err0, _ = opts[pos[name]]
            for j in range(pos[name] + 1, len(opts)):
                cost1, err1, _ = opts[j]
                add = cost1 - cost0
                if add <= 0 or spent + add > total * (1 + 1e-12):
                    continue
                gain = (err0 - err1) / add
                if best is None or gain > best[0]:
                    best = (gain, name, j, add)
        if best is None or best[0] <= 0:
            return {n: options[n][pos[n]][2] for n in options}
        _, name, j, add = best
        pos[name], spent = j, spent + add


def ranks_to_ratios(ranks: Mapping[str, int], shapes: Mapping[str, tuple[int, int]]) -> dict[str, float]:
    """Each layer's FLOPs ratio ``rank (out + in) / (out in)``: the per-layer budgets at which
    :func:`~gsm_lightning.core.baselines.rank_for_budget` gives back ``rank``."""
    return {n: r * (shapes[n][0] + shapes[n][1]) / (shapes[n][0] * shapes[n][1]) for n, r in ranks.items()}
