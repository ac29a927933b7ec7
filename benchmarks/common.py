"""Helpers shared by the benchmark scripts: GSMModule overrides from the command line, BENCHMARKS.md sections."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any


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
