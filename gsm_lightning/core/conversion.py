"""Replace the linear layers of ANY module tree by GBLR layers (plain PyTorch).

Layer names are matched with glob patterns (``fnmatch`` on the qualified module name,
e.g. ``"blocks.*.mlp.fc1"``) or regular expressions prefixed with ``re:``
(``"re:blocks\\.\\d+\\.attn\\.(q|k|v)"``, matched with ``re.fullmatch``).
"""

from __future__ import annotations

import fnmatch
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from torch import Tensor, nn

from .layer import GBLRLinear
from .modules import get_submodule_parent, set_submodule
from .whitening import InputStats, check_calibration, input_factor, relative_output_error

__all__ = ["gsmify", "select_linear_layers", "linear_types", "GSMReport", "ReplacedLayer", "get_submodule_parent"]

Init = Literal["pretrained", "random"]
_INITS = ("pretrained", "random")


def linear_types() -> tuple[type, ...]:
    """Module types treated as linear layers: ``nn.Linear`` and, when installed, HF ``Conv1D``."""
    types: list[type] = [nn.Linear]
    try:  # GPT-2 style Conv1D (weight stored as in x out)
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except Exception:  # transformers absent or incompatible
        pass
    return tuple(types)


def _linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    in_f, out_f = module.weight.shape  # Conv1D
    return int(in_f), int(out_f)


