"""Launched by tests/test_ddp.py as `python tests/ddp_train.py OUT_DIR`: a 2-process CPU (gloo) DDP fit
through phase 1, the phase switch and phase 2.  Every rank dumps its structure and weights right after
the switch and at the end, so the test can check they are bit-identical across ranks."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gsm_lightning.module import GSMModule  # noqa: E402
from tests.helpers import adamw, digits_loaders, mlp  # noqa: E402


def dump(pl_module: GSMModule, path: Path) -> None:
    state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
    state["_structure"] = {n: m.structure() for n, m in pl_module.gblr_layers}
    torch.save(state, path)


class Dumper(pl.Callback):
    def __init__(self, out: Path, switch_epoch: int) -> None:
        self.out, self.switch_epoch = out, switch_epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.switch_epoch and batch_idx == 0:
            dump(pl_module, self.out / f"switch_rank{trainer.global_rank}.pt")

    def on_train_end(self, trainer, pl_module):
        dump(pl_module, self.out / f"end_rank{trainer.global_rank}.pt")


def main(out: Path) -> None:
    pl.seed_everything(0, workers=True)
    torch.set_num_threads(1)
    train, val = digits_loaders(n_train=512, batch_size=32)
    # different init per rank: DDP must broadcast rank 0's weights and structure
    torch.manual_seed(int(os.environ.get("LOCAL_RANK", 0)))
    model = GSMModule(mlp(), num_classes=10, budget=0.35, include=["0", "2"], phase1_epochs=2, prox_lambda=2.0,
                      structure_lr=0.02, optimizer=adamw())
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(find_unused_parameters=False, process_group_backend="gloo"),
        max_epochs=3, logger=TensorBoardLogger(out, name="tb"), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Dumper(out, switch_epoch=2)],
    )
    trainer.fit(model, train, val)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
