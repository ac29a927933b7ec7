"""Small shared builders for the Lightning tests: real sklearn digits, a tiny MLP, an optimizer factory."""

from __future__ import annotations

import functools
import importlib

import torch
from lightning.pytorch import Callback
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gsm_lightning.data import EpochSeededSampler


def digits_loaders(n_train: int = 512, batch_size: int = 64):
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16
    y = torch.tensor(d.target)
    train = TensorDataset(x[:n_train], y[:n_train])
    val = TensorDataset(x[1400:1600], y[1400:1600])
    return (DataLoader(train, batch_size=batch_size, sampler=EpochSeededSampler(n_train)),
            DataLoader(val, batch_size=200))


def mlp(hidden: int = 96) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 10))


def adamw(lr: float = 3e-3):
    """A picklable optimizer factory (works with ddp_spawn)."""
    return functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.05)


class LossRecorder(Callback):
    """Records (global_step, loss) of every training batch."""

    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append((trainer.global_step, float(outputs["loss"])))


def assert_resumed_exactly(full, full_rec: LossRecorder, resumed, rec: LossRecorder, steps: range) -> None:
    """The resumed run trained ``steps`` (global steps after the checkpoint) with the full run's losses, bit for bit,
    and ended with its state."""
    losses = dict(full_rec.losses)
    assert [s for s, _ in rec.losses] == list(steps)
    for step, loss in rec.losses:
        assert loss == losses[step], (step, loss, losses[step])
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def killed_and_resumed(fit, root, kill_at: int = 42, ckpt_step: int = 40):
    """``fit(callbacks, root, ckpt_path)`` (which returns the module) run in full, killed after ``kill_at`` optimizer
    steps with a checkpoint every 10, and resumed from the checkpoint of ``ckpt_step``: returns ``(full, full_rec,
    resumed, rec, checkpoint)``, for :func:`assert_resumed_exactly`."""
    import pytest
    from lightning.pytorch.callbacks import ModelCheckpoint

    from .test_resume import Kill

    full_rec, rec = LossRecorder(), LossRecorder()
    full = fit([full_rec], root / "full", None)
    checkpoints = ModelCheckpoint(dirpath=root / "killed", every_n_train_steps=10, save_top_k=-1, filename="{step}")
    with pytest.raises(RuntimeError, match="killed"):
        fit([LossRecorder(), checkpoints, Kill(kill_at)], root / "killed", None)
    path = root / "killed" / f"step={ckpt_step}.ckpt"
    resumed = fit([rec], root / "resumed", str(path))
    return full, full_rec, resumed, rec, torch.load(path, weights_only=True)


def hand_layer():
    """10 -> 12, three components: #0 wraps on both sides, #1 spans every input, #2 is inactive (output width 0)."""
    from gsm_lightning import GBLRLinear

    layer = GBLRLinear(10, 12, num_components=3)
    with torch.no_grad():
        layer.widths.copy_(torch.tensor([[4, 10, 3], [5, 2, 0]]) / torch.tensor([[10], [12]]))
        layer.locations.copy_(torch.tensor([[8, 0, 2], [10, 1, 1]]) / torch.tensor([[10], [12]]))
    return layer


def load_benchmark(name: str):
    """The module ``benchmarks.<name>`` (the repo root is on ``sys.path`` under pytest: ``tests`` is a package)."""
    return importlib.import_module(f"benchmarks.{name}")