def _as_list(patterns: str | Sequence[str] | None) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    return list(patterns)


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _names_hint(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def select_linear_layers(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    types: tuple[type, ...] | None = None,
) -> list[str]:
    """Qualified names of the linear layers of ``model`` matching ``include`` and not ``exclude``.

    Raises ``ValueError`` if the model has no linear layer, or if any pattern matches none."""
    types = linear_types() if types is None else types
    # nn.MultiheadAttention reads out_proj.weight directly, so its linear children cannot be swapped
    # (use gsm_lightning.models.split_attention to turn it into separate q/k/v/out linears first).
    mha = {name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    candidates = [name for name, m in model.named_modules()
                  if isinstance(m, types) and name and name.rpartition(".")[0] not in mha]
    if not candidates:
        raise ValueError(
            f"the backbone {type(model).__name__} has no linear layers ({', '.join(t.__name__ for t in types)}) to convert"
        )
    if include is not None and not _as_list(include):
        raise ValueError("include=[] selects no layer; pass include=None (or omit it) to convert every linear layer, "
                         "or use method='dense' to convert nothing")
    include_l, exclude_l = _as_list(include) or ["*"], _as_list(exclude)
    for kind, pats in (("include", include_l), ("exclude", exclude_l)):
        for p in pats:
            if not any(_matches(p, n) for n in candidates):
                raise ValueError(
                    f"{kind} pattern {p!r} matches no linear layer of {type(model).__name__}; "
                    f"linear layers are: {_names_hint(candidates)}"
                )
    chosen = [n for n in candidates if any(_matches(p, n) for p in include_l) and not any(_matches(p, n) for p in exclude_l)]
    if not chosen:
        raise ValueError(f"include={include_l} minus exclude={exclude_l} leaves no layer to convert")
    return chosen


def _tied_weights(model: nn.Module) -> dict[int, list[str]]:
    """``id(parameter) -> qualified names`` of every parameter that appears under more than one name."""
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return {k: v for k, v in names.items() if len(v) > 1}


@dataclass
class ReplacedLayer:
    name: str
    kind: str
    in_features: int
    out_features: int
    num_components: int
    flops: int
    dense_flops: int
    fit_error: float | None = None
    #: relative output error ``||(W - W') S||_F / ||W S||_F`` (not squared) on the calibration statistics, when given
    output_error: float | None = None

    @property
    def flops_ratio(self) -> float:
        return self.flops / self.dense_flops


@dataclass
class GSMReport:
    """What :func:`gsmify` replaced."""

    budget: float
    init: str
    layers: list[ReplacedLayer] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def flops(self) -> int:
        return sum(layer.flops for layer in self.layers)

    @property
    def dense_flops(self) -> int:
        return sum(layer.dense_flops for layer in self.layers)

    @property
    def flops_ratio(self) -> float:
        return self.flops / self.dense_flops if self.dense_flops else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "init": self.init, "flops_ratio": self.flops_ratio,
                "layers": [asdict(layer) for layer in self.layers]}

    def __len__(self) -> int:
        return len(self.layers)

    def __str__(self) -> str:
        lines = [f"gsmify: {len(self.layers)} layers, init={self.init}, budget={self.budget:g}, "
                 f"FLOPs ratio of converted layers {self.flops_ratio:.3f}"]
        for layer in self.layers:
            fit = "" if layer.fit_error is None else f" fit error {layer.fit_error:.4f}"
            fit += "" if layer.output_error is None else f" output error {layer.output_error:.4f}"
            lines.append(f"  {layer.name:<40} {layer.kind:<7} {layer.in_features:>5}->{layer.out_features:<5} "
                         f"K={layer.num_components:<5} flops ratio {layer.flops_ratio:.3f}{fit}")
        return "\n".join(lines)


def check_layer_budgets(layer_budgets: Mapping[str, float] | None, names: Sequence[str], init: str,
                        fixed: bool = False) -> dict[str, float]:
    """Validate per-layer budgets against the selected layer ``names``; ``{}`` for None.  ``fixed``: the layers are
    fixed structures (any init; GBLR's random init has no per-layer budget, its budget is a learning target)."""
    if layer_budgets is None:
        return {}
    if init != "pretrained" and not fixed:
        raise ValueError(f"layer_budgets fit each pretrained layer to its own budget: it needs init='pretrained', got "
                         f"init={init!r}")
    unknown = sorted(set(layer_budgets) - set(names))
    if unknown:
        raise ValueError(f"layer_budgets names layers that are not converted: {unknown}; converted: {list(names)}")
    bad = {n: b for n, b in layer_budgets.items()
           if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 1}
    if bad:
        raise ValueError(f"layer_budgets must be FLOPs ratios in (0, 1]; got {bad}")
    return {n: float(b) for n, b in layer_budgets.items()}


def gsmify(
    model: nn.Module,
    budget: float = 1.0,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    init: Init = "pretrained",
    fit_steps: int = 300,
    layer_factory: Callable[..., nn.Module] | None = None,
    calibration: Mapping[str, InputStats | Tensor] | None = None,
    layer_budgets: Mapping[str, float] | None = None,
    **layer_kwargs: Any,
) -> GSMReport:
    """Replace matching ``nn.Linear`` (and HF ``Conv1D``) modules of ``model`` in place by GBLR layers.

    Args:
        model: any module tree.
        budget: FLOPs budget in (0, 1] as a fraction of the dense layers' FLOPs.  With
            ``init="pretrained"`` each layer is fitted to it; with ``init="random"`` the layers start
            at ``width_init`` (default ``"splr"``, equal cost to dense) and the budget is the target
            of structure learning.
        include / exclude: glob or ``re:`` patterns on qualified layer names.
        init: ``"pretrained"`` (SVD of the existing weights, :meth:`GBLRLinear.from_linear`) or ``"random"``.
        fit_steps: fitting steps of the pretrained conversion.
        layer_factory: optional ``f(linear, name) -> nn.Module`` overriding the GBLR construction.
        calibration: input statistics ``{layer name: InputStats}`` from
            :func:`~gsm_lightning.core.calibration.collect_input_stats` (or ``{name: factor S}``), keyed by the names
            this call selects: activation-aware conversion (``init="pretrained"`` only), fitting each layer to its
            output error ``||(W - W') S||_F`` (:meth:`GBLRLinear.from_linear` with ``input_factor``; never worse than
            the whitened SVD of the same FLOPs).  The report's ``output_error`` holds the relative output error of
            each layer.  A converted layer without statistics raises ``ValueError``.
        layer_budgets: ``{layer name: FLOPs ratio}`` overriding ``budget`` for those layers of an
            ``init="pretrained"`` conversion (a per-layer allocation, e.g. from
            :func:`~gsm_lightning.core.allocation.allocate_from_curves`); names must be among the converted layers.
            A per-layer ratio of 1 gives a fit just under the dense layer's cost (a square layer: one component fewer
            than the ``in out / (in + out)`` that cost exactly dense), not the lossless ``budget=1.0`` convention,
            whose full SVD may cost up to twice dense.
        **layer_kwargs: passed to :class:`GBLRLinear`.

    Returns:
        a :class:`GSMReport` of the replaced layers.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"budget must be a number in (0, 1] (fraction of dense FLOPs), got {budget!r}")
    if init not in _INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {_INITS}")
    names = select_linear_layers(model, include, exclude)
    tied = _tied_weights(model)
    if calibration is not None and (init != "pretrained" or layer_factory is not None):
        raise ValueError("calibration applies to init='pretrained' conversions by gsmify itself (not init='random', "
                         "not with a layer_factory)")
    calibration = check_calibration(calibration, [n for n in names if id(model.get_submodule(n).weight) not in tied])
    layer_budgets = check_layer_budgets(layer_budgets, names, init)
    report = GSMReport(budget=float(budget), init=init)
    for name in names:
        old = model.get_submodule(name)
        in_f, out_f = _linear_shape(old)
        if id(old.weight) in tied:
            others = [n for n in tied[id(old.weight)] if n != f"{name}.weight"]
            warnings.warn(
                f"gsmify: layer '{name}' ({in_f}->{out_f}) shares its weight with {', '.join(others)}; converting it "
                "would untie them, so it is kept dense (tied). Add it to exclude to silence this warning",
                stacklevel=2)
            continue
        fit_error = output_error = None
        if layer_factory is not None:
            new = layer_factory(old, name)
        elif init == "pretrained":
            factor = None if calibration is None else input_factor(calibration[name], in_f)
            # a per-layer budget of 1 is the best fit that costs no more than dense, not the lossless convention of
            # budget=1.0 (full SVD, up to 2x dense), which would spend FLOPs the allocation gave to other layers
            layer_budget = min(layer_budgets[name], math.nextafter(1.0, 0.0)) if name in layer_budgets else budget
            new = GBLRLinear.from_linear(old, budget=layer_budget, fit_steps=fit_steps, input_factor=factor,
                                         **layer_kwargs)
            with_w = (old.weight.detach().t() if type(old).__name__ == "Conv1D" else old.weight.detach()).float()
            fit_error = float(((new.to_dense().detach().float() - with_w).norm() / with_w.norm().clamp_min(1e-30)) ** 2)
            if factor is not None:
                output_error = relative_output_error(with_w, new.to_dense().detach(), factor)
            if new.flops() == 0 and bool(with_w.any()):
                warnings.warn(
                    f"gsmify: layer '{name}' ({in_f}->{out_f}) cannot be fitted at budget {budget:g} (the fit leaves no "
                    f"component, i.e. a zero weight, relative error {fit_error:.3f}); it is kept dense. Raise the "
                    f"budget, or add '{name}' to exclude to silence this warning",
                    stacklevel=2)
                continue
        else:
            bias = getattr(old, "bias", None) is not None
            new = GBLRLinear(in_f, out_f, bias=bias, device=old.weight.device, dtype=old.weight.dtype, **layer_kwargs)
        new.train(old.training)
        if isinstance(new, GBLRLinear):
            new._gsm_name = name
        set_submodule(model, name, new)
        flops = new.flops() if hasattr(new, "flops") else in_f * out_f
        report.layers.append(ReplacedLayer(
            name=name, kind=type(old).__name__, in_features=in_f, out_features=out_f,
            num_components=getattr(new, "num_components", 0), flops=int(flops), dense_flops=in_f * out_f,
            fit_error=fit_error, output_error=output_error,
        ))
    return report
