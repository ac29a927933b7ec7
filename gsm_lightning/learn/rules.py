"""Structure rules: what moves the widths toward the FLOPs budget during phase 1.

A rule is a plain object with one small interface (:class:`StructureRule`), injected into
:class:`~gsm_lightning.training.module.GSMModule` like the optimizer (``rule:`` with ``class_path`` / ``init_args`` in
YAML).  Two implementations:

* :class:`BudgetRule` (the default): :class:`~gsm_lightning.learn.budget_learner.BudgetLearner`, a cut onto a cosine
  path of the FLOPs ratio to the budget, energy-weighted, with width steps normalised per layer side;
* :class:`PaperRule`: the paper's ``clamp(softshrink(w, lambda * lr), 0, 1)`` while the ratio is above the budget.

To add a rule: subclass :class:`StructureRule`, implement :meth:`~StructureRule.step` (and ``state_dict`` /
``load_state_dict`` if it keeps state), and name it in a config's ``model.rule.class_path``.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from .budget_learner import Allocation, BudgetLearner, CutWeighting, Tracking, WidthNorm, WidthStep
from .proximal import proximal_step
from .regrowth import Regrowth

__all__ = ["StructureRule", "BudgetRule", "PaperRule", "build_rule"]


#: BudgetRule's default regrowth (a config, not an instance: every rule builds its own, with its own state)
DEFAULT_REGROWTH: Mapping[str, Any] = {"class_path": "gsm_lightning.learn.regrowth.Regrowth", "init_args": {}}


def _fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a fraction of phase 1 in [0, 1], got {value!r}")
    return float(value)


class StructureRule(ABC):
    """How the structure (widths, locations) of the non-frozen GBLR layers moves after each real optimizer step.

    The module calls :meth:`bind` once when it is built, :meth:`start` when the optimizer is configured (the number of
    phase-1 optimizer steps is known then), and :meth:`step` after every real optimizer step of phase 1.

    Args:
        structure_lr: learning rate of the optimizer's ``structure`` group (AdamW, betas (0, 0.999), no decay):
            locations, and widths unless the rule moves them itself (:attr:`moves_widths`).
        start_step: optimizer steps before the rule may cut or shrink (width steps and location wrapping run from
            the first step).
    """

    #: True when the rule (not the optimizer) applies the width gradient step; the optimizer then gets the widths in
    #: a group of their own with lr 0 (cleared, unscaled and clipped, never moved by it).
    moves_widths: bool = False

    def __init__(self, structure_lr: float, start_step: int = 0) -> None:
        if isinstance(structure_lr, bool) or not isinstance(structure_lr, (int, float)) or not structure_lr > 0:
            raise ValueError(f"structure_lr must be > 0, got {structure_lr!r}")
        if isinstance(start_step, bool) or int(start_step) != start_step or start_step < 0:
            raise ValueError(f"start_step must be an integer >= 0, got {start_step!r}")
        self.structure_lr = float(structure_lr)
        self.start_step = int(start_step)
        self.budget = 1.0

    # ------------------------------------------------------------ lifecycle
    def bind(self, budget: float) -> None:
        """The FLOPs budget the rule steers to (the module's ``budget``)."""
        self.budget = float(budget)

    def start(self, phase1_steps: int) -> None:
        """Called when the optimizer is configured, with the number of real optimizer steps of phase 1."""
        return None

    def attach(self, model: nn.Module) -> None:
        """Called right after :meth:`start` with the converted backbone, before the first training forward: a rule
        that measures during the forward or backward passes registers its hooks here."""
        return None

    def finish(self, model: nn.Module) -> dict[str, float]:
        """Called at the phase switch, before the structure is frozen (and before any projection onto the budget):
        the rule's last change to the structure.  Returns scalars (empty by default)."""
        return {}

    @abstractmethod
    def step(self, model: nn.Module, lr: float, active: bool = True) -> dict[str, float]:
        """One update after a real optimizer step; ``lr`` is the structure group's current learning rate and
        ``active`` false before ``start_step``.  Returns scalars to log (``flops_ratio`` before the update, ...)."""

    def observe_output(self, output: Any) -> None:
        """Called in phase 1 after each training forward with the model's output, before the loss's backward: a rule
        that measures with a backward pass of its own runs it here (the graph is kept for the loss's backward)."""
        return None

    def target(self) -> float | None:
        """The FLOPs ratio the rule steers to now (for logging), or None."""
        return None

    def drop_components(self, keeps: Mapping[str, Tensor], sizes: Mapping[str, int]) -> bool:
        """Called at the start of a phase-1 epoch, before the module drops the components empty on both sides from
        layers ``keeps`` (name -> indices kept, of ``sizes[name]`` components).  A rule that supports it drops its own
        state of those components and returns True; False (the default, for a rule whose per-component state or
        width updates are not known to allow it) keeps them."""
        return False

    def conversion_budget(self, budget: float) -> float:
        """The FLOPs ratio a pretrained conversion fits at, for the module's ``budget`` (the budget itself; a rule
        that starts above it and removes components says how far above)."""
        return budget

    # ------------------------------------------------------------- defaults
    def layer_defaults(self, init: str) -> dict[str, Any]:
        """:class:`~gsm_lightning.core.layer.GBLRLinear` arguments this rule works best with, for ``init``."""
        return {}

    def describe(self) -> str:
        """The rule's knobs, for warnings that suggest a change."""
        return f"structure_lr={self.structure_lr:g}"

    def hint_for_projection(self) -> str:
        """What to change when phase 1 ended above the budget."""
        return "raise phase1_epochs"

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None

    def init_args(self) -> dict[str, Any]:
        """The constructor arguments (plain values): the rule's config is ``{"class_path", "init_args"}``."""
        return {"structure_lr": self.structure_lr, "start_step": self.start_step}

    def config(self) -> dict[str, Any]:
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": self.init_args()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_args().items())
        return f"{type(self).__name__}({args})"


class BudgetRule(StructureRule):
    """The budget learner (default): a cosine path of the FLOPs ratio to the budget and an exact, energy-weighted cut
    onto it (:class:`~gsm_lightning.learn.budget_learner.BudgetLearner` has the details).

    Args:
        path_fraction: part of phase 1 over which the path reaches the budget (then held).
        width_step: ``"side_rms"`` (widths step by their gradient over one running RMS per layer side, moved by the
            rule) or ``"adam"`` (per coordinate, by the optimizer).
        cut_weighting: where the cut falls: ``"energy"`` (FLOPs units, weak components faster), ``"density"``,
            ``"density_energy"``, ``"flops"`` or ``"uniform"``.
        energy_start: part of phase 1 after which the energy weighting applies.
        energy_power: exponent of the energy weight ``clip(mean_e / e_k, 0.1, 100) ** p``, clipped again.
        cost_power: ``e_k`` is the component's energy over its FLOPs to this power (0: the plain energy, the default
            before 2026-12-07; 1: energy per FLOP, as ``"density"``); in between (default 0.3), a narrow component is
            not cut first only for being narrow.  A checkpoint written before the option rebuilds its rule with the new
            default; pass ``cost_power=0`` to continue it with the cut it was trained with.
        width_lr_scale: the ``side_rms`` width step uses ``width_lr_scale * structure_lr`` (scheduled like every
            group); locations keep ``structure_lr``.
        tracking: ``"project"`` (the exact cut onto the path) or ``"dual"`` (a feedback-adapted soft threshold).
        width_norm: ``"side"`` (each layer side's width gradient over its own running RMS) or ``"model"`` (the
            gradient per FLOP over one RMS for the model, so FLOPs move between layers by measured gain).
        structure_lr: learning rate of the locations (and of the widths with ``width_step="adam"``).
        start_step: optimizer steps before any cut.
        regrowth: windows grow back by the gradient over the last part of phase 1, and into what is left under the
            budget at the switch (a :class:`~gsm_lightning.learn.regrowth.Regrowth`, or its ``{class_path,
            init_args}``; it starts no earlier than ``path_fraction``).  Default: ``Regrowth()``.  None: off.
        allocation: ``"global"`` (one cut for the model: the rule also learns how the FLOPs are shared between
            layers) or ``"layer"`` (each layer is held to the budget on its own, and regrowth grows each layer into
            its own room: the structure within a layer is learned, the allocation is uniform).

    Examples::

        GSMModule(backbone, budget=0.3, rule=BudgetRule(path_fraction=0.3, energy_power=1))
    """

    def __init__(
        self,
        path_fraction: float = 0.4,
        width_step: WidthStep = "side_rms",
        cut_weighting: CutWeighting = "energy",
        energy_start: float = 0.1,
        energy_power: float = 2.0,
        width_lr_scale: float = 4.0,
        tracking: Tracking = "project",
        structure_lr: float = 2.5e-3,
        start_step: int = 0,
        width_norm: WidthNorm = "side",
        regrowth: Regrowth | Mapping[str, Any] | None = DEFAULT_REGROWTH,
        cost_power: float = 0.3,
        allocation: Allocation = "global",
    ) -> None:
        super().__init__(structure_lr, start_step)
        self.regrowth = _as_regrowth(regrowth)
        self.path_fraction = _fraction("path_fraction", path_fraction)
        self.energy_start = _fraction("energy_start", energy_start)
        # validates the learner's own arguments now, not at the first step
        self.learner = BudgetLearner(1.0, path_steps=0, width_step=width_step, cut_weighting=cut_weighting,
                                     width_lr_scale=width_lr_scale, tracking=tracking, energy_power=energy_power,
                                     width_norm=width_norm, cost_power=cost_power, allocation=allocation)

    @property
    def moves_widths(self) -> bool:  # type: ignore[override]
        return self.learner.moves_widths

    def bind(self, budget: float) -> None:
        super().bind(budget)
        self.learner.budget = float(budget)

    def start(self, phase1_steps: int) -> None:
        self.learner.path_steps = int(round(self.path_fraction * phase1_steps))
        self.learner.energy_start_step = int(round(self.energy_start * phase1_steps))
        if self.regrowth is not None:
            self.regrowth.begin(phase1_steps, earliest=self.path_fraction)

    def attach(self, model: nn.Module) -> None:
        if self.regrowth is not None:
            self.regrowth.attach(model)

    def step(self, model: nn.Module, lr: float, active: bool = True) -> dict[str, float]:
        out = self.learner.step(model, lr, cut=active)
        if self.regrowth is not None:
            out["regrown"] = self.regrowth.step(model, self.budget, active=active, per_layer=self._per_layer)
        return out

    def finish(self, model: nn.Module) -> dict[str, float]:
        if self.regrowth is None:
            return {}
        return {"regrown": self.regrowth.finish(model, self.budget, per_layer=self._per_layer)}

    def drop_components(self, keeps: Mapping[str, Tensor], sizes: Mapping[str, int]) -> bool:
        """Supported: a component empty on both sides gets no width step (zero gradient) and no cut or growth moves
        it; the learner keeps its step and cut units over the components the layers had (:attr:`BudgetLearner.slots`),
        regrowth drops their rows of its sums."""
        self.learner.drop_components(keeps, sizes)
        if self.regrowth is not None:
            self.regrowth.drop_components(keeps, sizes)
        return True

    @property
    def _per_layer(self) -> bool:
        return self.learner.allocation == "layer"

    def target(self) -> float | None:
        return float(self.learner.target())

    def layer_defaults(self, init: str) -> dict[str, Any]:
        # Evenly spaced windows give the learner every offset to choose from, and factors at the LeCun scale (the SVD
        # of a 1/sqrt(in)-std matrix) train far better than the paper's 0.02 (BENCHMARKS.md: Fashion-MNIST and
        # teacher-student ablations).
        return {"location_init": "uniform", "init_std": "fan_in"} if init == "random" else {}

    def describe(self) -> str:
        return f"structure_lr={self.structure_lr:g} (widths step at {self.learner.width_lr_scale:g}x it)"

    def hint_for_projection(self) -> str:
        return "lower path_fraction or raise phase1_epochs"

    def state_dict(self) -> dict[str, Any]:
        state = self.learner.state_dict()
        if self.regrowth is not None:
            state["regrowth"] = self.regrowth.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        state = dict(state)
        regrowth = state.pop("regrowth", None)
        self.learner.load_state_dict(state)
        if self.regrowth is not None:
            # a checkpoint from before regrowth existed: its schedule counts from the learner's steps
            self.regrowth.load_state_dict(regrowth if regrowth is not None else {"steps": self.learner.steps})

    def init_args(self) -> dict[str, Any]:
        lr = self.learner
        return {"path_fraction": self.path_fraction, "width_step": lr.width_step, "cut_weighting": lr.cut_weighting,
                "energy_start": self.energy_start, "energy_power": lr.energy_power, "cost_power": lr.cost_power,
                "width_lr_scale": lr.width_lr_scale, "tracking": lr.tracking, **super().init_args(),
                **({"width_norm": lr.width_norm} if lr.width_norm != "side" else {}),
                **({"allocation": lr.allocation} if lr.allocation != "global" else {}),
                "regrowth": self.regrowth.config() if self.regrowth is not None else None}


class PaperRule(StructureRule):
    """The paper's rule: ``w <- clamp(softshrink(w, prox_lambda * lr), 0, 1)`` after every real optimizer step while
    the FLOPs ratio is above the budget; widths and locations are stepped by the optimizer (per-coordinate Adam).
    Kept to reproduce the reference recipe (with the paper's init: zero locations, factor std 0.02).

    Args:
        prox_lambda: threshold; the shrink per step is ``prox_lambda * lr_structure``.
        structure_lr: learning rate of the structure group (the paper's 5e-3).
        start_step: optimizer steps before any shrink.
    """

    def __init__(self, prox_lambda: float = 0.02, structure_lr: float = 5e-3, start_step: int = 0) -> None:
        super().__init__(structure_lr, start_step)
        if isinstance(prox_lambda, bool) or not isinstance(prox_lambda, (int, float)) or not prox_lambda >= 0:
            raise ValueError(f"prox_lambda must be >= 0, got {prox_lambda!r}")
        self.prox_lambda = float(prox_lambda)

    def step(self, model: nn.Module, lr: float, active: bool = True) -> dict[str, float]:
        return proximal_step(model, self.prox_lambda, lr, self.budget, shrink=active)

    def describe(self) -> str:
        return f"structure_lr={self.structure_lr:g} with prox_lambda={self.prox_lambda:g}"

    def hint_for_projection(self) -> str:
        return "raise prox_lambda or phase1_epochs, or use the default BudgetRule"

    def init_args(self) -> dict[str, Any]:
        return {"prox_lambda": self.prox_lambda, **super().init_args()}


def _as_regrowth(value: Regrowth | Mapping[str, Any] | None) -> Regrowth | None:
    if value is None or isinstance(value, Regrowth):
        return value
    if isinstance(value, Mapping):
        path = str(value.get("class_path", "Regrowth"))
        if path.rpartition(".")[2] != "Regrowth":
            raise ValueError(f"regrowth class_path {path!r} is not gsm_lightning.learn.regrowth.Regrowth")
        return Regrowth(**dict(value.get("init_args") or {}))
    raise ValueError(f"regrowth must be a Regrowth, a {{class_path, init_args}} mapping or None, got {value!r}")


def build_rule(rule: StructureRule | Mapping[str, Any] | None) -> StructureRule:
    """A rule from an instance, a ``{"class_path", "init_args"}`` mapping (as checkpoints store it) or None (the
    default :class:`BudgetRule`)."""
    if rule is None:
        return BudgetRule()
    if isinstance(rule, StructureRule):
        return rule
    if isinstance(rule, Mapping) and "class_path" in rule:
        path = str(rule["class_path"])
        module, _, name = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as e:
            raise ValueError(f"rule class_path {path!r} cannot be imported ({e}); the built-in rules are "
                             "gsm_lightning.learn.rules.BudgetRule and gsm_lightning.learn.rules.PaperRule") from None
        if not (isinstance(cls, type) and issubclass(cls, StructureRule)):
            raise ValueError(f"rule class_path {path!r} is not a StructureRule subclass")
        return cls(**dict(rule.get("init_args") or {}))
    raise ValueError(f"rule must be a StructureRule, a {{class_path, init_args}} mapping or None, got {rule!r}")
