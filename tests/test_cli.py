"""gsm-lightning CLI: every config parses, a short quickstart fit + test runs end to end, bad keys fail clearly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gsm_lightning.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
OVERLAYS = sorted((ROOT / "configs" / "baselines").glob("*.yaml"))


def run_cli(args: list[str]) -> int:
    try:
        build_cli(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_config_parses(config, capsys):
    assert run_cli(["fit", "--config", str(config), "--print_config"]) == 0
    out = capsys.readouterr().out
    assert "budget:" in out and "backbone:" in out


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[c.name for c in OVERLAYS])
def test_baseline_overlay_parses(overlay, capsys):
    base = ROOT / "configs" / "cifar10_vit_s.yaml"
    assert run_cli(["fit", "--config", str(base), "--config", str(overlay), "--print_config"]) == 0
    assert f"method: {overlay.stem}" in capsys.readouterr().out


def test_unknown_yaml_key_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "configs" / "quickstart.yaml").read_text().replace("  budget: 0.3", "  budjet: 0.3"))
    assert run_cli(["fit", "--config", str(bad), "--print_config"]) != 0
    assert "budjet" in capsys.readouterr().err


def test_quickstart_fit_and_test_end_to_end(tmp_path):
    common = ["--config", str(ROOT / "configs" / "quickstart.yaml"), f"--trainer.default_root_dir={tmp_path}",
              f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
    assert run_cli(["fit", *common, "--trainer.max_epochs=2", "--model.phase1_epochs=1",
                    "--trainer.limit_train_batches=6", "--trainer.limit_val_batches=2"]) == 0
    run_dir = tmp_path / "quickstart" / "version_0"
    report = json.loads((run_dir / "structure.json").read_text())
    assert report["phase"] == 2 and len(report["layers"]) == 20  # q, k, v, fc1, fc2 of 4 blocks
    assert all(0 < layer["flops"] < layer["dense_flops"] for layer in report["layers"])
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.exists() and (run_dir / "config.yaml").exists()
    assert run_cli(["test", *common, f"--ckpt_path={ckpt}", "--trainer.limit_test_batches=2"]) == 0


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "gsm_lightning", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "fit" in proc.stdout and "test" in proc.stdout
