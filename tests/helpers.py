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
