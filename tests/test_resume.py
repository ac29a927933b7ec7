"""Kill-and-resume is exact: a run killed in the middle of an epoch (phase 1 or phase 2) and resumed from its last
step checkpoint, or resumed from the last checkpoint of phase 1, has bit-identical losses, structure and weights to
the run that was never interrupted.

What makes it exact: the data module's :class:`~gsm_lightning.data.ResumableDataLoader` (Lightning checkpoints its
place in the epoch), the order of :class:`~gsm_lightning.data.EpochSeededSampler` (a function of seed and epoch), the
budget learner's state and the global random state (dropout here) in ``GSMModule``'s checkpoint hooks."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import TensorDataset

from gsm_lightning.data import DigitsDataModule, EpochSeededSampler, ResumableDataLoader
from gsm_lightning.training.module import GSMModule

from .helpers import LossRecorder, adamw

EPOCHS, PHASE1, BATCHES = 4, 2, 10  # DigitsDataModule(batch_size=128): 1257 training images, 10 batches an epoch
KILL_AT = 27  # global step: epoch 2 (phase 2), after the step checkpoints 5 (phase 1) and 25 (phase 2)


def make_module() -> GSMModule:
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.GELU(), nn.Dropout(0.2), nn.Linear(64, 64), nn.GELU(),
                             nn.Linear(64, 10))
    return GSMModule(backbone, num_classes=10, budget=0.35, include=["1", "4"], phase1_epochs=PHASE1,
                     sigma_end_epoch=PHASE1 - 1, optimizer=adamw())


class Kill(Callback):
    """Simulates a crash after ``step`` optimizer steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("killed")


def fit(root: Path, ckpt_path: str | None = None, kill_at: int | None = None) -> tuple[GSMModule, LossRecorder]:
    pl.seed_everything(0)
    module, rec = make_module(), LossRecorder()
    callbacks: list[Callback] = [rec]
    if kill_at is not None:
        callbacks += [ModelCheckpoint(dirpath=root / "steps", every_n_train_steps=5, save_top_k=-1, filename="{step}"),
                      ModelCheckpoint(dirpath=root / "epochs", save_top_k=-1, filename="{epoch}"), Kill(kill_at)]
    trainer = pl.Trainer(max_epochs=EPOCHS, logger=False, enable_checkpointing=kill_at is not None,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, deterministic=True,
                         callbacks=callbacks)
    data = DigitsDataModule(batch_size=128)
    if kill_at is None:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    else:
        with pytest.raises(RuntimeError, match="killed"):
            trainer.fit(module, datamodule=data)
    return module, rec


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("resume")
    full, full_rec = fit(root / "full")
    fit(root / "killed", kill_at=KILL_AT)
    return {"root": root / "killed", "full": full, "losses": dict(full_rec.losses)}


def assert_same_run(runs: dict, resumed: GSMModule, rec: LossRecorder, first_step: int) -> None:
    full = runs["full"]
    steps = [s for s, _ in rec.losses]
    assert steps == list(range(first_step, EPOCHS * BATCHES + 1)), steps  # every remaining step, once
    for step, loss in rec.losses:
        assert loss == runs["losses"][step], (step, loss, runs["losses"][step])  # bit-identical
    assert resumed.phase == full.phase == 2
    assert {n: m.structure() for n, m in resumed.gblr_layers} == {n: m.structure() for n, m in full.gblr_layers}
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.phase1_end_ratio == full.phase1_end_ratio and resumed.projection_delta == full.projection_delta == 0.0
    assert resumed.real_optimizer_steps == full.real_optimizer_steps == EPOCHS * BATCHES


