"""Helpers shared by the benchmark scripts: GSMModule overrides from the command line, BENCHMARKS.md sections,
the description of the machine a report was measured on."""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path
from typing import Any

import torch


def cpu_model() -> str:
    """The CPU model (``model name`` of ``/proc/cpuinfo``; ``platform.processor()`` where there is none)."""
    cpu = platform.processor() or "unknown CPU"
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    return cpu


def machine_info(threads: int | None = None) -> str:
    """The machine a report was measured on, in one line: CPU model, logical cores, torch and Python versions and
    the torch threads (``threads`` when the script chose them per run, else torch's default in this process)."""
    used = f"{threads} torch thread(s) per run" if threads else f"default torch threads {torch.get_num_threads()}"
    gpu = f"GPU: {torch.cuda.get_device_name(0)}, " if torch.cuda.is_available() else ""
    return (f"{gpu}CPU: {cpu_model()} ({os.cpu_count()} logical cores visible), torch {torch.__version__}, {used}, "
            f"Python {platform.python_version()}")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs, values parsed as JSON where possible (``sigma0=null``, ``path_fraction=0.3``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def write_section(text: str, path: Path, start: str, end: str) -> None:
    """Replace the text between the ``start`` and ``end`` markers of ``path`` (append the section if absent)."""
    body = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{text}\n{end}"
    if start in body and end in body:
        body = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, body, flags=re.S)
    else:
        body = body.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(body)


def bootstrap_mean_ci(values: list[float], level: float = 0.95, resamples: int = 20000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``values`` and its percentile bootstrap interval (resampling the values with replacement).

    With n values there are at most C(2n-1, n) distinct resamples (10 for n = 3, 126 for n = 5): with few seeds the
    interval is coarse and too narrow, so read it next to the per-seed values."""
    import random

    if not values:
        raise ValueError("bootstrap_mean_ci needs at least one value")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choice(values) for _ in range(n)) / n for _ in range(resamples))
    lo = means[int((1 - level) / 2 * (resamples - 1))]
    hi = means[int((1 + level) / 2 * (resamples - 1))]
    return sum(values) / n, lo, hi
