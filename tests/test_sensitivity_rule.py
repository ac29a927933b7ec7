"""``SensitivityRule``: the conversion starts above the budget, and phase 1 removes whole components by their Fisher
sensitivity per FLOP until the ratio is on a cosine path to the budget.  Oracles: a finite difference of the loss for
the sensitivity, a brute-force ordering for the removal, the run's own ratios for the path, a full run for resume."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.datasets import load_digits
from torch import nn

from gsm_lightning.core.conversion_spec import Conversion
from gsm_lightning.core.layer import GBLRLinear, gblr_layers
from gsm_lightning.data import EpochSeededSampler
from gsm_lightning.data.datamodules import ResumableDataLoader
from gsm_lightning.learn.rules import build_rule
from gsm_lightning.learn.sensitivity import SensitivityRule, component_sensitivity, per_sample_sensitivity
from gsm_lightning.training.distillation import Distillation
from gsm_lightning.training.module import GSMModule

from .helpers import LossRecorder, adamw, assert_resumed_exactly
from .test_resume import Kill


def test_sensitivity_is_the_loss_gradient_along_each_components_scale():
    torch.manual_seed(0)
    layer = GBLRLinear(12, 9, rank_per_component=2, num_components=4, dtype=torch.float64)
    with torch.no_grad():
        layer.widths.copy_(torch.tensor([[1.0, 0.5, 0.25, 0.75], [1.0, 0.6, 1.0, 0.4]]))
        layer.locations.copy_(torch.tensor([[0.0, 0.3, 0.6, 0.1], [0.0, 0.2, 0.5, 0.9]]))
    layer.set_sigma(None)
    x, t = torch.randn(7, 12, dtype=torch.float64), torch.randn(7, 9, dtype=torch.float64)

    def loss() -> torch.Tensor:
        return ((layer(x) - t) ** 2).sum()

    loss().backward()
    g = component_sensitivity(layer)
    # each row of x is one sample: the per-sample contributions sum to the batch's gradient
    out = layer(x)
    dy = 2 * (out - t).detach()
    per = per_sample_sensitivity(layer, x, dy)
    assert per.shape == (7, 4)
    torch.testing.assert_close(per.sum(0), g, rtol=1e-5, atol=1e-8)
    seq = per_sample_sensitivity(layer, x.view(1, 7, 12), dy.view(1, 7, 9), torch.tensor([1, 3]))
    torch.testing.assert_close(seq[0], g[[1, 3]], rtol=1e-5, atol=1e-8)  # one sample of 7 tokens, two components
    eps = 1e-6
    for k in range(4):
        with torch.no_grad():
            base = layer.weight_out[k].clone()
            layer.weight_out[k] = base * (1 + eps)
            layer.invalidate_cache()
            up = float(loss())
            layer.weight_out[k] = base * (1 - eps)
            layer.invalidate_cache()
            down = float(loss())
            layer.weight_out[k] = base
            layer.invalidate_cache()
        assert float(g[k]) == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)
    assert component_sensitivity(GBLRLinear(4, 4)) is None  # no backward yet


def test_removal_takes_the_least_fisher_per_flop_first_and_no_more_than_needed():
    torch.manual_seed(0)
    model = nn.Sequential(GBLRLinear(16, 8, num_components=6), GBLRLinear(8, 24, num_components=5))
    with torch.no_grad():
        model[0].widths.copy_(torch.rand(2, 6) * 0.8 + 0.2)
        model[1].widths.copy_(torch.rand(2, 5) * 0.8 + 0.2)
        model[1].widths[0, 4] = 0.0  # inactive: costs nothing, never chosen
    rule = SensitivityRule()
    rule.fisher = {"0": torch.rand(6), "1": torch.rand(5)}
    layers = gblr_layers(model)
    # brute force: every active component with its score and cost, in score order
    comps = []
    for name, m in layers:
        w = m.int_widths()
        for k in range(m.num_components):
            if w[0, k] > 0 and w[1, k] > 0:
                cost = int(w[0, k] + w[1, k])
                comps.append((float(rule.fisher[name][k]) / cost, cost, name, k))
    comps.sort()
    before = sum(m.flops() for _, m in layers)
    excess = 0.4 * before
    freed, expected = 0, set()
    for _, cost, name, k in comps:
        if freed >= excess:
            break
        expected.add((name, k))
        freed += cost
    n = rule._remove(layers, excess)
    removed = {(name, k) for name, m in layers for k in range(m.num_components)
               if m.int_widths()[0, k] == 0 and m.int_widths()[1, k] == 0}
    assert n == len(expected) and removed == expected
    after = sum(m.flops() for _, m in layers)
    assert before - after == freed >= excess


def embedding_module(rule: SensitivityRule, budget: float = 0.3) -> GSMModule:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32))
    return GSMModule(net, task="embedding", budget=budget, conversion=Conversion(init="pretrained", fit_steps=0),
                     phase1_epochs=2, rule=rule, distillation=Distillation(loss="cosine", label_free=True),
                     optimizer=adamw())


def digits() -> ResumableDataLoader:
    """Inputs only (the label-free distillation needs no targets); the sampler resumes mid-epoch."""
    x = torch.tensor(load_digits().data[:512], dtype=torch.float32) / 16
    return ResumableDataLoader(x, batch_size=64, sampler=EpochSeededSampler(512))


class Ratios(pl.Callback):
    def __init__(self) -> None:
        self.ratios: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ratios.append(pl_module.flops_ratio())


def test_the_conversion_starts_above_the_budget_and_phase_one_removes_down_the_path(tmp_path):
    rule = SensitivityRule(headroom=1.5, path_fraction=0.5, warmup=0.25)
    m = embedding_module(rule)
    assert m.report.flops_ratio == pytest.approx(0.45, abs=0.02)  # fitted at headroom * budget
    k_before = {n: int(layer.active_components().sum()) for n, layer in m.gblr_layers}
    ratios = Ratios()
    trainer = pl.Trainer(max_epochs=3, limit_train_batches=8, limit_val_batches=0, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[ratios], default_root_dir=tmp_path)
    trainer.fit(m, digits())
    # 16 phase-1 steps: 4 of warmup (nothing removed), then down a cosine path of 4 steps, then held at the budget
    assert ratios.ratios[:4] == [pytest.approx(m.report.flops_ratio)] * 4
    assert all(a >= b for a, b in zip(ratios.ratios, ratios.ratios[1:]))
    assert ratios.ratios[4] < ratios.ratios[3]
    assert ratios.ratios[7] <= 0.3 + 1e-9 and ratios.ratios[7] > 0.3 - 0.05
    assert m.phase == 2 and m.projection_delta in (None, 0.0)
    assert m.flops_ratio() == pytest.approx(ratios.ratios[7])
    assert rule.removed > 0
    # removed components were dropped at the switch (from one layer or both: the allocation is the rule's)
    assert sum(layer.num_components for _, layer in m.gblr_layers) < sum(k_before.values())


def fit(root: Path, ckpt_path: str | None = None, kill_at: int | None = None, fisher: str = "empirical"):
    pl.seed_everything(0)
    m, rec = embedding_module(SensitivityRule(headroom=1.5, path_fraction=0.6, warmup=0.2, fisher=fisher)), LossRecorder()
    callbacks = [rec]
    if kill_at is not None:
        callbacks += [ModelCheckpoint(dirpath=root, every_n_train_steps=4, save_top_k=-1, filename="{step}"),
                      Kill(kill_at)]
    trainer = pl.Trainer(max_epochs=3, limit_train_batches=6, limit_val_batches=0, logger=False,
                         enable_checkpointing=kill_at is not None, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, deterministic=True, callbacks=callbacks)
    if kill_at is None:
        trainer.fit(m, digits(), ckpt_path=ckpt_path)
    else:
        with pytest.raises(RuntimeError, match="killed"):
            trainer.fit(m, digits())
    return m, rec


@pytest.mark.parametrize("fisher", ["empirical", "output"])
def test_a_run_killed_while_removing_resumes_bit_identically(tmp_path, fisher):
    full, full_rec = fit(tmp_path / "full", fisher=fisher)
    assert full.rule.removed > 0
    assert all(float(f.sum()) > 0 for f in full.rule.fisher.values())  # measured in the module's training steps
    fit(tmp_path / "killed", kill_at=6, fisher=fisher)
    ckpt = torch.load(tmp_path / "killed" / "step=4.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["rule"]["class_path"] == "gsm_lightning.learn.sensitivity.SensitivityRule"
    assert set(ckpt["gsm_learner"]["fisher"]) == {n for n, _ in full.gblr_layers}
    # step 4 is mid-path (warmup 2 steps, path to step 7): the resumed run must remove exactly what the full one did
    resumed, rec = fit(tmp_path / "resumed", ckpt_path=str(tmp_path / "killed" / "step=4.ckpt"), fisher=fisher)
    assert_resumed_exactly(full, full_rec, resumed, rec, range(5, 19))
    assert resumed.rule.removed == full.rule.removed


def test_the_rule_rebuilds_from_its_config():
    rule = SensitivityRule(headroom=2.0, path_fraction=0.5, warmup=0.1, beta=0.5, fisher="output", draws=3)
    back = build_rule(rule.config())
    assert isinstance(back, SensitivityRule) and back.init_args() == rule.init_args()
    assert back.conversion_budget(0.3) == pytest.approx(0.6) and back.conversion_budget(0.6) == 0.9


@pytest.mark.parametrize("bad, match", [({"headroom": 0.5}, "headroom"), ({"beta": 1.0}, "beta"),
                                        ({"warmup": 0.7, "path_fraction": 0.5}, "warmup"),
                                        ({"path_fraction": 2}, "path_fraction"), ({"max_start": 0}, "max_start"),
                                        ({"fisher": "hessian"}, "fisher must be one of"), ({"draws": 0}, "draws")])
def test_bad_arguments_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        SensitivityRule(**bad)


def test_the_output_fisher_is_each_samples_squared_output_change_along_a_drawn_direction():
    """``fisher="output"``: for the drawn ``z``, ``g_{k,b} = d(z_b . out_b) / d s_k``; oracle: one sample at a time
    through the parameters' gradient (:func:`component_sensitivity`), not the activation products the rule uses.  The
    loss's own backward adds nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(GBLRLinear(10, 12, rank_per_component=2, num_components=5, dtype=torch.float64), nn.Tanh(),
                          GBLRLinear(12, 6, num_components=4, dtype=torch.float64))
    with torch.no_grad():
        model[0].widths.copy_(torch.rand(2, 5, dtype=torch.float64) * 0.7 + 0.3)
        model[0].widths[1, 3] = 0.0  # inactive: never measured
        model[2].widths.copy_(torch.rand(2, 4, dtype=torch.float64) * 0.7 + 0.3)
    for m in (model[0], model[2]):
        m.set_sigma(None)
    rule = SensitivityRule(fisher="output", draws=2)
    rule.start(100)  # removals to come: measuring
    rule.steps = 3
    rule.attach(model)
    x = torch.randn(5, 10, dtype=torch.float64)
    out = model(x)
    rule.observe_output(out)
    out.square().sum().backward()  # the loss's backward: not measured
    got = {k: v.clone() for k, v in rule.pending.items()}
    rule.detach()
    gen = torch.Generator().manual_seed(1_000_003 + 3)
    zs = [torch.randn(out.shape, generator=gen, dtype=out.dtype) for _ in range(2)]
    want = {"0": torch.zeros(5, dtype=torch.float64), "2": torch.zeros(4, dtype=torch.float64)}
    for z in zs:
        for b in range(5):
            model.zero_grad()
            (model(x[b:b + 1]) * z[b:b + 1]).sum().backward()
            for name in want:
                want[name] += component_sensitivity(model[int(name)]).double().square() / 2
    want["0"][3] = 0.0
    assert set(got) == {"0", "2"}
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-5, atol=1e-10)
    assert float(got["0"][3]) == 0.0 and bool((got["2"] > 0).all())
    rule.observe_output(out.detach())  # nothing captured, nothing added: no error
