"""What happens at the phase switch, when the learned structure is frozen (plain data; the module applies it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["PhaseSwitch"]


@dataclass
class PhaseSwitch:
    """Settings of the switch from phase 1 (structure learned) to phase 2 (structure frozen, weights fine-tuned).

    Args:
        enforce_budget: project the widths onto the budget if phase 1 did not reach it (a last resort: a warning gives
            the numbers when it moves the ratio by more than 0.02).
        align: snap every window's start and width to multiples of ``align`` (a side of length ``n`` to
            ``gcd(n, align)``; a warning names the layers that cannot take the full tile), so that frozen layers map
            onto aligned tiles for :class:`~gsm_lightning.infer.compact.CompactGBLR`.  No side's total width rises
            (largest-remainder rounding, :mod:`gsm_lightning.core.align`), so the FLOPs ratio stays at or below the one
            reached.  1 (default): off.
    """

    enforce_budget: bool = True
    align: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.enforce_budget, bool):
            raise ValueError(f"enforce_budget must be true or false, got {self.enforce_budget!r}")
        if isinstance(self.align, bool) or not isinstance(self.align, int) or self.align < 1:
            raise ValueError(f"align must be an integer >= 1 (a tile size such as 8, 16 or 32; 1 = off), got {self.align!r}")

    def config(self) -> dict[str, Any]:
        return asdict(self)
