"""The injected structure rule and the policy objects of ``GSMModule`` (conversion, sigma schedule, phase switch):
the default equals the old flat arguments bit for bit, checkpoints store plain configs and rebuild the objects, a
user's own rule plugs in, and checkpoints written before the redesign still load."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gsm_lightning import GSMModule
from gsm_lightning.core.conversion_spec import Conversion
from gsm_lightning.core.layer import gblr_layers
from gsm_lightning.learn.rules import BudgetRule, PaperRule, StructureRule, build_rule
from gsm_lightning.learn.schedules import SigmaSchedule
from gsm_lightning.learn.switch import PhaseSwitch
from gsm_lightning.training.legacy import LEGACY_NAMES, migrate_hparams

DATA = Path(__file__).parent / "data"


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 16, generator=g)
    return DataLoader(TensorDataset(x, x[:, :4].argmax(1)), batch_size=32)


def fit(module: GSMModule, epochs: int = 2) -> GSMModule:
    pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False).fit(module, loader())
    return module


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-2)


def build(seed: int = 0, **kwargs) -> GSMModule:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return GSMModule(mlp(), num_classes=4, budget=0.4, phase1_epochs=1, optimizer=adamw, **kwargs)


@pytest.mark.parametrize("which", ["budget", "paper"])
def test_objects_train_exactly_as_the_old_flat_arguments(which):
    if which == "budget":
        new = build(conversion=Conversion(include=["0"]), rule=BudgetRule(path_fraction=0.5, energy_power=1.0),
                    sigma=SigmaSchedule(2.0, 50.0))
        old = build(include=["0"], path_fraction=0.5, energy_power=1.0, sigma0=2.0, sigma1=50.0)
    else:
        new = build(conversion=Conversion(include=["0"]), rule=PaperRule(prox_lambda=0.3, structure_lr=4e-3),
                    switch=PhaseSwitch(align=2))
        old = build(include=["0"], shrink="paper", prox_lambda=0.3, structure_lr=4e-3, freeze_align=2)
    assert dict(new.hparams) == dict(old.hparams)  # the flat arguments are stored in the new form
    fit(new), fit(old)
    for (name, a), (_, b) in zip(new.state_dict().items(), old.state_dict().items()):
        assert torch.equal(a, b), name
    assert new.phase == old.phase == 2


def test_the_default_rule_is_the_budget_learner():
    m = build()
    assert isinstance(m.rule, BudgetRule) and m.learner is m.rule.learner
    assert m.rule.learner.width_lr_scale == 4.0 and m.rule.structure_lr == 2.5e-3
    layer = gblr_layers(m.backbone)[0][1]
    # the budget rule's layer defaults: evenly spaced windows for a random init
    assert len(set(layer.locations[0].tolist())) > 1


def test_flat_arguments_warn_and_name_the_new_argument():
    with pytest.warns(DeprecationWarning, match=r"prox_lambda -> rule.init_args.prox_lambda \(PaperRule\), shrink -> rule"):
        GSMModule(mlp(), num_classes=4, budget=0.4, shrink="paper", prox_lambda=0.1)
    assert set(LEGACY_NAMES) >= {"include", "shrink", "sigma0", "freeze_align", "prox_start_step", "structure_lr"}


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match=r"unexpected arguments \['shrinkk'\]"):
        GSMModule(mlp(), num_classes=4, shrinkk="paper")
    with pytest.raises(ValueError, match="both rule= and the flat arguments"):
        build(rule=PaperRule(), prox_lambda=0.1)
    with pytest.raises(ValueError, match="both conversion= and its flat arguments"):
        build(conversion=Conversion(), include=["0"])
    with pytest.raises(ValueError, match="unknown shrink 'soft'"):
        build(shrink="soft")
    with pytest.raises(ValueError, match="built-in rules are gsm_lightning.learn.rules.BudgetRule"):
        build(rule={"class_path": "gsm_lightning.learn.rules.Nope"})
    with pytest.raises(ValueError, match="not a StructureRule subclass"):
        build(rule={"class_path": "torch.nn.Linear"})
    with pytest.raises(ValueError, match="the fields of Conversion are method, include"):
        build(conversion={"includes": ["0"]})
    with pytest.raises(ValueError, match="unknown method 'svd'"):
        Conversion(method="svd")
    with pytest.raises(ValueError, match="init='per_factor' initialises a fixed baseline"):
        Conversion(method="gblr", init="per_factor")
    with pytest.raises(ValueError, match="align must be an integer >= 1"):
        PhaseSwitch(align=0)
    with pytest.raises(ValueError, match="path_fraction must be a fraction"):
        BudgetRule(path_fraction=1.5)
    with pytest.raises(ValueError, match=r"cost_power must be a number in \[0, 1\]"):
        BudgetRule(cost_power=2.0)
    with pytest.raises(ValueError, match="prox_lambda must be >= 0"):
        PaperRule(prox_lambda=-1)
    with pytest.raises(ValueError, match="structure_lr must be > 0"):
        PaperRule(structure_lr=0)


@pytest.mark.parametrize("method", ["lowrank", "monarch", "blocksparse"])
def test_baselines_start_like_gblr_by_default_and_reload_exactly(method, tmp_path):
    """Fair baselines: GSMModule's fixed structures project GBLR's law of random weights (not their own smaller
    per-factor init, which stays selectable); a checkpoint reloads them exactly (skeleton, then the weights)."""
    from gsm_lightning.core.baselines import baselinify, random_dense_like_gblr

    kw = {"block_size": 2} if method == "blocksparse" else {}
    fair = build(seed=1, conversion=Conversion(method=method, layer_kwargs=kw))
    torch.manual_seed(1)
    mlp()  # the draws GSMModule made: the backbone's own init first, then GBLR's two draws per layer
    expected = [random_dense_like_gblr(16, 32), random_dense_like_gblr(32, 4)]
    for layer, ref in zip((fair.backbone[0], fair.backbone[2]), expected):
        proj = nn.Sequential(ref)
        baselinify(proj, method, 0.4, init="pretrained", **kw, **({"pattern": "diagonal"} if kw else {}))
        torch.testing.assert_close(layer.to_dense(), proj[0].to_dense(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.bias, proj[0].bias)
    gblr = build(seed=1, conversion=Conversion(layer_kwargs={"width_init": "full"}))  # GBLR at full width from the
    # same seed: the very same dense matrices
    for layer, ref in zip((gblr.backbone[0], gblr.backbone[2]), expected):
        torch.testing.assert_close(layer.to_dense(), ref.weight, rtol=1e-4, atol=1e-5)
    old = build(seed=1, conversion=Conversion(method=method, init="per_factor", layer_kwargs=kw))
    assert not torch.allclose(old.backbone[0].to_dense(), fair.backbone[0].to_dense())
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(fair, loader())
    trainer.save_checkpoint(tmp_path / "b.ckpt")
    back = GSMModule.load_from_checkpoint(tmp_path / "b.ckpt", backbone=mlp(), optimizer=adamw)
    x = torch.randn(8, 16)
    torch.testing.assert_close(back.eval()(x), fair.eval()(x))


class CountingRule(StructureRule):
    """A user's rule: no cut at all, it only counts its calls and keeps the count in checkpoints."""

    def __init__(self, structure_lr: float = 1e-3) -> None:
        super().__init__(structure_lr)
        self.calls = 0
        self.phase1_steps = None

    def start(self, phase1_steps: int) -> None:
        self.phase1_steps = phase1_steps

    def step(self, model, lr, active=True):
        self.calls += 1
        return {"calls": float(self.calls)}

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = int(state["calls"])

    def init_args(self):
        return {"structure_lr": self.structure_lr}