@pytest.mark.parametrize("step", [5, 25], ids=["mid-epoch-phase-1", "mid-epoch-phase-2"])
def test_kill_mid_epoch_and_resume_is_exact(runs, step):
    ckpt = runs["root"] / "steps" / f"step={step}.ckpt"
    loops = torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]
    assert loops["state_dict"]["combined_loader"] == [{"epoch": step // BATCHES, "batches": step % BATCHES}]
    resumed, rec = fit(runs["root"] / f"resumed{step}", ckpt_path=str(ckpt))
    assert_same_run(runs, resumed, rec, first_step=step + 1)


def test_resume_from_the_last_phase1_checkpoint_is_exact(runs):
    ckpt = runs["root"] / "epochs" / f"epoch={PHASE1 - 1}.ckpt"
    state = torch.load(ckpt, weights_only=True)
    assert not any(s["frozen"] for s in state["gsm_structure"].values())  # the switch happens after the resume
    resumed, rec = fit(runs["root"] / "resumed_switch", ckpt_path=str(ckpt))
    assert_same_run(runs, resumed, rec, first_step=PHASE1 * BATCHES + 1)


def test_resumable_loader_skips_the_consumed_batches_and_starts_the_next_epoch_whole():
    data = TensorDataset(torch.arange(20))

    def loader() -> ResumableDataLoader:
        return ResumableDataLoader(data, batch_size=3, sampler=EpochSeededSampler(20, seed=1))

    def batches(dl) -> list[list[int]]:
        return [b[0].tolist() for b in dl]

    ref = loader()
    ref.sampler.set_epoch(2)
    epoch2 = batches(ref)
    it = iter(ref)
    consumed = [next(it)[0].tolist() for _ in range(3)]
    assert consumed == epoch2[:3] and ref.state_dict() == {"epoch": 2, "batches": 3}

    mid = loader()
    mid.load_state_dict(ref.state_dict())
    assert mid.sampler.epoch == 2
    assert batches(mid) == epoch2[3:]  # the rest of epoch 2, nothing twice
    assert mid.state_dict() == {"epoch": 2, "batches": len(epoch2)}
    assert batches(mid) == epoch2  # the next pass is whole again

    end = loader()
    end.load_state_dict({"epoch": 2, "batches": len(epoch2)})  # saved at the end of epoch 2
    assert end.sampler.epoch == 3
    ref.sampler.set_epoch(3)
    assert batches(end) == batches(ref)

    moved = loader()  # Lightning sets the next epoch before the first batch: the saved position is not applied
    moved.load_state_dict({"epoch": 2, "batches": 3})
    it = iter(moved)
    moved.sampler.set_epoch(3)
    assert [b[0].tolist() for b in it] == batches(ref)


def test_data_modules_give_a_resumable_train_loader():
    from gsm_lightning.data.teacher import TeacherStudentDataModule, make_teacher

    digits = DigitsDataModule(batch_size=64)
    digits.setup("fit")
    teacher = TeacherStudentDataModule(make_teacher("low_rank").weight, num_train=64, num_val=8, num_test=8,
                                       batch_size=16)
    teacher.setup("fit")
    for dm in (digits, teacher):
        assert isinstance(dm.train_dataloader(), ResumableDataLoader)
        assert not isinstance(dm.val_dataloader(), ResumableDataLoader)


@pytest.mark.parametrize("num_train", [96, 100], ids=["full-last-batch", "partial-last-batch"])
def test_teacher_student_order_is_kept_and_is_a_function_of_the_epoch(num_train):
    """The resumable teacher-student loader yields, epoch after epoch, the batches Lightning drew from the former
    ``shuffle=True, generator=seed`` loader (Lightning takes ``len(loader)`` batches an epoch and never asks past the
    last one), so earlier runs keep their data order; and any epoch can be started cold."""
    import itertools

    from torch.utils.data import DataLoader

    from gsm_lightning.data.teacher import TeacherStudentDataModule, make_teacher

    dm = TeacherStudentDataModule(make_teacher("low_rank").weight, num_train=num_train, num_val=8, num_test=8,
                                  batch_size=16, seed=5)
    dm.setup("fit")
    old = DataLoader(dm.train_set, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(5))
    new = dm.train_dataloader()
    orders = []
    for epoch in range(4):
        new.sampler.set_epoch(epoch)
        expected = [b[0] for b in itertools.islice(iter(old), len(old))]
        got = [b[0] for b in new]
        assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected)), epoch
        orders.append(torch.cat(got))
    assert not torch.equal(orders[0], orders[1])
    cold = dm.train_dataloader()
    cold.sampler.set_epoch(3)
    assert torch.equal(torch.cat([b[0] for b in cold]), orders[3])
