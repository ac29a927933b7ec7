"""``gsm-lightning fit --help`` stays short (issue 26): the GSMModule options in groups with their defaults, no list of
every ``nn.Module`` subclass, and ``class_path`` backbones (torchvision's) still parse."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from gsm_lightning.cli import MODEL_HELP_GROUPS, build_cli
from gsm_lightning.training.module import GSMModule

ROOT = Path(__file__).resolve().parents[1]
MAX_HELP_LINES = 300


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the CLI in this process: (exit code, stdout, stderr)."""
    try:
        build_cli(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _entry(help_text: str, option: str) -> str:
    """The help entry of ``option`` (its invocation line to the next option or section), whitespace collapsed."""
    match = re.search(rf"^  {re.escape(option)}[ \n].*?(?=^  -|^\S|^$)", help_text, flags=re.M | re.S)
    assert match, f"{option} is not in the help"
    return " ".join(match.group(0).split())


@pytest.fixture
def fit_help(capsys, monkeypatch) -> str:
    """``gsm-lightning fit --help`` at the default width of a pipe (80 columns)."""
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = _run(["fit", "--help"], capsys)
    assert code == 0, err
    return out


def test_fit_help_is_short(fit_help):
    lines = fit_help.splitlines()
    assert len(lines) <= MAX_HELP_LINES, f"fit --help prints {len(lines)} lines (at most {MAX_HELP_LINES})"
    assert "torch.nn.Identity" not in fit_help  # the backbone's nn.Module subclasses are not listed
    assert "torchvision.models.resnet18" in fit_help  # but how to name one is
    assert "--trainer.max_epochs" in fit_help and "barebones" in fit_help  # described, or named


def test_fit_help_groups_model_options_with_defaults(fit_help):
    titles = [f"{title} (GSMModule):" for title, _ in MODEL_HELP_GROUPS]
    positions = [fit_help.find(f"\n{t}\n") for t in titles]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), titles
    for title, names in MODEL_HELP_GROUPS:  # each option under its group's title
        section = fit_help.split(f"\n{title} (GSMModule):\n", 1)[1].split("\n\n", 1)[0]
        assert all(re.search(rf"^  --model\.{n} ", section, flags=re.M) for n in names), (title, section)
    params = [n for n, p in inspect.signature(GSMModule.__init__).parameters.items()
              if n != "self" and p.kind is not p.VAR_KEYWORD]
    assert all(f"--model.{n} " in fit_help for n in params)  # no GSMModule option is left out
    assert "default: 0.3" in _entry(fit_help, "--model.budget")
    assert "default: 1)" in _entry(fit_help, "--model.phase1_epochs")
    assert "default: classification" in _entry(fit_help, "--model.task")
    rule = _entry(fit_help, "--model.rule")
    assert "default: null" in rule and "``null``: BudgetRule(path_fraction=0.4" in rule
    assert "gsm_lightning.learn.rules.PaperRule" in rule  # a short list of subclasses stays
    conversion = _entry(fit_help, "--model.conversion")
    assert "default: null" in conversion and "``null``: Conversion(method='gblr'" in conversion
    assert "SigmaSchedule(sigma0=1.0" in _entry(fit_help, "--model.sigma")
    assert "PhaseSwitch(enforce_budget=True" in _entry(fit_help, "--model.switch")


def test_help_leaves_parsing_alone(capsys, monkeypatch):
    """The short help is a display copy: the same CLI parses afterwards as before (config and an explicit flag)."""
    monkeypatch.setenv("COLUMNS", "80")
    quickstart = str(ROOT / "configs" / "quickstart.yaml")
    assert _run(["fit", "--help"], capsys)[0] == 0
    code, out, err = _run(["fit", "--config", quickstart, "--model.budget", "0.5", "--print_config"], capsys)
    assert code == 0, err
    assert "budget: 0.5" in out and "class_path: gsm_lightning.models.ViT" in out
    code, _, err = _run(["fit", "--config", quickstart, "--model.budjet", "0.5"], capsys)
    assert code != 0 and "budjet" in err


def test_torchvision_class_path_backbone_parses(capsys):
    pytest.importorskip("torchvision")
    code, out, err = _run(["fit", "--model.backbone.class_path", "torchvision.models.resnet18",
                           "--model.backbone.init_args.num_classes", "10",
                           "--data", "gsm_lightning.data.DigitsDataModule", "--print_config"], capsys)
    assert code == 0, err
    backbone = out.split("  backbone:\n", 1)[1]
    assert backbone.startswith("    class_path: torchvision.models.resnet18\n")
    assert "      num_classes: 10\n" in backbone.split("  task:", 1)[0]
