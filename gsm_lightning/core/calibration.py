"""Activation-aware (calibrated) compression: input statistics of linear layers and the whitened objective.

:func:`collect_input_stats` streams, through forward pre-hooks, ``H = sum_tokens x x^T`` (or only its diagonal)
and the token count of chosen linear layers (never storing activations), summed over DDP ranks.  The whitened
objective ``||(W - W') S||_F`` (``S S^T = H / count``) and its tools (:class:`InputStats`, :func:`whitened_low_rank`,
:func:`relative_output_error`, ...) live in :mod:`gsm_lightning.core.whitening` and are re-exported here, so that
this module is the one import for calibrated conversion:

    stats = collect_input_stats(model, batches, layers=select_linear_layers(model, include))
    gsmify(model, 0.5, include=include, calibration=stats)
    baselinify(model, "lowrank", 0.5, include=include, calibration=stats)

Plain PyTorch; no Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import whitening as _whitening
from .conversion import select_linear_layers
from .modules import set_submodule
from .whitening import *  # noqa: F403  (the maths, re-exported: this module is the one import)
from .whitening import InputStats

__all__ = ["PairStats", "collect_input_stats", "collect_pair_stats", "convert_sequentially", "layer_groups",
           "padding_mask", "target_corrected_weight", *_whitening.__all__]


# -------------------------------------------------------------------------------------------- collecting statistics
def _in_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.in_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:  # HF: weight (in, out)
        return int(module.weight.shape[0])
    n = getattr(module, "in_features", None)
    return int(n) if isinstance(n, int) else None


def _resolve_layers(model: nn.Module, layers: str | Sequence[str | nn.Module] | None) -> list[tuple[str, nn.Module]]:
    if layers is None or isinstance(layers, str):
        return [(n, model.get_submodule(n)) for n in select_linear_layers(model, layers)]
    by_id = {id(m): n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    chosen: list[tuple[str, nn.Module]] = []
    for item in layers:
        if isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise ValueError(f"layer {type(item).__name__} given in layers is not a submodule of {type(model).__name__}")
            name = by_id[id(item)]
        elif isinstance(item, str):
            if item not in modules:
                raise ValueError(f"layers: {type(model).__name__} has no submodule named {item!r} (give qualified names as "
                                 "select_linear_layers returns them, or one include pattern as a string)")
            name = item
        else:
            raise TypeError(f"layers must hold qualified names or modules, got {type(item).__name__}")
        if _in_features(modules[name]) is None:
            raise ValueError(f"layer {name!r} ({type(modules[name]).__name__}) is not a linear layer (nn.Linear, HF Conv1D, "
                             "or a module with in_features)")
        if name not in [n for n, _ in chosen]:
            chosen.append((name, modules[name]))
    if not chosen:
        raise ValueError("layers=[] selects no layer")
    return chosen


def _default_forward(model: nn.Module, batch: Any) -> Any:
    return model(**batch) if isinstance(batch, Mapping) else model(batch)


def padding_mask(batch: Any) -> Tensor | None:
    """The ``attention_mask`` of a batch (a mapping holding one, or a tuple/list whose first item does), else None:
    the default ``token_mask`` of calibration, so that padding positions do not enter the statistics."""
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        return mask if isinstance(mask, Tensor) else None
    return None


def _tokens(x: Tensor, n: int, mask: Tensor | None) -> Tensor:
    """``x`` as ``(tokens, n)``, keeping only the positions where ``mask`` is set when ``mask`` has the shape of
    ``x``'s leading dimensions (a layer fed per-token inputs); all positions otherwise (e.g. a head after pooling)."""
    if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
        return x[mask.to(device=x.device).bool()]
    return x.reshape(-1, n)


