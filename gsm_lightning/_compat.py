"""Old flat module paths (``gsm_lightning.layer``, ``gsm_lightning.module``, ...) as aliases of their new homes.

Before the sub-packages, every module sat directly under ``gsm_lightning``.  Configs (``class_path``), pickled
checkpoints and user code name those paths, so each old name imports the *same module object* as its new path
(a class keeps one identity, ``mock.patch`` on either name patches both).  Import the new path in new code.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

#: old flat module -> its new home (relative to ``gsm_lightning``)
MOVED: dict[str, str] = {
    "masks": "core.masks",
    "flops": "core.flops",
    "layer": "core.layer",
    "align": "core.align",
    "conversion": "core.conversion",
    "baselines": "core.baselines",
    "proximal": "learn.proximal",
    "budget_learner": "learn.budget_learner",
    "compact_plan": "infer.compact_plan",
    "compact": "infer.compact",
    "inference": "infer.inference",
    "flop_count": "infer.flop_count",
    "structure_io": "io.structure_io",
    "export": "io.export",
    "structure": "report.structure",
    "plotting": "report.plotting",
    "module": "training.module",
    "metrics": "training.metrics",
    "callbacks": "training.callbacks",
    "teacher": "data.teacher",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):  # the new module itself stands in for the old name
        return importlib.import_module(self.target)

    def exec_module(self, module) -> None:  # already executed under its new name
        pass


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Resolves ``gsm_lightning.<old>`` (and its submodules, e.g. ``gsm_lightning.callbacks.structure_monitor``)."""

    def find_spec(self, fullname, path=None, target=None):
        parts = fullname.split(".")
        if len(parts) < 2 or parts[0] != __package__ or parts[1] not in MOVED:
            return None
        new = ".".join([__package__, MOVED[parts[1]], *parts[2:]])
        if importlib.util.find_spec(new) is None:
            return None
        spec = importlib.util.spec_from_loader(fullname, _AliasLoader(new), is_package=len(parts) == 2 and parts[1] == "callbacks")
        return spec


def install() -> None:
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())  # before the path finder, which would load a second copy of a submodule
