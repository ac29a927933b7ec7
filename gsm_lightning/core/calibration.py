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
from typing import Any

import torch
from torch import Tensor, nn

from . import whitening as _whitening
from .conversion import select_linear_layers
from .whitening import *  # noqa: F403  (the maths, re-exported: this module is the one import)
from .whitening import InputStats

__all__ = ["collect_input_stats", *_whitening.__all__]


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
        n = _in_features(module)
        ref = next(iter(module.parameters()), None)
        device = ref.device if ref is not None else None
        acc[name] = torch.zeros((n,) if diagonal else (n, n), dtype=dtype, device=device)
        counts[name] = 0

    last: list[Any] = []  # [input, its version, device, product, tokens] of the last hooked call

    def make_hook(name: str, n: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
            if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[-1] != n:
                raise ValueError(f"layer {name!r} expects inputs of last dimension {n}, got "
                                 f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
            h = acc[name]
            # consecutive layers fed the very same tensor (q/k/v, an MLP's gate and up) share one product: only the
            # last input and its product are kept (one in x in matrix at a time), and an in-place change of the
            # tensor (its version counter) makes it a new input
            if last and last[0] is x and last[1] == x._version and last[2] == h.device:
                h.add_(last[3])
                counts[name] += last[4]
                return
            flat = x.detach().reshape(-1, n).to(device=h.device, dtype=h.dtype)
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
                try:
                    forward(model, batch)
                finally:
                    last.clear()
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