def _hook_input(name: str, n: int | None, args: tuple, kwargs: dict) -> Any:
    """The input tensor a forward pre-hook of layer ``name`` sees; checked to end in ``n`` features unless n is None."""
    x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
    if n is not None and (not isinstance(x, Tensor) or x.dim() == 0 or x.shape[-1] != n):
        raise ValueError(f"layer {name!r} expects inputs of last dimension {n}, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    return x


def _called_twice(name: str) -> ValueError:
    return ValueError(f"sequential calibration: layer {name!r} is called more than once in one forward; it fits each "
                      "layer to one input per forward (use calibration without sequential)")


def _accumulator(module: nn.Module, n: int, diagonal: bool, dtype: torch.dtype) -> Tensor:
    """Zeros for ``sum x x^T`` (``(n, n)``, or ``(n,)`` when diagonal) on the layer's device."""
    ref = next(iter(module.parameters()), None)
    return torch.zeros((n,) if diagonal else (n, n), dtype=dtype, device=ref.device if ref is not None else None)


def _default_reduce() -> Callable[[Tensor], Any] | None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return lambda t: torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return None


def collect_input_stats(
    model: nn.Module,
    batches: Iterable[Any],
    layers: str | Sequence[str | nn.Module] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    dtype: torch.dtype = torch.float64,
    diagonal: bool = False,
    reduce: Callable[[Tensor], Any] | None = None,
    token_mask: Callable[[Any], Tensor | None] | None = padding_mask,
) -> dict[str, InputStats]:
    """Input statistics of linear layers of ``model`` over calibration ``batches``.

    Forward pre-hooks on the chosen layers accumulate ``H = sum_tokens x x^T`` (``(in, in)`` in ``dtype``, on the
    layer's device; only ``sum x^2``, ``(in,)``, with ``diagonal=True``: memory ``in`` instead of ``in^2`` for wide
    layers) and the token count, while ``forward(model, batch)`` runs every batch under ``torch.no_grad()`` with the
    model in eval mode.  Activations are never stored (only the last hooked input is held, until the next hook
    call); consecutive layers fed the very same input tensor (q/k/v projections, an MLP's gate and up) share one
    product ``x^T x``.  The train/eval mode of every module is restored and the hooks
    are removed afterwards, also on error.

    Args:
        model: any module tree.
        batches: an iterable of batches (a DataLoader, a list of tensors or dicts).
        layers: ``None`` (every linear layer), one include pattern as a string (glob or ``re:``, as :func:`gsmify`),
            or a list of qualified names and/or modules.  Keys of the result are qualified names as
            :func:`~gsm_lightning.core.conversion.select_linear_layers` returns them (the keys :func:`gsmify` and
            :func:`baselinify` look up).
        forward: ``f(model, batch)``; default ``model(**batch)`` for a mapping, ``model(batch)`` otherwise.
        dtype: accumulation dtype (float64 by default; float32 where float64 is slow or unsupported).
        diagonal: keep only the diagonal of ``H``.
        reduce: ``f(tensor)`` summing a tensor in place across processes; default: ``torch.distributed.all_reduce``
            (SUM) when a process group is initialised, so that every rank gets the statistics of the union of the
            ranks' data (each rank must call this function with the same layers).
        token_mask: ``f(batch)`` giving a ``(batch, seq)`` mask of the tokens to count, or None for all of them;
            default :func:`padding_mask` (the batch's ``attention_mask``: padding is not data).  Applied to a layer's
            input when its leading dimensions have the mask's shape; None: every position.

    Raises:
        ValueError: when ``batches`` is empty (on every rank), or when some chosen layer received no token (the
        calibration data does not reach it).
    """
    chosen = _resolve_layers(model, layers)
    forward = _default_forward if forward is None else forward
    reduce = _default_reduce() if reduce is None else reduce
    acc: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    for name, module in chosen:
        acc[name] = _accumulator(module, _in_features(module), diagonal, dtype)
        counts[name] = 0

    last: list[Any] = []  # [input, its version, device, product, tokens] of the last hooked call
    current: list[Tensor | None] = [None]  # the token mask of the batch being run

    def make_hook(name: str, n: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = _hook_input(name, n, args, kwargs)
            h = acc[name]
            # consecutive layers fed the very same tensor (q/k/v, an MLP's gate and up) share one product: only the
            # last input and its product are kept (one in x in matrix at a time), and an in-place change of the
            # tensor (its version counter) makes it a new input
            if last and last[0] is x and last[1] == x._version and last[2] == h.device:
                h.add_(last[3])
                counts[name] += last[4]
                return
            flat = _tokens(x.detach(), n, current[0]).to(device=h.device, dtype=h.dtype)
            product = flat.pow(2).sum(0) if diagonal else flat.t() @ flat
            h.add_(product)
            counts[name] += flat.shape[0]
            last[:] = [x, x._version, h.device, product, flat.shape[0]]

        return hook

    modes = [(m, m.training) for m in model.modules()]
    handles = []
    n_batches = 0
    try:
        for name, module in chosen:
            handles.append(module.register_forward_pre_hook(make_hook(name, _in_features(module)), with_kwargs=True))
        model.eval()
        with torch.no_grad():
            for batch in batches:
                current[0] = None if token_mask is None else token_mask(batch)
                try:
                    forward(model, batch)
                finally:
                    last.clear()
                    current[0] = None
                n_batches += 1
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes:
            m.training = training
    if reduce is not None:
        ref = next(iter(acc.values()))
        totals = torch.tensor([n_batches] + [counts[n] for n, _ in chosen], dtype=torch.float64, device=ref.device)
        reduce(totals)
        n_batches = int(totals[0])
        counts = {n: int(c) for (n, _), c in zip(chosen, totals[1:].tolist())}
        for name, _ in chosen:
            reduce(acc[name])
    if n_batches == 0:
        raise ValueError("collect_input_stats: batches is empty; give at least one calibration batch")
    missed = [name for name, _ in chosen if counts[name] == 0]
    if missed:
        raise ValueError(
            f"calibration data does not reach the converted layer(s) {', '.join(missed)}: no token passed through them in "
            f"{n_batches} batch(es). Check the include patterns / layers (they may name layers that this model's forward "
            f"never calls) and the forward callable (it must run the model so that these layers see their inputs)")
    return {name: InputStats(acc[name], counts[name]) for name, _ in chosen}


# ------------------------------------------------------------------------------ sequential, teacher-target calibration
@dataclass
class PairStats:
    """Inputs of one layer in a partly converted student and in its dense teacher, over the same tokens.

    ``student`` holds ``sum xs xs^T`` (the layer's own input statistics in the student: what its fit whitens by) and
    the token count; ``cross`` is ``sum xt xs^T`` (``(in, in)``; ``sum xt * xs``, ``(in,)``, for diagonal
    statistics), ``xt`` the teacher's input to the same layer on the same token."""

    student: InputStats
    cross: Tensor


class _Stop(Exception):
    """Raised by a hook once every hooked layer has seen its input: the rest of the forward is not needed."""


def _run_until(model: nn.Module, batch: Any, forward: Callable[[nn.Module, Any], Any],
               chosen: Sequence[tuple[str, nn.Module]], on_input: Callable[[str, Tensor], None],
               mask: Tensor | None = None) -> set[str]:
    """Run ``forward(model, batch)`` with pre-hooks calling ``on_input(name, x)`` on the chosen layers, cut short as
    soon as each of them has been called once; returns the names reached."""
    seen: set[str] = set()
    wanted = {name for name, _ in chosen}

    def make_hook(name: str, n: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = _hook_input(name, n, args, kwargs)
            if name in seen:
                raise _called_twice(name)
            on_input(name, _tokens(x.detach(), n, mask))
            seen.add(name)
            if seen == wanted:
                raise _Stop

        return hook

    handles = [module.register_forward_pre_hook(make_hook(name, _in_features(module)), with_kwargs=True)
               for name, module in chosen]
    try:
        forward(model, batch)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return seen


def layer_groups(model: nn.Module, batch: Any, layers: str | Sequence[str | nn.Module] | None = None,
                 forward: Callable[[nn.Module, Any], Any] | None = None) -> list[list[str]]:
    """The chosen linear layers of ``model`` in the order its forward calls them on ``batch``, grouped: consecutive
    layers fed the very same input tensor (q/k/v projections, an MLP's gate and up) form one group.

    Raises:
        ValueError: when a chosen layer is not called, or is called more than once, in the forward.
    """
    chosen = _resolve_layers(model, layers)
    forward = _default_forward if forward is None else forward
    order: list[str] = []
    groups: list[list[str]] = []
    last: list[Any] = []  # [tensor, version] of the last hooked input (held only until the next hooked call)

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = _hook_input(name, None, args, kwargs)
            if name in order:
                raise _called_twice(name)
            order.append(name)
            if groups and last and last[0] is x and last[1] == getattr(x, "_version", None):
                groups[-1].append(name)
            else:
                groups.append([name])
            last[:] = [x, getattr(x, "_version", None)]

        return hook

    modes = [(m, m.training) for m in model.modules()]
    handles = [module.register_forward_pre_hook(make_hook(name), with_kwargs=True) for name, module in chosen]
    try:
        model.eval()
        with torch.no_grad():
            forward(model, batch)
    finally:
        last.clear()
        for handle in handles:
            handle.remove()
        for m, training in modes:
            m.training = training
    missed = [name for name, _ in chosen if name not in order]
    if missed:
        raise ValueError(f"calibration data does not reach the converted layer(s) {', '.join(missed)}: the forward on "
                         "the first calibration batch never calls them. Check the include patterns and the forward")
    return groups


def collect_pair_stats(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Any],
    layers: Sequence[str],
    forward: Callable[[nn.Module, Any], Any] | None = None,
    dtype: torch.dtype = torch.float64,
    diagonal: bool = False,
    reduce: Callable[[Tensor], Any] | None = None,
    token_mask: Callable[[Any], Tensor | None] | None = padding_mask,
) -> dict[str, PairStats]:
    """:class:`PairStats` of the named linear layers (qualified names, present in both models) over ``batches``.

    Each batch runs through ``teacher`` and then ``student`` (eval mode, no gradients), each forward cut short once
    every named layer has been called; only the named layers' inputs of the current batch are held.  Summed across
    processes with ``reduce`` (default: ``all_reduce`` when a process group is initialised) and restricted to the
    ``token_mask``'s tokens, as :func:`collect_input_stats`.

    Raises:
        ValueError: empty ``batches``; a layer the data does not reach; a teacher whose layer inputs differ in shape
        from the student's (not the same architecture).
    """
    forward = _default_forward if forward is None else forward
    reduce = _default_reduce() if reduce is None else reduce
    s_chosen = _resolve_layers(student, list(layers))
    t_modules = dict(teacher.named_modules())
    t_chosen = []
    for name, module in s_chosen:
        other = t_modules.get(name)
        if other is None or _in_features(other) != _in_features(module):
            raise ValueError(f"the teacher ({type(teacher).__name__}) has no linear layer {name!r} with "
                             f"{_in_features(module)} inputs: it must be the dense model the student was made from")
        t_chosen.append((name, other))
    ss: dict[str, Tensor] = {}
    cross: dict[str, Tensor] = {}
    counts = {name: 0 for name, _ in s_chosen}
    for name, module in s_chosen:
        ss[name] = _accumulator(module, _in_features(module), diagonal, dtype)
        cross[name] = torch.zeros_like(ss[name])

    t_inputs: dict[str, Tensor] = {}
    last: list[Any] = []  # [student input, teacher input, ss product, cross product] of the last hooked call

    def on_teacher(name: str, x: Tensor) -> None:
        t_inputs[name] = x

    def on_student(name: str, x: Tensor) -> None:
        xt = t_inputs.get(name)
        if xt is None or xt.shape != x.shape:
            raise ValueError(f"layer {name!r}: the teacher's input {None if xt is None else tuple(xt.shape)} does not "
                             f"match the student's {tuple(x.shape)}: the teacher must be the dense model the student "
                             "was made from, run on the same batch")
        if last and last[0] is x and last[1] is xt:
            ss[name].add_(last[2])
            cross[name].add_(last[3])
        else:
            xs64 = x.to(device=ss[name].device, dtype=dtype)
            xt64 = xt.to(device=ss[name].device, dtype=dtype)
            p_ss = xs64.pow(2).sum(0) if diagonal else xs64.t() @ xs64
            p_ts = (xt64 * xs64).sum(0) if diagonal else xt64.t() @ xs64
            ss[name].add_(p_ss)
            cross[name].add_(p_ts)
            last[:] = [x, xt, p_ss, p_ts]
        counts[name] += x.shape[0]

    modes = [(m, m.training) for model in (student, teacher) for m in model.modules()]
    n_batches = 0
    try:
        student.eval()
        teacher.eval()
        with torch.no_grad():
            for batch in batches:
                mask = None if token_mask is None else token_mask(batch)
                try:
                    _run_until(teacher, batch, forward, t_chosen, on_teacher, mask)
                    _run_until(student, batch, forward, s_chosen, on_student, mask)
                finally:
                    t_inputs.clear()
                    last.clear()
                n_batches += 1
    finally:
        for m, training in modes:
            m.training = training
    if reduce is not None:
        ref = next(iter(ss.values()))
        totals = torch.tensor([n_batches] + [counts[n] for n, _ in s_chosen], dtype=torch.float64, device=ref.device)
        reduce(totals)
        n_batches = int(totals[0])
        counts = {n: int(c) for (n, _), c in zip(s_chosen, totals[1:].tolist())}
        for name, _ in s_chosen:
            reduce(ss[name])
            reduce(cross[name])
    if n_batches == 0:
        raise ValueError("collect_pair_stats: batches is empty; give at least one calibration batch")
    missed = [name for name, _ in s_chosen if counts[name] == 0]
    if missed:
        raise ValueError(f"calibration data does not reach the converted layer(s) {', '.join(missed)}: no token passed "
                         f"through them in {n_batches} batch(es)")
    return {name: PairStats(InputStats(ss[name], counts[name]), cross[name]) for name, _ in s_chosen}


def target_corrected_weight(weight: Tensor, pair: PairStats, damp: float = 1e-2) -> Tensor:
    """The weight that best maps the student's inputs to the teacher's outputs of this layer.

    ``A = W (C_ts + d I) (C_ss + d I)^-1`` minimises ``sum ||W xt - A xs||^2 + d ||A - W||_F^2`` over the tokens
    (``C_ss = sum xs xs^T``, ``C_ts = sum xt xs^T``, ``d = damp * mean(diag C_ss)``); it is ``W`` when the student's
    inputs equal the teacher's.  A whitened fit of ``A`` under ``C_ss`` then minimises the layer's error to the
    teacher's outputs (up to the damping), not to its own dense outputs on already perturbed inputs.  Diagonal
    statistics give the per-input-channel form ``A = W diag((c_ts + d) / (c_ss + d))``.

    Args:
        weight: ``W``, ``(out, in)``.
        pair: the layer's :class:`PairStats`.
        damp: ridge toward ``W``, relative to the mean input energy (> 0).

    Returns:
        ``A`` in ``weight``'s dtype and device.
    """
    if not damp > 0:
        raise ValueError(f"damp must be > 0 (the ridge toward the dense weight), got {damp!r}")
    c_ss = pair.student.h
    c_ts = pair.cross.to(device=c_ss.device, dtype=c_ss.dtype)
    n = c_ss.shape[0]
    if weight.dim() != 2 or weight.shape[1] != n:
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not take the {n} inputs of these statistics")
    w = weight.detach().to(device=c_ss.device, dtype=c_ss.dtype)
    if c_ss.dim() == 1:
        d = damp * float(c_ss.mean())
        return (w * ((c_ts + d) / (c_ss + d))).to(dtype=weight.dtype, device=weight.device)
    d = damp * float(c_ss.diagonal().mean())
    eye = torch.eye(n, dtype=c_ss.dtype, device=c_ss.device)
    # A^T = (C_ss + dI)^-1 (C_ts + dI)^T W^T  (C_ss symmetric)
    a_t = torch.linalg.solve(c_ss + d * eye, (c_ts + d * eye).t() @ w.t())
    return a_t.t().to(dtype=weight.dtype, device=weight.device)


def convert_sequentially(
    model: nn.Module,
    batches: Iterable[Any],
    layers: str | Sequence[str | nn.Module] | None,
    convert: Callable[[nn.Module, list[str], dict[str, InputStats]], Any],
    forward: Callable[[nn.Module, Any], Any] | None = None,
    dtype: torch.dtype = torch.float64,
    diagonal: bool = False,
    damp: float = 1e-2,
    reduce: Callable[[Tensor], Any] | None = None,
    token_mask: Callable[[Any], Tensor | None] | None = padding_mask,
) -> list[Any]:
    """Convert the chosen linear layers of ``model`` one group at a time, in forward order, each fitted to the dense
    model's outputs from the inputs that the already converted layers give it.

    Plain calibration fits every layer on the dense model's inputs, so that each layer's fit ignores the errors of
    the layers before it.  Here the layers are converted in the order the forward calls them, in groups of layers
    that share an input (:func:`layer_groups`).  For each group, the calibration batches run through the partly
    converted student and the dense model (:func:`collect_pair_stats`, each forward cut short after the group); each
    layer's weight is replaced by its :func:`target_corrected_weight` and ``convert(student, names, stats)`` fits
    the group on the student's own input statistics.  The whitened fit of the corrected weight minimises the error
    to the dense model's output of that layer.  Cost: each group reruns both models up to that group on every batch.

    The work is done on a copy of ``model`` (the dense original is the teacher); only at the end are the converted
    layers put into ``model``, so that an error leaves ``model`` untouched.  The fit and output errors that
    ``convert`` reports are those of the corrected weight on the student's inputs, not of the original weight.  Layers whose weight is tied to another
    parameter keep their weight (their correction would change the tied one too).

    Args:
        model: the dense model (converted in place at the end).
        batches: calibration batches (held in a list: each group runs them all).
        layers: as :func:`collect_input_stats`.
        convert: ``f(student, names, stats)`` converts the layers ``names`` of ``student`` in place from their input
            statistics ``{name: InputStats}`` (e.g. ``gsmify`` or ``baselinify`` with ``include`` = those names);
            what it returns is collected.
        forward / dtype / diagonal / reduce / token_mask: as :func:`collect_input_stats`.
        damp: ridge of :func:`target_corrected_weight`.

    Returns:
        what ``convert`` returned for each group, in forward order.
    """
    import copy

    batches = list(batches)
    if not batches:
        raise ValueError("convert_sequentially: batches is empty; give at least one calibration batch")
    forward = _default_forward if forward is None else forward
    names = [name for name, _ in _resolve_layers(model, layers)]
    groups = layer_groups(model, batches[0], names, forward)
    student = copy.deepcopy(model)
    originals = {name: student.get_submodule(name) for name in names}
    tied: set[int] = set()
    seen: set[int] = set()
    for _, p in student.named_parameters(remove_duplicate=False):
        (tied if id(p) in seen else seen).add(id(p))
    results = []
    for group in groups:
        pairs = collect_pair_stats(student, model, batches, group, forward, dtype=dtype, diagonal=diagonal,
                                   reduce=reduce, token_mask=token_mask)
        with torch.no_grad():
            for name in group:
                layer = student.get_submodule(name)
                if id(layer.weight) in tied:
                    continue
                conv1d = type(layer).__name__ == "Conv1D"  # HF: weight stored (in, out)
                w = layer.weight.t() if conv1d else layer.weight
                corrected = target_corrected_weight(w, pairs[name], damp)
                layer.weight.copy_(corrected.t() if conv1d else corrected)
        results.append(convert(student, list(group), {name: pairs[name].student for name in group}))
    for name in names:
        new = student.get_submodule(name)
        if new is not originals[name]:
            set_submodule(model, name, new)
    return results