def test_a_users_rule_plugs_in_and_round_trips_through_a_checkpoint(tmp_path):
    m = build(rule=CountingRule(), switch=PhaseSwitch(enforce_budget=False))
    fit(m, epochs=2)
    assert m.rule.phase1_steps == 4 and m.rule.calls == 4  # 4 real optimizer steps in phase 1, none in phase 2
    assert m.hparams["rule"] == {"class_path": f"{__name__}.CountingRule", "init_args": {"structure_lr": 1e-3}}
    path = tmp_path / "m.ckpt"
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False)
    trainer.strategy.connect(m)
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)  # the configs are plain values
    assert ckpt["gsm_learner"] == {"calls": 4}
    back = GSMModule.load_from_checkpoint(path, backbone=mlp(), optimizer=adamw)
    assert isinstance(back.rule, CountingRule) and back.rule.calls == 4
    assert back.switch == PhaseSwitch(enforce_budget=False) and back.conversion == m.conversion


def test_new_checkpoints_rebuild_every_policy(tmp_path):
    m = fit(build(conversion=Conversion(include=["0"]), rule=PaperRule(prox_lambda=0.3), sigma=SigmaSchedule(None, None),
                  switch=PhaseSwitch(align=2)))
    path = tmp_path / "m.ckpt"
    trainer = pl.Trainer(max_epochs=2, logger=False)
    trainer.strategy.connect(m)
    trainer.save_checkpoint(path)
    back = GSMModule.load_from_checkpoint(path, backbone=mlp(), optimizer=adamw)
    assert back.rule.init_args() == m.rule.init_args() and isinstance(back.rule, PaperRule)
    assert back.sigma_schedule == m.sigma_schedule and math.isinf(back.sigma_schedule(0))
    assert back.switch.align == 2 and back.conversion.include == ["0"]
    x = torch.randn(4, 16)
    assert torch.equal(back.eval()(x), m.eval()(x))


