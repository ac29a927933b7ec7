"""GSMModule: proximal step, real-step counting, phase switch, checkpoint resume in each phase."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from gsm_lightning import GBLRLinear
from gsm_lightning import proximal as prox_mod
from gsm_lightning.core.flops import flops_ratio
from gsm_lightning.learn.budget_learner import BudgetLearner
from gsm_lightning.learn.groups import param_groups
from gsm_lightning.learn.proximal import project_model_to_budget, proximal_step
from gsm_lightning.learn.schedules import SigmaSchedule
from gsm_lightning.training.module import GSMModule

from .helpers import LossRecorder, adamw, digits_loaders, mlp


def make_module(**kw) -> GSMModule:
    args = dict(num_classes=10, budget=0.4, include=["0", "2"], phase1_epochs=1, shrink="paper", prox_lambda=2.0,
                structure_lr=0.02,
                sigma0=1.0, sigma1=100.0, optimizer=adamw())
    args.update(kw)
    return GSMModule(mlp(), **args)


def trainer(tmp_path, max_epochs=2, **kw) -> pl.Trainer:
    args = dict(max_epochs=max_epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=tmp_path, deterministic=True)
    args.update(kw)
    return pl.Trainer(**args)


def test_proximal_step_math():
    layer = GBLRLinear(16, 32, num_components=4)
    model = nn.Sequential(layer)
    with torch.no_grad():
        layer.widths.copy_(torch.tensor([[0.5, 0.01, 1.0, 0.3], [0.9, 0.2, 0.0, 1.2]]))
        layer.locations.copy_(torch.tensor([[1.25, -0.25, 0.5, 3.0], [0.1, 0.2, 0.3, 0.4]]))
    w0 = layer.widths.detach().clone()
    out = proximal_step(model, lam=0.5, lr=0.1, target=0.01)
    assert out["shrink"] == 1.0
    expected = F.softshrink(w0, 0.05).clamp(0, 1)
    torch.testing.assert_close(layer.widths.detach(), expected)
    torch.testing.assert_close(layer.locations.detach()[0], torch.tensor([0.25, 0.75, 0.5, 0.0]))
    # below the target: no shrink, only clamping and wrapping
    w1 = layer.widths.detach().clone()
    out = proximal_step(model, lam=0.5, lr=0.1, target=1.0)
    assert out["shrink"] == 0.0
    torch.testing.assert_close(layer.widths.detach(), w1)


def test_flops_ratio_is_flops_weighted():
    small, big = GBLRLinear(8, 8, width_init=1.0), GBLRLinear(64, 64, width_init=0.25)
    expected = (small.flops() + big.flops()) / (64 + 64 * 64)
    assert math.isclose(flops_ratio([small, big]), expected)
    assert not math.isclose(flops_ratio([small, big]), 0.5 * (small.flops_ratio() + big.flops_ratio()))


def test_project_model_to_budget():
    model = nn.Sequential(GBLRLinear(32, 64, width_init="full"), GBLRLinear(64, 16, width_init="full"))
    project_model_to_budget(model, 0.3)
    assert flops_ratio(list(model)) <= 0.3
    assert flops_ratio(list(model)) > 0.25


def test_param_groups_and_structure_group():
    model = nn.Sequential(GBLRLinear(16, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    groups = param_groups(model, structure_lr=0.01)
    assert [g["name"] for g in groups] == ["decay", "no_decay", "structure"]
    s = groups[2]
    assert s["betas"] == (0.0, 0.999) and s["weight_decay"] == 0.0 and s["lr"] == 0.01
    assert {id(p) for p in s["params"]} == {id(model[0].widths), id(model[0].locations)}
    decay_ids = {id(p) for p in groups[0]["params"]}
    assert id(model[0].weight_in) in decay_ids and id(model[2].weight) in decay_ids
    no_decay_ids = {id(p) for p in groups[1]["params"]}
    assert {id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[2].bias)} <= no_decay_ids
    model[0].freeze_structure()
    assert param_groups(model, 0.01)[2]["params"] == []


def test_sigma_schedule():
    s = SigmaSchedule(1.0, 100.0, start_epoch=2, end_epoch=6)
    assert [s(e) for e in (0, 2, 4, 6, 9)] == [1.0, 1.0, 50.5, 100.0, 100.0]
    assert math.isinf(SigmaSchedule(None, None)(3))
    with pytest.raises(ValueError, match="sigma0"):
        SigmaSchedule(0.0, 1.0)
    assert s(3.0) == pytest.approx(25.75) and s(2.5) == pytest.approx(1 + 99 / 8)  # fractional epochs
    assert SigmaSchedule(1.0, 100.0, start_epoch=2, end_epoch=2)(2) == 100.0  # a step at start == end


class SigmaRecorder(pl.Callback):
    """sigma of the first GBLR layer seen by every training batch, with the epoch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []
        self.frozen: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        layer = next(m for m in pl_module.modules() if isinstance(m, GBLRLinear))
        self.seen.append((trainer.current_epoch, float(layer.sigma)))
        self.frozen.append(layer.is_frozen)


