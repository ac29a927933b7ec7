"""gsm_lightning: learnable Generalized Structured Matrices (GBLR + Gaudi masks) for any backbone.

The math (``masks``, ``layer``, ``flops``, ``conversion``) is plain PyTorch and importing this
package does not import Lightning; the Lightning parts (``GSMModule``, callbacks, data, CLI) are
loaded on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import flop_count as _flop_count  # noqa: F401  (installs the frozen-layer route for FlopCounterMode)
from .conversion import GSMReport, gsmify, select_linear_layers
from .flops import model_flops
from .layer import GBLRLinear
from .masks import boxcar_mask, gaudi_mask

__version__ = "0.1.0"

__all__ = ["GBLRLinear", "gsmify", "select_linear_layers", "GSMReport", "model_flops", "gaudi_mask", "boxcar_mask",
           "__version__"]

_LAZY = {
    "GSMModule": "gsm_lightning.module",
    "StructureMonitor": "gsm_lightning.callbacks",
    "StructureVisualizer": "gsm_lightning.callbacks",
    "StructureReport": "gsm_lightning.callbacks",
    "count_flops": "gsm_lightning.flop_count",
    "CompactGBLR": "gsm_lightning.compact",
    "optimize_inference": "gsm_lightning.inference",
    "merge_to_dense": "gsm_lightning.export",
    "save_compact": "gsm_lightning.export",
    "load_compact": "gsm_lightning.export",
    "gblr_flop_counting": "gsm_lightning.flop_count",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gsm_lightning' has no attribute {name!r}")
