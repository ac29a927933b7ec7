"""2-process CPU DDP (gloo): structure and weights stay bit-identical across ranks through the phase switch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_ddp_two_processes_agree(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_train.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for tag in ("switch", "end"):
        r0 = torch.load(tmp_path / f"{tag}_rank0.pt", weights_only=False)
        r1 = torch.load(tmp_path / f"{tag}_rank1.pt", weights_only=False)
        assert r0["_structure"] == r1["_structure"], tag
        assert all(s["frozen"] for s in r0["_structure"].values()), tag
        assert r0.keys() == r1.keys()
        for key in r0:
            if key != "_structure":
                assert torch.equal(r0[key], r1[key]), (tag, key)
    # rank 0 alone logs: one TensorBoard run with one event file
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert len(events) == 1, events