@pytest.mark.parametrize("phase1_epochs", [1, 3])
def test_sigma_rises_every_step_and_reaches_sigma1_in_phase1(tmp_path, phase1_epochs):
    """Default schedule: linear per optimizer step from sigma0, reaching sigma1 at the start of the last phase-1
    epoch (at the end of phase 1 when it is one epoch), held there; phase 2 uses the frozen boxcars."""
    train, val = digits_loaders(n_train=256)  # 4 batches per epoch
    rec = SigmaRecorder()
    module = make_module(phase1_epochs=phase1_epochs)
    trainer(tmp_path, max_epochs=phase1_epochs + 1, callbacks=[rec]).fit(module, train, val)
    p1 = [s for e, s in rec.seen if e < phase1_epochs]
    end_step = 4 * max(phase1_epochs - 1, 1)
    expected = [1.0 + 99.0 * min(k / end_step, 1.0) for k in range(len(p1))]
    assert p1 == pytest.approx(expected, rel=1e-6)
    if phase1_epochs > 1:
        assert p1[-4:] == [100.0] * 4  # the whole last phase-1 epoch at sigma1
    assert rec.frozen == [e >= phase1_epochs for e, _ in rec.seen]


@pytest.mark.parametrize("shrink", ["paper", "budget"])
def test_shrink_runs_once_per_real_step_with_accumulation(tmp_path, monkeypatch, shrink):
    calls = []
    real = prox_mod.proximal_step if shrink == "paper" else BudgetLearner.step

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    if shrink == "paper":
        monkeypatch.setattr("gsm_lightning.learn.rules.proximal_step", counting)
    else:
        monkeypatch.setattr(BudgetLearner, "step", counting)
    train, val = digits_loaders(n_train=512, batch_size=32)  # 16 micro-batches per epoch
    m = make_module(phase1_epochs=2, shrink=shrink)
    t = trainer(tmp_path, max_epochs=2, accumulate_grad_batches=4)
    t.fit(m, train, val)
    assert t.global_step == 2 * 16 // 4
    assert m.real_optimizer_steps == t.global_step
    assert len(calls) == t.global_step


def test_amp_skipped_step_does_not_count():
    m = make_module(lr_scheduler=lambda opt: torch.optim.lr_scheduler.ConstantLR(opt, 1.0))
    opt = m.configure_optimizers()["optimizer"]
    scaler = torch.amp.GradScaler("cpu")
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    widths0 = m.backbone[0].widths.detach().clone()
    loss = m._loss(m(x), y, 0.0) * float("inf")
    scaler.scale(loss).backward()
    scaler.step(opt)  # inf gradients: the step is skipped
    scaler.update()
    assert m.real_optimizer_steps == 0
    torch.testing.assert_close(m.backbone[0].widths.detach(), widths0)
    opt.zero_grad()
    scaler.scale(m._loss(m(x), y, 0.0)).backward()
    scaler.step(opt)
    assert m.real_optimizer_steps == 1


