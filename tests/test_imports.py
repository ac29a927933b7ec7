"""The math of the package (masks, layer, flops, proximal, inference and its layouts) stays free of Lightning."""

from __future__ import annotations

import subprocess
import sys

MATH = ("masks", "layer", "flops", "flop_count", "proximal", "align", "compact_plan", "compact", "inference",
        "structure_io", "export")


def _lightning_loaded_by(modules: tuple[str, ...]) -> list[str]:
    """The Lightning modules a fresh interpreter has loaded after importing ``gsm_lightning.<m>`` for ``modules``."""
    code = ("import sys\n" + "".join(f"import gsm_lightning.{m}\n" for m in modules)
            + "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return [m for m in out.stdout.strip().splitlines()[-1].split(",") if m] if out.stdout.strip() else []


def test_math_modules_do_not_import_lightning():
    assert _lightning_loaded_by(MATH) == []


def test_the_check_sees_lightning():
    """The check above can fail: importing the Lightning module does load Lightning."""
    assert "lightning" in _lightning_loaded_by(("module",))
