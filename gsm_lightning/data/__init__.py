"""Lightning data modules (images, text, teacher-student) and the resumable loader they share.

``gsm_lightning.data.X`` keeps working for every name of :mod:`.datamodules` (the old ``gsm_lightning/data.py``)."""

from __future__ import annotations

from typing import Any

from . import datamodules as _datamodules
from .datamodules import *  # noqa: F403
from .datamodules import __all__ as _datamodules_all
from .sentences import *  # noqa: F403
from .sentences import __all__ as _sentences_all
from .teacher import TeacherStudentDataModule, make_teacher

__all__ = list(_datamodules_all) + ["TeacherStudentDataModule", "make_teacher"]
__all__ += [n for n in _sentences_all if n not in __all__]  # WordNet sentences (sentences.py)


def __getattr__(name: str) -> Any:  # constants and helpers of the old flat module
    try:
        return getattr(_datamodules, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
