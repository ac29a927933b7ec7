"""The flat ``GSMModule`` arguments of earlier versions, translated into the policy objects that replaced them.

Before the structure rule, the sigma schedule, the conversion and the phase switch were objects, ``GSMModule`` took 32
flat arguments (``include``, ``shrink``, ``prox_lambda``, ``sigma0``, ``freeze_align``, ...).  Old checkpoints store
them in ``hyper_parameters`` and old code passes them, so :class:`GSMModule` still accepts them, translates them here
(with a ``DeprecationWarning`` naming the new argument) and stores only the new form.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from ..core.conversion_spec import Conversion
from ..learn.rules import BudgetRule, PaperRule, StructureRule, build_rule
from ..learn.schedules import SigmaSchedule
from ..learn.switch import PhaseSwitch

__all__ = ["split_legacy_kwargs", "LEGACY_NAMES"]

_CONVERSION = {"method": "method", "include": "include", "exclude": "exclude", "init": "init", "fit_steps": "fit_steps",
               "layer_kwargs": "layer_kwargs"}
_BUDGET = {"path_fraction": "path_fraction", "width_step": "width_step", "cut_weighting": "cut_weighting",
           "energy_start": "energy_start", "energy_power": "energy_power", "width_lr_scale": "width_lr_scale",
           "tracking": "tracking"}
_PAPER = {"prox_lambda": "prox_lambda"}
_RULE_COMMON = {"structure_lr": "structure_lr", "prox_start_step": "start_step"}
_SIGMA = {"sigma0": "sigma0", "sigma1": "sigma1", "sigma_start_epoch": "start_epoch", "sigma_end_epoch": "end_epoch"}
_SWITCH = {"enforce_budget_at_freeze": "enforce_budget", "freeze_align": "align"}

#: every flat name this module translates, with the argument that replaced it
LEGACY_NAMES: dict[str, str] = {
    **{k: f"conversion.{v}" for k, v in _CONVERSION.items()},
    "shrink": "rule (BudgetRule or PaperRule)",
    **{k: f"rule.init_args.{v} (BudgetRule)" for k, v in _BUDGET.items()},
    **{k: f"rule.init_args.{v} (PaperRule)" for k, v in _PAPER.items()},
    **{k: f"rule.init_args.{v}" for k, v in _RULE_COMMON.items()},
    **{k: f"sigma.{v}" for k, v in _SIGMA.items()},
    **{k: f"switch.{v}" for k, v in _SWITCH.items()},
}


def split_legacy_kwargs(
    legacy: Mapping[str, Any],
    conversion: Conversion | Mapping[str, Any] | None,
    rule: StructureRule | Mapping[str, Any] | None,
    sigma: SigmaSchedule | Mapping[str, Any] | None,
    switch: PhaseSwitch | Mapping[str, Any] | None,
    stacklevel: int = 2,
) -> tuple[Any, Any, Any, Any]:
    """``(conversion, rule, sigma, switch)`` with the flat ``legacy`` arguments folded in.

    Raises ``TypeError`` for a name that was never an argument, and ``ValueError`` when a flat argument and the
    object that replaced it are both given (the module could not tell which one the user meant)."""
    unknown = sorted(set(legacy) - set(LEGACY_NAMES))
    if unknown:
        raise TypeError(f"GSMModule got unexpected arguments {unknown}; its arguments are backbone, task, num_classes, "
                        "budget, conversion, rule, sigma, phase1_epochs, switch, label_smoothing, optimizer, "
                        "lr_scheduler, warmup_epochs")
    given = dict(legacy)
    warnings.warn("GSMModule: flat arguments " + ", ".join(f"{k} -> {LEGACY_NAMES[k]}" for k in sorted(given))
                  + " are deprecated; pass the objects instead", DeprecationWarning, stacklevel=stacklevel)

    def fold(obj: Any, names: dict[str, str], what: str, cls: type) -> Any:
        picked = {new: given[old] for old, new in names.items() if old in given}
        if not picked:
            return obj
        if obj is not None:
            raise ValueError(f"both {what}= and its flat arguments {sorted(k for k in given if k in names)} were given; "
                             f"use only {what}")
        return cls(**picked)

    conversion = fold(conversion, _CONVERSION, "conversion", Conversion)
    sigma = fold(sigma, _SIGMA, "sigma", SigmaSchedule)
    switch = fold(switch, _SWITCH, "switch", PhaseSwitch)
    rule_names = set(_BUDGET) | set(_PAPER) | set(_RULE_COMMON) | {"shrink"}
    if any(k in given for k in rule_names):
        if rule is not None:
            raise ValueError(f"both rule= and the flat arguments {sorted(k for k in given if k in rule_names)} were "
                             "given; use only rule")
        shrink = given.get("shrink", "budget")
        if shrink not in ("budget", "paper"):
            raise ValueError(f"unknown shrink {shrink!r}; expected 'budget' (BudgetRule) or 'paper' (PaperRule)")
        cls, own = (BudgetRule, _BUDGET) if shrink == "budget" else (PaperRule, _PAPER)
        args = {new: given[old] for old, new in {**own, **_RULE_COMMON}.items() if old in given}
        if args.get("structure_lr") is None:  # old default: None = the rule's own default
            args.pop("structure_lr", None)
        # a flat argument of the other rule was ignored by the old module too; validate it as it did
        lam = given.get("prox_lambda")
        if cls is BudgetRule and lam is not None and not lam >= 0:
            raise ValueError(f"prox_lambda must be >= 0, got {lam}")
        rule = cls(**args)
    return conversion, rule, sigma, switch


def migrate_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``hyper_parameters`` in the current form (old flat names folded into the objects' configs);
    current ones come back unchanged.  For the CLI's ``--ckpt_path``, which parses them as a config."""
    old = {k: v for k, v in hparams.items() if k in LEGACY_NAMES}
    if not old:
        return dict(hparams)
    rest = {k: v for k, v in hparams.items() if k not in LEGACY_NAMES}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        conversion, rule, sigma, switch = split_legacy_kwargs(old, rest.pop("conversion", None), rest.pop("rule", None),
                                                              rest.pop("sigma", None), rest.pop("switch", None))
    rest.update(conversion=asdict(conversion) if conversion is not None else None,
                rule=build_rule(rule).config() if rule is not None else None,
                sigma=asdict(sigma) if sigma is not None else None,
                switch=asdict(switch) if switch is not None else None)
    return {k: v for k, v in rest.items() if v is not None}
