"""Reading a structure: per-layer statistics (:mod:`.structure`), figures (:mod:`.plotting`) and the report command
(:mod:`.command`, ``python -m gsm_lightning.report CKPT --out DIR``).  Plain PyTorch and matplotlib."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"CheckpointError": "..io.checkpoint", "load_checkpoint": "..io.checkpoint",
         "model_from_checkpoint": "..io.checkpoint", "write_report": ".command", "main": ".command"}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
