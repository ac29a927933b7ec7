"""Shared test fixtures (kept minimal)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Every test starts from the same torch RNG state, so random cases are reproducible."""
    torch.manual_seed(0)
