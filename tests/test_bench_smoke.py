"""The speed benchmark runs end to end in --quick mode and writes only its own section."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_structures_hit_budget(ratio):
    bench = _load("bench_speed")
    for make in bench.STRUCTURES.values():
        w, loc = make(768, 3072, ratio)
        assert w.shape == loc.shape and w.shape[0] == 2
        assert (w >= 0).all() and (w[0] <= 768).all() and (w[1] <= 3072).all()
        flops = (w[0] + w[1])[(w[0] > 0) & (w[1] > 0)].sum()
        assert abs(flops / (768 * 3072) - ratio) < 0.02
    w, _ = bench.learned_like(768, 3072, 0.3)
    assert np.array_equal(w, bench.learned_like(768, 3072, 0.3)[0])  # reproducible


def test_quick_run_writes_only_its_section(tmp_path):
    bench = _load("bench_speed")
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nother section\n\n<!-- speed:start -->\nold\n<!-- speed:end -->\n\ntail section\n")
    assert bench.main(["--quick", "--min-run-time", "0.001", "--output", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nother section\n") and text.rstrip().endswith("tail section")
    body = text[text.index("<!-- speed:start -->"):text.index("<!-- speed:end -->")]
    assert "old" not in body and "QUICK" in body
    for heading in ("### P1", "### P2", "### Memory", "### Scaling"):
        assert heading in body
    assert "| 128x512 | block-low-rank |" in body


def test_gpu_script_exits_cleanly_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert _load("bench_speed_gpu").main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err
