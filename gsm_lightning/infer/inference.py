"""Fast inference of whole models with frozen GBLR layers (plain PyTorch).

:func:`optimize_inference` replaces every frozen GBLR layer of a model by the faster of the
:class:`~gsm_lightning.compact.CompactGBLR` paths (layouts: :mod:`gsm_lightning.compact_plan`) and the merged
``nn.Linear``, timed when given ``tokens`` or a sample input (else by the cost model), and by default keeps a dense
copy of the weight for the token counts below which dense was faster
(:meth:`~gsm_lightning.compact.CompactGBLR.set_dense_fallback`), so that a compact layer is not slower than dense at
one token.  Given a sample input it then times the whole model against its dense merge and keeps the compact layers
only where the model is clearly faster.

The layer and planning names are re-exported here (``from gsm_lightning.inference import CompactGBLR`` keeps
working).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..core.layer import GBLRLinear, gblr_layers
from ..core.modules import set_submodule
from .compact import CompactGBLR, CompactPath
from .compact_plan import (
    BlockPlan,
    SidePlan,
    best_side_plan,
    blocks_cost,
    dense_cost,
    padded_rank,
    plan_blocks,
    plan_cost,
    plan_side,
)

__all__ = [
    "CompactGBLR",
    "CompactPath",
    "SidePlan",
    "BlockPlan",
    "plan_side",
    "plan_blocks",
    "blocks_cost",
    "best_side_plan",
    "plan_cost",
    "dense_cost",
    "padded_rank",
    "optimize_inference",
    "InferenceChoice",
    "InferenceReport",
    "FALLBACK_LADDER",
]

@dataclass
class InferenceChoice:
    """What :func:`optimize_inference` did with one layer (times in seconds, ``None`` if not measured).

    ``path``: the :class:`CompactGBLR` path (``None`` for dense); ``dense_below``: the compact layer uses the
    merged dense weight below this many tokens (0: never)."""

    name: str
    in_features: int
    out_features: int
    flops_ratio: float
    choice: str  # "compact" | "dense"
    compact_cost: float
    dense_cost: float
    compact_time: float | None = None
    dense_time: float | None = None
    path: str | None = None
    dense_below: int = 0
    rank_multiple: int = 1


@dataclass
class InferenceReport:
    """Per-layer choices of :func:`optimize_inference`."""

    mode: str
    tokens: int
    layers: list[InferenceChoice] = field(default_factory=list)
    #: whole model with the compact layers over the same model with all of them merged to dense, timed on the
    #: sample input (``None``: not checked); ``reverted``: that check found too small a gain and every layer was merged
    model_ratio: float | None = None
    reverted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "tokens": self.tokens, "layers": [asdict(x) for x in self.layers],
                "model_ratio": self.model_ratio, "reverted": self.reverted}

    def __len__(self) -> int:
        return len(self.layers)

    def __str__(self) -> str:
        lines = [f"optimize_inference(mode={self.mode}, tokens={self.tokens}): {len(self.layers)} layers"]
        if self.model_ratio is not None:
            lines.append(f"  whole model with the compact layers: {self.model_ratio:.2f}x its dense merge on the sample input"
                         + (" -> not clearly faster, every layer merged to dense" if self.reverted else ""))
        for c in self.layers:
            t = "" if c.compact_time is None else f" measured compact {c.compact_time * 1e6:.1f}us dense {c.dense_time * 1e6:.1f}us"
            pad = f", ranks padded to {c.rank_multiple}" if c.rank_multiple > 1 else ""
            how = c.choice if c.path is None else f"{c.choice} ({c.path}{pad}{f', dense below {c.dense_below} tokens' if c.dense_below else ''})"
            lines.append(f"  {c.name:<40} {c.in_features:>5}->{c.out_features:<5} flops {c.flops_ratio:.3f} -> {how}{t}")
        return "\n".join(lines)


#: token counts at which :func:`optimize_inference` compares a compact layer with dense below the planned count
FALLBACK_LADDER: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def _fallback_threshold(faster: dict[int, bool]) -> int:
    """Dense-fallback threshold from ``{tokens: compact was faster}``: the smallest measured count above the
    largest count at which compact was not faster (so dense is used up to there), 0 if compact always was."""
    bad = [t for t, ok in faster.items() if not ok]
    if not bad:
        return 0
    above = [t for t in faster if t > max(bad)]
    return min(above) if above else max(bad) + 1


def _sync(x: Any) -> None:
    """Wait for the device of ``x`` (a tensor, or the first tensor of a tuple/list/dict of model inputs)."""
    if isinstance(x, dict):
        x = next((v for v in x.values() if isinstance(v, Tensor)), None)
    elif isinstance(x, (tuple, list)):
        x = next((v for v in x if isinstance(v, Tensor)), None)
    if isinstance(x, Tensor) and x.is_cuda:
        torch.cuda.synchronize(x.device)


def _burst_times(fns: Sequence[Any], x: Tensor, reps: int, rounds: int = 3, min_burst_s: float = 0.01) -> list[list[float]]:
    """Per function, per round: the mean time (s) of one call in a burst of back-to-back calls (at least
    ``reps // rounds`` calls and ``min_burst_s`` seconds, after one untimed call: warm caches, as a layer timed on
    its own); the functions take turns within every round."""
    per_burst = max(int(reps) // rounds, 1)
    out: list[list[float]] = [[] for _ in fns]
    with torch.no_grad():
        for _ in range(rounds):
            for i, fn in enumerate(fns):
                fn(x)  # refill the caches with this function's weights
                _sync(x)
                n, t0 = 0, time.perf_counter()
                while n < per_burst or time.perf_counter() - t0 < min_burst_s:
                    fn(x)
                    n += 1
                _sync(x)
                out[i].append((time.perf_counter() - t0) / n)
    return out


def _faster(a: Any, b: Any, x: Tensor, reps: int) -> bool:
    """Whether ``a`` beats ``b`` on ``x`` both in bursts of back-to-back calls (warm caches) and in single calls
    taking turns (each call finds the caches holding the other's weights, as inside a model): in each, the median
    over rounds of the per-round time ratio must be below 1."""
    hot = _burst_times([a, b], x, reps)
    if float(np.median([ta / tb for ta, tb in zip(*hot)])) >= 1.0:
        return False
    ratios = []
    with torch.no_grad():
        for _ in range(max(int(reps), 1)):
            t0 = time.perf_counter()
            a(x)
            _sync(x)
            t1 = time.perf_counter()
            b(x)
            _sync(x)
            t2 = time.perf_counter()
            ratios.append((t1 - t0) / max(t2 - t1, 1e-12))
    return float(np.median(ratios)) < 1.0


def _call(model: nn.Module, sample_input: Any) -> Any:
    """``model`` on a sample input given as a tensor, a tuple/list of arguments or a dict of keyword arguments."""
    if isinstance(sample_input, dict):
        return model(**sample_input)
    if isinstance(sample_input, (tuple, list)):
        return model(*sample_input)
    return model(sample_input)


def _layer_inputs(model: nn.Module, names: list[str], sample_input: Any) -> dict[str, Tensor]:
    """Capture the input of each named layer for one forward of ``model`` on ``sample_input``."""
    captured: dict[str, Tensor] = {}
    handles = []
    for name in names:
        mod = model.get_submodule(name)
        handles.append(mod.register_forward_pre_hook(lambda m, args, _n=name: captured.setdefault(_n, args[0].detach())))
    try:
        with torch.no_grad():
            _call(model, sample_input)
    finally:
        for h in handles:
            h.remove()
    return captured


def _model_ratio(model: nn.Module, swaps: dict[str, tuple[nn.Module, nn.Module]], sample_input: Any,
                 rounds: int = 9, min_burst_s: float = 0.05) -> float:
    """Time of ``model`` on ``sample_input`` with the first module of every ``swaps`` entry in place, over its time
    with the second (the dense merge) in place: the median over ``rounds`` of per-round ratios, each round timing a
    burst of calls (at least ``min_burst_s`` seconds) of each variant in turn, after one untimed call.  Leaves the
    first modules in place."""
    def variant(i: int) -> Any:
        def run(inp: Any) -> Any:
            for name, mods in swaps.items():
                set_submodule(model, name, mods[i])
            return _call(model, inp)
        return run

    compact, dense = _burst_times([variant(0), variant(1)], sample_input, rounds, rounds, min_burst_s)  # >= 1 call a burst
    for name, mods in swaps.items():
        set_submodule(model, name, mods[0])
    return float(np.median([a / b for a, b in zip(compact, dense)]))


@torch.no_grad()
def optimize_inference(
    model: nn.Module,
    mode: Literal["auto", "compact", "dense"] = "auto",
    sample_input: Any = None,
    tokens: int | None = None,
    reps: int = 20,
    fallback: bool = True,
    paths: Sequence[str] = ("tiles", "blocks"),
    rank_multiples: Sequence[int] = (1, 8),
    verify: bool = True,
    min_model_gain: float = 0.05,
    **compact_kwargs: Any,
) -> InferenceReport:
    """Replace every frozen :class:`GBLRLinear` of ``model`` (in place) by a :class:`CompactGBLR` or a
    merged ``nn.Linear``.

    Args:
        model: any module tree (or a single frozen ``GBLRLinear``: then use the returned report and
            ``CompactGBLR.from_gblr``; a bare layer cannot be replaced in place).
        mode: ``"compact"``, ``"dense"`` (merge) or ``"auto"``: the fastest of dense and the compact ``paths``,
            by a short timing (about ``reps`` calls each) when ``sample_input`` (model input) or ``tokens`` is given,
            else dense against the cost model's compact path at 256 tokens.  A compact layer is kept only if it
            beats dense both in bursts of back-to-back calls and in single calls taking turns with dense.
        sample_input: a model input (tensor, tuple of args or dict of kwargs) used to time each layer on
            its real input.
        tokens: time each layer on random ``(tokens, in_features)`` inputs instead.
        fallback: ``"auto"`` only: where the compact layer wins at the planned token count, also compare it with
            dense at the token counts of :data:`FALLBACK_LADDER` below it (timed, or by the cost model when not
            measuring) and keep the merged dense weight for the counts where dense was faster
            (:meth:`CompactGBLR.set_dense_fallback`; costs the memory of the dense weight), so that the layer is
            not slower than dense at a small batch.
        paths: compact paths to time in measured ``"auto"`` mode.
        rank_multiples: measured ``"auto"``: the blocks path is timed with its block ranks padded to each of these
            multiples (``CompactGBLR.from_gblr(rank_multiple=...)``; 1 = no padding), unless ``rank_multiple`` is
            passed among ``compact_kwargs``.
        verify: ``"auto"`` with ``sample_input`` only: after choosing per layer, time the whole model on
            ``sample_input`` with the chosen compact layers against the same model with every layer merged to dense
            (interleaved rounds); unless it is at least ``min_model_gain`` faster, merge every layer to dense
            (``report.reverted``).  Layers timed one by one can each win while the model as a whole does not
            (caches, small layers), and a whole-model timing is noisy: the margin keeps compact layers only where the
            gain is clear.  The ratio is ``report.model_ratio``.
        min_model_gain: the fraction of the dense merge's time that the whole model must save to stay compact
            (0.05: at most 0.95x; 0: any measured gain).
        **compact_kwargs: passed to :meth:`CompactGBLR.from_gblr`.

    Unfrozen GBLR layers are left alone (they are still training).  Returns an :class:`InferenceReport`.
    """
    if mode not in ("auto", "compact", "dense"):
        raise ValueError(f"unknown mode {mode!r}; expected 'auto', 'compact' or 'dense'")
    if isinstance(model, GBLRLinear):
        raise ValueError("optimize_inference replaces layers inside a model; for a single layer use "
                         "CompactGBLR.from_gblr(layer) or layer.to_linear()")
    if tokens is not None and tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    bad = [p for p in paths if p not in ("tiles", "blocks")]
    if bad or not paths:
        raise ValueError(f"paths must be a non-empty subset of ('tiles', 'blocks'), got {tuple(paths)}")
    if not 0.0 <= float(min_model_gain) < 1.0:
        raise ValueError(f"min_model_gain must be in [0, 1), got {min_model_gain}")
    if not rank_multiples or any(int(m) < 1 for m in rank_multiples):
        raise ValueError(f"rank_multiples must be a non-empty list of integers >= 1, got {tuple(rank_multiples)}")
    names = [n for n, m in gblr_layers(model) if m.is_frozen]
    measured = mode == "auto" and (sample_input is not None or tokens is not None)
    plan_tokens = tokens if tokens is not None else 256
    inputs = _layer_inputs(model, names, sample_input) if measured and sample_input is not None else {}
    if inputs:
        plan_tokens = max(1, int(np.median([v.numel() // v.shape[-1] for v in inputs.values()])))
    compact_kwargs.setdefault("tokens", plan_tokens)
    report = InferenceReport(mode=mode, tokens=plan_tokens)
    swaps: dict[str, tuple[nn.Module, nn.Module]] = {}  # compact layers chosen by timing, with their dense merge
    for name in names:
        layer = model.get_submodule(name)
        compact = None
        if mode == "compact" or (mode == "auto" and not measured):
            compact = CompactGBLR.from_gblr(layer, **compact_kwargs)
        dense = layer.to_linear() if mode != "compact" else None
        d_cost = dense_cost(layer.in_features, layer.out_features, plan_tokens)
        choice = mode
        ct = dt = None
        if mode == "auto":
            assert dense is not None
            if measured:
                x = inputs.get(name)
                if x is None:
                    p = next(layer.parameters())
                    x = torch.randn(plan_tokens, layer.in_features, device=p.device, dtype=p.dtype)
                wanted = [compact_kwargs["path"]] if "path" in compact_kwargs else list(paths)
                mults = [compact_kwargs["rank_multiple"]] if "rank_multiple" in compact_kwargs else list(dict.fromkeys(rank_multiples))
                kwargs = {k: v for k, v in compact_kwargs.items() if k not in ("path", "rank_multiple")}
                cands = [CompactGBLR.from_gblr(layer, path=pth, rank_multiple=m, **kwargs)
                         for pth in dict.fromkeys(wanted) for m in (mults if pth == "blocks" else [1])]
                *cts, dt = (float(np.median(t)) for t in _burst_times([*cands, dense], x, reps))
                best = int(np.argmin(cts))
                ct, compact = cts[best], cands[best]
                choice = "compact" if ct < dt and _faster(compact, dense, x, reps) else "dense"
            else:
                assert compact is not None
                choice = "compact" if compact.modelled_cost(plan_tokens) < d_cost else "dense"
            if choice == "compact" and fallback:
                assert compact is not None
                faster = {plan_tokens: True}
                x2 = x.reshape(-1, layer.in_features) if measured else None
                for t in (t for t in FALLBACK_LADDER if t < plan_tokens):
                    if measured:
                        assert x2 is not None
                        xt = x2[:t] if x2.shape[0] >= t else torch.randn(t, layer.in_features, device=x2.device, dtype=x2.dtype)
                        faster[t] = _faster(compact, dense, xt, reps)
                    else:
                        faster[t] = compact.modelled_cost(t) < dense_cost(layer.in_features, layer.out_features, t)
                below = _fallback_threshold(faster)
                if below > 1:
                    compact.set_dense_fallback(below, dense.weight)
        c_cost = compact.modelled_cost(plan_tokens) if compact is not None else math.nan
        new = compact if choice == "compact" else dense
        assert new is not None
        new.train(layer.training)
        set_submodule(model, name, new)
        if measured and choice == "compact" and dense is not None:
            dense.train(layer.training)
            swaps[name] = (new, dense)
        report.layers.append(InferenceChoice(
            name=name, in_features=layer.in_features, out_features=layer.out_features, flops_ratio=layer.flops_ratio(),
            choice=choice, compact_cost=c_cost, dense_cost=d_cost, compact_time=ct, dense_time=dt,
            path=compact.path if choice == "compact" and compact is not None else None,
            dense_below=compact.dense_below if choice == "compact" and compact is not None else 0,
            rank_multiple=compact.rank_multiple if choice == "compact" and compact is not None else 1))
    if verify and swaps and sample_input is not None:
        report.model_ratio = _model_ratio(model, swaps, sample_input)
        if report.model_ratio > 1.0 - float(min_model_gain):
            report.reverted = True
            for c in report.layers:
                if c.name in swaps:
                    set_submodule(model, c.name, swaps[c.name][1])
                    c.choice, c.path, c.dense_below, c.rank_multiple = "dense", None, 0, 1
    return report
