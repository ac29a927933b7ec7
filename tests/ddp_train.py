"""Launched by tests/test_ddp.py as ``python tests/ddp_train.py OUT_DIR single|ddp``: a fit through phase 1, the phase
switch and phase 2.

``single``: one process, batches of 64.  ``ddp``: two CPU (gloo) ranks, batches of 32 each, so every optimizer step
sees the same 64 images: rank r takes the images ``r::2`` of the same epoch order.  (Lightning's own distributed
sampler would shuffle that order once more, with its own seed, so the sharding is done here, with
use_distributed_sampler off.)  Rank 1 builds its model from another seed (DDP must start from rank 0's) and, just
before the phase switch, moves its own structure away from rank 0's (the switch must take rank 0's).  Every rank dumps
its state before the switch, right after it and at the end; in ``ddp`` mode rank 0 alone logs to TensorBoard
(``OUT_DIR/tb``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gsm_lightning.core.conversion_spec import Conversion  # noqa: E402
from gsm_lightning.data import EpochSeededSampler  # noqa: E402
from gsm_lightning.learn.regrowth import Regrowth  # noqa: E402
from gsm_lightning.learn.rules import BudgetRule  # noqa: E402
from gsm_lightning.learn.sensitivity import SensitivityRule  # noqa: E402
from gsm_lightning.training.distillation import Distillation  # noqa: E402
from gsm_lightning.training.module import GSMModule  # noqa: E402
from tests.helpers import adamw, digits_loaders, mlp  # noqa: E402

PHASE1, EPOCHS = 2, 3


class RankShard(EpochSeededSampler):
    """This rank's share ``perm[rank::world]`` of the epoch order of :class:`EpochSeededSampler`."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        super().__init__(n)
        self.rank, self.world = rank, world

    def __iter__(self):
        return iter(list(super().__iter__())[self.rank::self.world])

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def dump(pl_module: GSMModule, path: Path) -> None:
    state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
    state["_structure"] = {n: m.structure() for n, m in pl_module.gblr_layers}
    state["_learner"] = pl_module.rule.state_dict()
    state["_phase1_end_ratio"] = pl_module.phase1_end_ratio
    state["_real_optimizer_steps"] = pl_module.real_optimizer_steps
    torch.save(state, path)


class Dumper(pl.Callback):
    def __init__(self, out: Path, tag: str) -> None:
        self.out, self.tag = out, tag

    def _path(self, trainer: pl.Trainer, when: str) -> Path:
        return self.out / f"{self.tag}_{when}_rank{trainer.global_rank}.pt"

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # runs before the module's hook (the switch)
        if trainer.current_epoch != PHASE1:
            return
        if trainer.global_rank == 1 and self.tag not in ("ddp_sensitivity", "ddp_sensitivity_output", "ddp_regrowth"):  # other components
            with torch.no_grad():
                for _, m in pl_module.gblr_layers:
                    active = m.active_components().nonzero().flatten()
                    m.widths[:, active[:3]] = 0.0
                    m.locations.add_(5.0 / m.in_features)
        dump(pl_module, self._path(trainer, "pre"))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == PHASE1 and batch_idx == 0:
            dump(pl_module, self._path(trainer, "post"))

    def on_train_end(self, trainer, pl_module) -> None:
        dump(pl_module, self._path(trainer, "end"))
        if pl_module.teacher is not None:
            torch.save(pl_module.teacher.state_dict(), self.out / f"{self.tag}_teacher_rank{trainer.global_rank}.pt")


def main(out: Path, mode: str) -> None:
    torch.set_num_threads(1)
    ddp = mode.startswith("ddp")
    pl.seed_everything(0)
    train, _ = digits_loaders(n_train=512, batch_size=32 if ddp else 64)
    if ddp:
        train = DataLoader(train.dataset, batch_size=32, sampler=RankShard(512, int(os.environ.get("LOCAL_RANK", 0)), 2))
    torch.manual_seed(int(os.environ.get("LOCAL_RANK", 0)))  # rank 1 starts from other weights and structure
    distill = Distillation(loss="kl", temperature=2.0, task_weight=0.5) if mode.endswith("distill") else None
    if mode.endswith("distill_hidden"):  # also the two GELU outputs, matched to the teacher's
        distill = Distillation(loss="kl", temperature=2.0, task_weight=0.5, hidden=["1", "3"])
    if "sensitivity" in mode:  # a pretrained conversion above the budget, components removed by measured Fisher
        fisher = "output" if mode.endswith("output") else "empirical"  # output: the rule's own backward per step
        model = GSMModule(mlp(), num_classes=10, budget=0.35, phase1_epochs=PHASE1, optimizer=adamw(),
                          conversion=Conversion(include=["0", "2"], init="pretrained", fit_steps=0),
                          rule=SensitivityRule(headroom=1.5, path_fraction=0.8, warmup=0.25, fisher=fisher),
                          distillation=Distillation(loss="kl", temperature=2.0, task_weight=0.5))
    elif mode.endswith("regrowth"):  # windows grown by all-reduced gradients, above the budget, then cut back
        model = GSMModule(mlp(), num_classes=10, budget=0.35, include=["0", "2"], phase1_epochs=PHASE1,
                          optimizer=adamw(), rule=BudgetRule(regrowth=Regrowth(start=0.5, interval=0.1, overshoot=0.1)))
    else:
        model = GSMModule(mlp(), num_classes=10, budget=0.35, include=["0", "2"], phase1_epochs=PHASE1,
                          optimizer=adamw(), distillation=distill)
    strategy = DDPStrategy(find_unused_parameters=False, process_group_backend="gloo") if ddp else "auto"
    trainer = pl.Trainer(
        accelerator="cpu", devices=2 if ddp else 1, strategy=strategy, max_epochs=EPOCHS,
        logger=TensorBoardLogger(out, name="tb") if mode == "ddp" else False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True,
        use_distributed_sampler=False, callbacks=[Dumper(out, mode)],
    )
    trainer.fit(model, train)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
