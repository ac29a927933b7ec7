"""gsm_lightning: learnable Generalized Structured Matrices (GBLR + Gaudi masks) for any backbone.

Sub-packages by concern, each importing only those before it: ``core`` (masks, FLOPs, the layer, conversion,
baselines) < ``learn`` (structure rules, schedules) < ``infer`` (compact kernels, FLOP counting) < ``io``
(structure files, export, checkpoints) < ``report`` (statistics, figures, the report command) < ``training``
(the Lightning layer) < ``data``, ``models``, ``cli``.  ``docs/ARCHITECTURE.md`` is the map.  Importing this
package does not import Lightning; the Lightning parts (``GSMModule``, callbacks, data, CLI) load on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import _compat
from .core.conversion import GSMReport, gsmify, select_linear_layers
from .core.layer import GBLRLinear, model_flops
from .core.masks import boxcar_mask, gaudi_mask
from .infer import flop_count as _flop_count  # noqa: F401  (installs the frozen-layer route for FlopCounterMode)

_compat.install()

__version__ = "0.1.0"

__all__ = ["GBLRLinear", "gsmify", "select_linear_layers", "GSMReport", "model_flops", "gaudi_mask", "boxcar_mask",
           "__version__"]

_LAZY = {
    "GSMModule": "gsm_lightning.training.module",
    "StructureMonitor": "gsm_lightning.training.callbacks",
    "StructureVisualizer": "gsm_lightning.training.callbacks",
    "StructureReport": "gsm_lightning.training.callbacks",
    "count_flops": "gsm_lightning.infer.flop_count",
    "CompactGBLR": "gsm_lightning.infer.compact",
    "optimize_inference": "gsm_lightning.infer.inference",
    "merge_to_dense": "gsm_lightning.io.export",
    "save_compact": "gsm_lightning.io.export",
    "load_compact": "gsm_lightning.io.export",
    "gblr_flop_counting": "gsm_lightning.infer.flop_count",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gsm_lightning' has no attribute {name!r}")