@pytest.mark.parametrize("name", ["paper", "budget"])
def test_checkpoints_of_the_flat_version_still_load(name):
    """Files written by the last version with flat arguments (tests/data, made at 288c5d2)."""
    path = DATA / f"gsm_v0_{name}_rule.ckpt"
    expected = torch.load(DATA / f"gsm_v0_{name}_rule_expected.pt", weights_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        m = GSMModule.load_from_checkpoint(path, backbone=mlp(), optimizer=adamw)
    # same logits up to float summation order (they were written with 2 threads; the masks use an irfft)
    assert torch.allclose(m.eval()(expected["x"]), expected["logits"], rtol=1e-5, atol=1e-6)
    assert {n: layer.structure() for n, layer in m.gblr_layers} == expected["structure"]
    if name == "paper":
        assert isinstance(m.rule, PaperRule) and m.rule.prox_lambda == 0.3 and m.rule.structure_lr == 4e-3
        assert m.switch.align == 2 and m.phase == 2
    else:
        assert isinstance(m.rule, BudgetRule) and m.rule.path_fraction == 0.5 and m.learner.energy_power == 1.0
        assert m.phase == 1 and m.learner.steps == 12  # the learner's state came back
    assert m.sigma_schedule.sigma0 == 2.0 and m.sigma_schedule.sigma1 == 50.0
    assert m.conversion.include == ["0"]


def test_migrate_hparams_leaves_new_ones_alone():
    new = dict(build().hparams)
    assert migrate_hparams(new) == new
    old = torch.load(DATA / "gsm_v0_paper_rule.ckpt", weights_only=True)["hyper_parameters"]
    out = migrate_hparams(old)
    assert not set(out) & set(LEGACY_NAMES)
    assert out["rule"]["class_path"] == "gsm_lightning.learn.rules.PaperRule"
    assert build_rule(out["rule"]).prox_lambda == 0.3


class TinyMLP(nn.Sequential):
    """``mlp()`` as a class, for the CLI's ``class_path``."""

    def __init__(self) -> None:
        super().__init__(*mlp())


class TinyData(pl.LightningDataModule):
    def train_dataloader(self):
        return loader()


def test_cli_resumes_a_flat_checkpoint_with_the_new_config(tmp_path):
    from gsm_lightning.cli import build_cli

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        cli = build_cli(["fit", f"--model.backbone={__name__}.TinyMLP", f"--data={__name__}.TinyData",
                         f"--ckpt_path={DATA / 'gsm_v0_paper_rule.ckpt'}", f"--trainer.default_root_dir={tmp_path}",
                         "--trainer.max_epochs=2", "--trainer.logger=false", "--trainer.enable_progress_bar=false"])
    assert isinstance(cli.model.rule, PaperRule) and cli.model.rule.prox_lambda == 0.3
    assert cli.model.switch.align == 2 and cli.model.conversion.include == ["0"] and cli.model.phase == 2
    assert cli.trainer.current_epoch == 2  # resumed at the checkpoint's end


def test_cost_power_reaches_the_learner_and_round_trips_through_the_config():
    rule = BudgetRule(cost_power=0.4)
    assert rule.learner.cost_power == 0.4 and rule.init_args()["cost_power"] == 0.4
    back = build_rule(rule.config())
    assert back.learner.cost_power == 0.4 and back.init_args() == rule.init_args()


def test_rules_are_plain_objects_with_state():
    rule = BudgetRule()
    rule.bind(0.3)
    rule.start(100)
    assert rule.learner.path_steps == 40 and rule.learner.energy_start_step == 10 and rule.target() == 0.3
    copy.deepcopy(rule)
    assert repr(PaperRule()) == "PaperRule(prox_lambda=0.02, structure_lr=0.005, start_step=0)"
