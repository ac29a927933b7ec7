"""task='regression', the teacher-student data module, RelativeMSE, and the phase-1 bookkeeping (ratio reached
by learning, projection size) in state, checkpoint and warnings."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from gsm_lightning.core.flops import flops_ratio
from gsm_lightning.data.teacher import TEACHERS, TeacherStudentDataModule, make_teacher, support_iou
from gsm_lightning.training.metrics import RelativeMSE
from gsm_lightning.training.module import GSMModule


def trainer(tmp_path, max_epochs=3, **kw) -> pl.Trainer:
    args = dict(max_epochs=max_epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    args.update(kw)
    return pl.Trainer(**args)


def small_data(n_in=32, n_out=32, **kw) -> TeacherStudentDataModule:
    torch.manual_seed(0)
    w = torch.randn(n_out, n_in) / n_in**0.5
    return TeacherStudentDataModule(w, num_train=256, num_val=64, num_test=64, batch_size=32, **kw)


def test_relative_mse_matches_its_definition():
    metric = RelativeMSE()
    y = torch.randn(50, 3) * 2 + 1
    p = y + 0.1 * torch.randn_like(y)
    metric.update(p[:20], y[:20])
    metric.update(p[20:], y[20:])
    expected = ((p - y) ** 2).mean() / y.var(unbiased=False)
    torch.testing.assert_close(metric.compute(), expected.float(), rtol=1e-5, atol=0)
    # predicting the mean gives 1
    metric.reset()
    metric.update(torch.full_like(y, float(y.mean())), y)
    assert float(metric.compute()) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="shape"):
        metric.update(torch.zeros(3), torch.zeros(4))


@pytest.mark.parametrize("name", TEACHERS)
def test_teachers_have_exact_structure_and_unit_scale(name):
    t = make_teacher(name, seed=1)
    assert (t.weight != 0).logical_and(~t.support()).sum() == 0  # nonzero only inside the windows
    assert 0 < t.flops_ratio < 0.5
    assert float(t.weight.pow(2).sum(1).mean()) == pytest.approx(1.0, rel=1e-5)
    assert support_iou(t.support(), t.support()) == 1.0
    assert torch.linalg.matrix_rank(t.weight) <= sum(w.rank for w in t.windows)


def test_regression_task_trains_and_logs_mse(tmp_path):
    data = small_data()
    module = GSMModule(nn.Sequential(nn.Linear(32, 32, bias=False)), task="regression", method="dense", budget=1.0,
                       optimizer=lambda p: torch.optim.AdamW(p, lr=3e-2, weight_decay=0.0))
    t = trainer(tmp_path, max_epochs=10)
    t.fit(module, datamodule=data)
    assert {"val/mse", "val/rel_mse"} <= set(t.callback_metrics)
    res = t.test(module, datamodule=data, verbose=False)[0]
    assert res["test/rel_mse"] < 0.05  # a dense student learns a dense teacher
    assert res["test/mse"] == pytest.approx(res["test/rel_mse"] * float(data.test_set.tensors[1].var(unbiased=False)),
                                            rel=1e-3)
    preds = t.predict(module, datamodule=data)
    assert torch.cat(preds).shape == (64, 32)


def test_regression_shape_mismatch_is_a_clear_error(tmp_path):
    module = GSMModule(nn.Sequential(nn.Linear(32, 16)), task="regression", method="dense", budget=1.0)
    with pytest.raises(ValueError, match="same shape"):
        trainer(tmp_path, max_epochs=1).fit(module, datamodule=small_data())


def test_projection_is_recorded_checkpointed_and_warned_at_callers_line(tmp_path):
    # shrink='paper' with a tiny lambda cannot reach the budget in one epoch: the switch must project.
    module = GSMModule(nn.Sequential(nn.Linear(32, 32, bias=False)), task="regression", budget=0.2, include=["0"],
                       shrink="paper", prox_lambda=0.01, phase1_epochs=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    t = trainer(tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[ckpt])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(module, datamodule=small_data())
    msgs = [w for w in caught if "projected onto the budget" in str(w.message)]
    assert len(msgs) == 1
    assert msgs[0].filename == __file__  # points at this test's t.fit line, not at torch or lightning
    assert module.phase1_end_ratio > 0.5
    assert module.projection_delta == pytest.approx(module.phase1_end_ratio - flops_ratio(
        m for m in module.backbone.modules() if hasattr(m, "widths")), abs=1e-9)
    assert f"{module.phase1_end_ratio:.4f}" in str(msgs[0].message)
    state = torch.load(ckpt.last_model_path, weights_only=True)
    assert state["gsm_phase1"]["end_ratio"] == pytest.approx(module.phase1_end_ratio)
    fresh = GSMModule.load_from_checkpoint(ckpt.last_model_path, backbone=nn.Sequential(nn.Linear(32, 32, bias=False)))
    assert fresh.phase1_end_ratio == pytest.approx(module.phase1_end_ratio)
    assert fresh.projection_delta == pytest.approx(module.projection_delta)


def test_default_learner_reaches_budget_without_projection(tmp_path):
    module = GSMModule(nn.Sequential(nn.Linear(32, 32, bias=False)), task="regression", budget=0.2, include=["0"],
                       phase1_epochs=3, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0))
    assert module.flops_ratio() <= 1.0  # the default init starts at most at dense cost
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, max_epochs=4).fit(module, datamodule=small_data())
    assert not [w for w in caught if "projected onto the budget" in str(w.message)]
    assert module.phase1_end_ratio <= 0.2 + 1e-9
    assert module.projection_delta == 0.0
    ck = {}
    module.on_save_checkpoint(ck)
    assert ck["gsm_learner"]["steps"] == 3 * 8


def test_optimizer_without_structure_group_warns(tmp_path):
    module = GSMModule(nn.Sequential(nn.Linear(32, 32, bias=False)), task="regression", budget=0.5, include=["0"],
                       shrink="paper", optimizer=lambda groups: torch.optim.SGD(
                           [p for g in groups for p in g["params"]], lr=0.01))
    with pytest.warns(UserWarning, match="no param group named 'structure'"):
        trainer(tmp_path, max_epochs=1).fit(module, datamodule=small_data())
