"""What a module converts and how: one object for the conversion settings of ``GSMModule`` (plain PyTorch)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from torch import nn

from .conversion import GSMReport, gsmify, select_linear_layers

__all__ = ["Conversion", "Calibration", "MeasuredAllocation", "Method"]

Method = Literal["gblr", "dense", "lowrank", "monarch", "blocksparse"]
_METHODS = ("gblr", "dense", "lowrank", "monarch", "blocksparse")


@dataclass
class Calibration:
    """Activation-aware conversion: before converting, run ``batches`` training batches through the dense model and
    collect each converted layer's input second moment ``X^T X`` (:func:`~gsm_lightning.core.calibration.
    collect_input_stats`, streamed with hooks; summed across DDP ranks), so that each layer fit minimises its output
    error ``||(W - W') X||`` instead of its weight error.

    Args:
        batches: training batches to run (of the data module's ``train_dataloader``).
        diagonal: keep only the diagonal of ``X^T X`` (memory ``in`` instead of ``in^2`` per layer, for wide layers; a
            per-channel scaling, as ASVD does, instead of full whitening).
        sequential: convert the layers one group at a time in forward order (layers sharing an input together), each
            fitted to the dense model's output from the inputs the already converted layers give it
            (:func:`~gsm_lightning.core.calibration.convert_sequentially`): later layers correct for the errors of
            earlier ones.  Cost: each group reruns the dense and the partly converted model up to that group on every
            calibration batch (about ``groups / 2`` times the forward passes of plain calibration, for a stack of
            equal blocks), and one copy of the backbone while converting.
        damp: ridge of the sequential fit toward the dense weight, relative to the mean input energy
            (:func:`~gsm_lightning.core.calibration.target_corrected_weight`).
        mask_padding: count only the tokens the batch's ``attention_mask`` marks (a mapping batch, or a tuple whose
            first item is one; :func:`~gsm_lightning.core.calibration.padding_mask`): padding positions are not data.
            False: every position, padding included (the behaviour before this option).

    Memory: ``in^2`` float64 numbers per converted layer while converting (1.2 MB for a 384-wide input, 19 MB for
    1536, about 1 GB for 11008); freed after the conversion.
    """

    batches: int = 16
    diagonal: bool = False
    sequential: bool = False
    damp: float = 0.01
    mask_padding: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.batches, bool) or not isinstance(self.batches, int) or self.batches < 1:
            raise ValueError(f"calibration batches must be an integer >= 1, got {self.batches!r}")
        for key in ("sequential", "mask_padding"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"calibration {key} must be true or false, got {getattr(self, key)!r}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 < self.damp < float("inf"):
            raise ValueError(f"calibration damp must be a number > 0 (the ridge toward the dense weight), got "
                             f"{self.damp!r}")
        self.damp = float(self.damp)


@dataclass
class MeasuredAllocation:
    """Spread one FLOPs budget over the converted layers by what each layer's truncation does to the model's output
    (:func:`~gsm_lightning.core.allocation.layer_sensitivity`): a layer alone is replaced by its whitened SVD and the
    relative output error of the model on the first ``batches`` calibration batches is measured.

    * ``grid=None`` (default, cheap): one point per layer, at the budget's ratio; each layer's error at any other rank
      is extrapolated as its measured gain times its whitened tail energy (:func:`~gsm_lightning.core.allocation.
      layer_gains`), and the ranks are bought greedily by predicted gain per FLOP
      (:func:`~gsm_lightning.core.baselines.allocate_ranks_greedy` with ``gains``).  Cost: one forward pass of the
      batches per layer.
    * ``grid=[...]``: each ratio of the grid is measured per layer and the budget goes to the measured steps with
      the largest gain per FLOP (:func:`~gsm_lightning.core.allocation.allocate_from_curves`).  Cost: ``len(grid)``
      forward passes per layer.

    Needs a calibrated ``init="pretrained"`` conversion.  GBLR starts from these per-layer budgets and its rule may
    move FLOPs from there; the low-rank baseline keeps them.

    Args:
        batches: calibration batches to judge on (the first ones of ``Calibration.batches``).
        grid: FLOPs ratios in (0, 1] measured per layer, or None for the one-point form.

    Examples:
        In YAML: ``conversion: {init: pretrained, calibration: {batches: 8}, allocation: {batches: 2}}``, or
        ``allocation: measured`` for the defaults.
    """

    batches: int = 2
    grid: list[float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.batches, bool) or not isinstance(self.batches, int) or self.batches < 1:
            raise ValueError(f"allocation batches must be an integer >= 1, got {self.batches!r}")
        if self.grid is None:
            return
        self.grid = [float(g) for g in self.grid] if isinstance(self.grid, (list, tuple)) else self.grid
        if (not isinstance(self.grid, list) or not self.grid
                or any(isinstance(g, bool) or not 0 < g <= 1 for g in self.grid)):
            raise ValueError(f"allocation grid must be None or a non-empty list of FLOPs ratios in (0, 1], got "
                             f"{self.grid!r}")

    def layer_budgets(self, backbone: nn.Module, budget: float, calibration: Mapping[str, Any], batches: list[Any],
                      forward: Any) -> dict[str, float]:
        """Per-layer FLOPs ratios at total ``budget`` for the dense ``backbone`` (see the class docstring)."""
        from .allocation import allocate_from_curves, layer_gains, layer_sensitivity, ranks_to_ratios
        from .baselines import allocate_ranks_greedy

        curves = layer_sensitivity(backbone, calibration, batches[: self.batches],
                                   grid=[budget] if self.grid is None else self.grid, forward=forward)
        weights = {n: backbone.get_submodule(n).weight.detach() for n in curves}
        shapes = {n: tuple(w.shape) for n, w in weights.items()}
        if self.grid is None:
            ranks = allocate_ranks_greedy(weights, calibration, budget, gains=layer_gains(curves, weights, calibration))
        else:
            ranks = allocate_from_curves(curves, shapes, budget)
        return ranks_to_ratios(ranks, shapes)


@dataclass
class Conversion:
    """Which linear layers of a backbone become structured, as what, and from which weights.

    Args:
        method: ``"gblr"`` (learned structure), ``"dense"`` (no conversion; ``calibration``, ``allocation`` and
            ``layer_budgets`` are then dropped with a warning, so that any config has a dense comparator) or a fixed
            baseline (``"lowrank"``, ``"monarch"``, ``"blocksparse"``) at the same budget.
        include / exclude: glob or ``re:`` patterns of layers to convert (default: the backbone's
            ``gsm_default_include`` if it has one, else every linear layer).
        init: ``"random"`` (GBLR: SVD of trunc-normal, ``width_init``; a baseline: the projection of the same kind
            of random dense matrix onto its structure, so that it starts like GBLR), ``"pretrained"`` (fit the
            backbone's own weights to the budget) or, for a baseline only, ``"per_factor"`` (each factor initialised
            like an ``nn.Linear`` of its own: a smaller start, the ablation of the equal init).
        fit_steps: fitting steps of the pretrained GBLR conversion.
        layer_kwargs: extra :class:`~gsm_lightning.core.layer.GBLRLinear` arguments (``rank_per_component``,
            ``width_init``, ...); for a baseline ``method``, :func:`~gsm_lightning.core.baselines.baselinify` options
            (``rank``, ``nblocks``, ``block_size``).  The structure rule adds its own defaults under these
            (:meth:`~gsm_lightning.learn.rules.StructureRule.layer_defaults`).
        calibration: a :class:`Calibration` for an activation-aware ``init="pretrained"`` conversion (GBLR and the
            low-rank, Monarch and block-sparse baselines); the module then converts in ``setup``, once the data is
            known.  None (default): a weight-space fit.
        allocation: how the budget is spread over layers at conversion: ``"uniform"`` (every layer at the budget),
            ``"global"`` (low-rank baseline only: one FLOPs budget for all converted layers, ranks chosen greedily on
            the (whitened) singular values), or a :class:`MeasuredAllocation` (``"measured"`` for its defaults; GBLR
            and low-rank, calibrated: per-layer budgets from the model's measured output error).  GBLR's rule may move
            FLOPs between layers in phase 1 from whatever it starts with.
        layer_budgets: explicit per-layer FLOPs ratios ``{layer name: ratio}`` overriding the budget for those layers
            (a fixed baseline with any init, e.g. the allocation a GBLR run learned; GBLR with ``init="pretrained"``);
            with ``allocation="uniform"`` only.
    """

    method: Method = "gblr"
    include: list[str] | None = None
    exclude: list[str] | None = None
    init: Literal["random", "pretrained", "per_factor"] = "random"
    fit_steps: int = 300
    layer_kwargs: dict[str, Any] = field(default_factory=dict)
    calibration: Calibration | None = None
    allocation: Literal["uniform", "global", "measured"] | MeasuredAllocation = "uniform"
    layer_budgets: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected gblr, dense, lowrank, monarch or blocksparse")
        if self.init not in ("random", "pretrained", "per_factor"):
            raise ValueError(f"unknown init {self.init!r}; expected 'random', 'pretrained' or 'per_factor'")
        if self.init == "per_factor" and self.method in ("gblr", "dense"):
            raise ValueError(f"init='per_factor' initialises a fixed baseline's factors one by one; method="
                             f"{self.method!r} has no such init (use 'random' or 'pretrained')")
        self.layer_kwargs = dict(self.layer_kwargs or {})
        if self.method == "dense":
            self._drop_conversion_options()
        if isinstance(self.calibration, dict):
            self.calibration = Calibration(**self.calibration)
        if self.calibration is not None and self.init != "pretrained":
            raise ValueError("calibration fits pretrained weights to their activations: it needs init='pretrained'")
        if self.allocation == "measured":
            self.allocation = MeasuredAllocation()
        elif isinstance(self.allocation, dict):
            self.allocation = MeasuredAllocation(**self.allocation)
        if isinstance(self.allocation, MeasuredAllocation):
            if self.method not in ("gblr", "lowrank") or self.calibration is None:
                raise ValueError("a measured allocation truncates each layer's whitened SVD: it needs method 'gblr' or "
                                 f"'lowrank' with calibration (init='pretrained'); got method={self.method!r}"
                                 f"{'' if self.calibration is not None else ' without calibration'}")
        elif self.allocation not in ("uniform", "global"):
            raise ValueError(f"unknown allocation {self.allocation!r}; expected 'uniform', 'global' or 'measured' "
                             "(a MeasuredAllocation)")
        if self.layer_budgets is not None:
            if self.allocation != "uniform":
                raise ValueError("layer_budgets is an allocation of its own: use it with allocation='uniform'")
            if self.method == "dense" or (self.method == "gblr" and self.init != "pretrained"):
                raise ValueError(f"layer_budgets sets the per-layer budgets of a fixed baseline or of a pretrained GBLR "
                                 f"conversion; method={self.method!r} with init={self.init!r} has none (GBLR's random "
                                 "init learns its allocation toward the one budget)")
            self.layer_budgets = dict(self.layer_budgets)
        if self.allocation == "global" and self.method != "lowrank":
            raise ValueError(f"allocation='global' chooses the ranks of the low-rank baseline; method={self.method!r} "
                             "allocates otherwise (GBLR: learned in phase 1)")

    def _drop_conversion_options(self) -> None:
        """``method="dense"`` converts nothing: calibration, allocation and per-layer budgets have nothing to act on.

        They are dropped with a warning (not an error), so that ``--model.conversion.method dense`` gives the dense
        comparator of any config, calibrated or not, without a calibration pass that nothing would use."""
        if isinstance(self.allocation, str) and self.allocation not in ("uniform", "global", "measured"):
            raise ValueError(f"unknown allocation {self.allocation!r}; expected 'uniform', 'global' or 'measured' "
                             "(a MeasuredAllocation)")
        dropped = [k for k, v in (("calibration", self.calibration is not None),
                                  ("allocation", self.allocation != "uniform"),
                                  ("layer_budgets", self.layer_budgets is not None)) if v]
        if dropped:
            warnings.warn(f"conversion.method='dense' converts no layer: {', '.join(dropped)} ignored (no calibration "
                          "pass runs)", UserWarning, stacklevel=3)
        self.calibration, self.allocation, self.layer_budgets = None, "uniform", None

    def include_for(self, backbone: nn.Module) -> Any:
        """The include patterns in force for ``backbone`` (its ``gsm_default_include`` when none are given)."""
        return self.include if self.include is not None else getattr(backbone, "gsm_default_include", None)
    def layer_names(self, backbone: nn.Module) -> list[str]:
        """The qualified names of the layers this conversion replaces (what calibration hooks)."""
        return list(select_linear_layers(backbone, self.include_for(backbone), self.exclude))

    def global_layer_budgets(self, backbone: nn.Module, budget: float,
                             calibration: Mapping[str, Any]) -> dict[str, float]:
        """The per-layer FLOPs ratios of ``allocation="global"`` (the ranks :func:`~gsm_lightning.core.baselines.
        allocate_ranks_greedy` picks on the whitened singular values), for a conversion done group by group."""
        from .allocation import ranks_to_ratios
        from .baselines import allocate_ranks_greedy, dense_weight

        weights = {n: dense_weight(backbone.get_submodule(n)) for n in self.layer_names(backbone)}
        ranks = allocate_ranks_greedy(weights, calibration, budget)
        return ranks_to_ratios(ranks, {n: tuple(w.shape) for n, w in weights.items()})

    def apply(self, backbone: nn.Module, budget: float, layer_defaults: dict[str, Any] | None = None,
              calibration: Mapping[str, Any] | None = None, skeleton: bool = False,
              layer_budgets: Mapping[str, float] | None = None, names: list[str] | None = None) -> GSMReport | None:
        """Convert ``backbone`` in place; returns the conversion report (None for ``"dense"``).

        ``calibration``: the statistics of :func:`~gsm_lightning.core.calibration.collect_input_stats`.
        ``skeleton``: only the layers' shapes matter (their weights are about to be loaded from a checkpoint): a quick
        random init instead of the fit.  ``layer_budgets``: per-layer FLOPs ratios (a measured or global
        allocation's; they replace ``allocation``).  ``names``: convert only these layers (qualified names, as
        :meth:`layer_names` gives them; a sequential conversion converts one group at a time)."""
        include = self.include_for(backbone)
        exclude = self.exclude
        if self.method == "dense":
            return None
        if self.layer_budgets is not None:
            layer_budgets = self.layer_budgets
        if names is not None:
            include, exclude = [f"re:{re.escape(n)}" for n in names], None
            if layer_budgets is not None:
                layer_budgets = {n: b for n, b in layer_budgets.items() if n in names}
        init = ("random" if self.method == "gblr" else "per_factor") if skeleton else self.init
        if self.method == "gblr":
            kwargs = {**(layer_defaults or {}), **self.layer_kwargs}
            return gsmify(backbone, budget=budget, include=include, exclude=exclude, init=init,
                          fit_steps=self.fit_steps, calibration=None if skeleton else calibration,
                          layer_budgets=None if skeleton else layer_budgets, **kwargs)
        from .baselines import baselinify

        if skeleton and self.allocation != "uniform":
            raise ValueError("a low-rank baseline with a global or measured allocation has per-layer ranks chosen from "
                             "calibration data: it cannot be rebuilt without it; load its weights into a module "
                             "converted with the same calibration")
        explicit = layer_budgets is not None
        return baselinify(backbone, method=self.method, budget=budget, include=include, exclude=exclude, init=init,
                          calibration=None if skeleton else calibration,
                          allocation="uniform" if explicit else self.allocation,
                          layer_budgets=layer_budgets if explicit else None, **self.layer_kwargs)

    def config(self) -> dict[str, Any]:
        return asdict(self)