def test_phase_switch_freezes_and_drops_components(tmp_path):
    train, val = digits_loaders()
    m = make_module(budget=0.3, phase1_epochs=2, shrink="budget")  # reaches the budget by learning, no projection
    snap = {}

    class Snapshot(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 2 and batch_idx == 0:  # first batch after the switch
                snap["w"] = pl_module.backbone[0].weight_in.detach().clone()

    t = trainer(tmp_path, max_epochs=3, callbacks=[Snapshot()])
    t.fit(m, train, val)
    assert m.phase == 2
    layers = dict(m.gblr_layers)
    for layer in layers.values():
        assert layer.is_frozen
        assert not layer.widths.requires_grad and not layer.locations.requires_grad
        assert bool(layer.active_components().all())  # inactive components were dropped
        assert layer.num_components == layer.weight_in.shape[0] < min(layer.in_features, layer.out_features)
    assert m.flops_ratio() <= 0.3 + 1e-9
    assert m.phase1_end_ratio <= 0.3 + 1e-9 and m.projection_delta == 0.0
    opt = t.optimizers[0]
    structure = next(g for g in opt.param_groups if g["name"] == "structure")
    assert structure["params"] == []
    opt_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    for layer in layers.values():
        assert id(layer.weight_in) in opt_ids and id(layer.weight_out) in opt_ids
    assert snap["w"].shape == m.backbone[0].weight_in.shape
    assert not torch.equal(snap["w"], m.backbone[0].weight_in.detach())  # phase 2 trained the kept factors


def test_freeze_align_snaps_the_learned_windows_and_checkpoints_keep_them(tmp_path):
    train, val = digits_loaders()
    m = make_module(budget=0.3, phase1_epochs=1, shrink="budget", freeze_align=32)  # sides 64 and 96: tiles of 32
    t = trainer(tmp_path, max_epochs=2)
    t.fit(m, train, val)
    layers = [layer for _, layer in m.gblr_layers]
    for layer in layers:
        assert layer.is_frozen
        assert (layer.int_widths() % 32 == 0).all() and (layer.int_locations() % 32 == 0).all()
    assert m.flops_ratio() <= m.phase1_end_ratio + 1e-12  # aligning never raises the FLOPs
    ckpt = tmp_path / "aligned.ckpt"
    t.save_checkpoint(ckpt)
    loaded = GSMModule.load_from_checkpoint(ckpt, backbone=mlp(), optimizer=adamw())
    assert loaded.switch.align == 32 and loaded.hparams.switch["align"] == 32
    for (_, a), (_, b) in zip(m.gblr_layers, loaded.gblr_layers):
        assert a.structure() == b.structure()


def test_freeze_align_names_layers_that_cannot_take_the_full_tile(tmp_path):
    m = make_module(budget=0.5, phase1_epochs=0, freeze_align=64)
    with pytest.warns(UserWarning, match=r"freeze_align=64: .*0 \(64x96: 64/32\), 2 \(96x96: 32/32\)"):
        m.freeze_structure()
    for _, layer in m.gblr_layers:
        assert (layer.int_widths()[1] % 32 == 0).all()


@pytest.mark.parametrize("bad", [0, 2.0, True])
def test_freeze_align_rejects_non_tiles(bad):
    with pytest.raises(ValueError, match="align must be an integer >= 1"):
        make_module(freeze_align=bad)


def test_freeze_at_epoch_zero(tmp_path):
    """With no phase 1 nothing is learned: the switch projects the initial widths onto the budget, and says so."""
    train, val = digits_loaders()
    m = make_module(phase1_epochs=0, budget=0.5)
    initial = m.flops_ratio()
    with pytest.warns(UserWarning, match=rf"phase 1 ended at FLOPs ratio {initial:.4f}, above the budget 0\.5"):
        trainer(tmp_path, max_epochs=1).fit(m, train, val)
    assert m.phase == 2 and m.flops_ratio() <= 0.5
    assert m.phase1_end_ratio == initial > 0.9
    assert m.projection_delta == pytest.approx(initial - m.flops_ratio(), abs=1e-12)


def _fit_with_checkpoints(tmp_path, ckpt_path=None, max_epochs=4):
    pl.seed_everything(7, workers=True)
    train, val = digits_loaders()
    m = make_module(budget=0.35, phase1_epochs=2, shrink="budget")
    rec = LossRecorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    t = trainer(tmp_path, max_epochs=max_epochs, enable_checkpointing=True, callbacks=[rec, ckpt])
    t.fit(m, train, val, ckpt_path=ckpt_path)
    return m, rec


@pytest.mark.parametrize("resume_epoch", [0, 2], ids=["mid-phase-1", "mid-phase-2"])
def test_resume_reproduces_structure_and_losses(tmp_path, resume_epoch):
    full, rec_full = _fit_with_checkpoints(tmp_path / "a")
    ckpt = tmp_path / "a" / "ckpt" / f"epoch={resume_epoch}.ckpt"
    assert ckpt.exists()
    resumed, rec_res = _fit_with_checkpoints(tmp_path / "b", ckpt_path=str(ckpt))
    steps_done = dict(rec_full.losses)
    assert rec_res.losses, "resumed run trained nothing"
    for step, loss in rec_res.losses:
        assert math.isclose(loss, steps_done[step], rel_tol=1e-4, abs_tol=1e-6), (step, loss, steps_done[step])
    for (name, a), (_, b) in zip(full.gblr_layers, resumed.gblr_layers):
        assert a.structure() == b.structure(), name
        torch.testing.assert_close(a.weight_in, b.weight_in)
    assert full.projection_delta == resumed.projection_delta == 0.0  # the budget was reached by learning


def test_checkpoint_of_phase2_loads_into_fresh_module(tmp_path):
    _fit_with_checkpoints(tmp_path, max_epochs=3)
    ckpt = torch.load(tmp_path / "ckpt" / "epoch=2.ckpt", weights_only=False)
    assert all(s["frozen"] for s in ckpt["gsm_structure"].values())
    fresh = make_module(budget=0.35, phase1_epochs=2, shrink="budget")
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"])
    assert {n: m.structure() for n, m in fresh.gblr_layers} == ckpt["gsm_structure"]
    x = torch.randn(4, 64)
    loaded = GSMModule.load_from_checkpoint(tmp_path / "ckpt" / "epoch=2.ckpt", backbone=mlp(), optimizer=adamw())
    torch.testing.assert_close(loaded(x), fresh(x))


def test_checkpoint_of_other_structure_is_refused(tmp_path):
    _fit_with_checkpoints(tmp_path, max_epochs=2)
    ckpt = torch.load(tmp_path / "ckpt" / "epoch=0.ckpt", weights_only=False)
    other = make_module(include=["0"])
    with pytest.raises(ValueError, match="does not match"):
        other.on_load_checkpoint(ckpt)
    wider = GSMModule(nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 10)),
                      num_classes=10, budget=0.4, include=["0", "2"])
    with pytest.raises(ValueError, match="in/out/rank"):
        wider.on_load_checkpoint(ckpt)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="budget"):
        make_module(budget=0.0)
    with pytest.raises(ValueError, match="phase1_epochs"):
        make_module(phase1_epochs=-1)
    with pytest.raises(ValueError, match="above the initial ratio"):
        make_module(budget=0.9, layer_kwargs={"width_init": 0.3})
    train, val = digits_loaders()
    with pytest.raises(ValueError, match="beyond trainer.max_epochs"):
        trainer(tmp_path, max_epochs=2).fit(make_module(phase1_epochs=5), train, val)


def test_nan_loss_fails_fast(tmp_path):
    train, val = digits_loaders()
    m = make_module()
    m.backbone[4].weight.data.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        trainer(tmp_path, max_epochs=1).fit(m, train, val)


def test_random_init_defaults_depend_on_the_rule():
    """The budget learner starts from evenly spaced windows and LeCun-scale factors (the paper's 0.02 trains a
    factorised layer far worse, BENCHMARKS.md); the paper's rule keeps the reference's zero locations and 0.02;
    an explicit layer_kwargs value always wins."""
    def layers(module):
        return [m for m in module.backbone.modules() if isinstance(m, GBLRLinear)]

    learner = make_module(shrink="budget", prox_lambda=0.02)
    assert layers(learner)
    for m in layers(learner):
        assert m.init_std == pytest.approx(m.in_features ** -0.5)
        assert m.location_init == "uniform"
    for m in layers(make_module()):  # shrink="paper"
        assert m.init_std == 0.02 and m.location_init == "zero"
    for m in layers(make_module(shrink="budget", layer_kwargs={"init_std": 0.05, "location_init": "zero"})):
        assert m.init_std == 0.05 and m.location_init == "zero"
