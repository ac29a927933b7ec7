"""Components empty on both sides are dropped at the start of each phase-1 epoch (``GSMModule.drop_empty``).

Oracles: the layer's own output and autograd's gradients before the drop; the same fit with the drop switched off;
the uninterrupted run for a resume; the optimizer's state before the drop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from gsm_lightning.core.layer import GBLRLinear, gblr_layers
from gsm_lightning.learn.regrowth import Regrowth
from gsm_lightning.learn.rules import BudgetRule, PaperRule
from gsm_lightning.learn.sensitivity import SensitivityRule
from gsm_lightning.training.module import GSMModule

from .helpers import LossRecorder, assert_resumed_exactly, killed_and_resumed
from .test_regrowth import teacher_fit as regrowth_teacher_fit


def empty_layer() -> GBLRLinear:
    """Six components of rank 2 on 10 -> 8: #1 and #4 empty on both sides, #3 on its input side only."""
    torch.manual_seed(0)
    layer = GBLRLinear(10, 8, rank_per_component=2, num_components=6, dtype=torch.float64)
    n = torch.tensor([[10.0], [8.0]])
    with torch.no_grad():
        layer.widths.copy_(torch.tensor([[4, 0, 10, 0, 0.3, 2], [3, 0, 2, 5, 0.2, 8]]) / n)  # #4: rounds to 0
        layer.locations.copy_(torch.tensor([[8, 1, 0, 2, 5, 3], [1, 4, 6, 0, 2, 7]]) / n)
    layer.set_sigma(6.0)
    return layer


def test_dropping_empty_components_keeps_the_function_and_every_gradient():
    layer = empty_layer()
    x = torch.randn(4, 3, 10, dtype=torch.float64)
    out = layer(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    keep = layer.drop_empty_components()
    assert keep.tolist() == [0, 2, 3, 5] and layer.num_components == 4
    assert layer.widths.requires_grad and layer.locations.requires_grad and not layer.is_frozen
    assert layer.weight_in.grad is None  # new parameters; the bias is kept, with its gradient
    layer.bias.grad = None
    again = layer(x)
    torch.testing.assert_close(again, out, rtol=1e-12, atol=1e-12)
    again.square().sum().backward()
    for name, p in layer.named_parameters():
        old = grads[name]
        old = old if name == "bias" else old.index_select(1 if name in ("widths", "locations") else 0, keep)
        torch.testing.assert_close(p.grad, old, rtol=1e-12, atol=1e-12, msg=name)
    # what was dropped had nothing to give: zero gradients
    dropped = torch.tensor([1, 4])
    assert float(grads["weight_in"][dropped].abs().sum() + grads["widths"][:, dropped].abs().sum()) == 0.0
    assert layer.drop_empty_components() is None  # nothing left to drop


def test_a_frozen_or_fully_live_or_fully_empty_layer_is_left_as_it_is():
    layer = empty_layer()
    with torch.no_grad():
        layer.widths.fill_(0.5)
    assert layer.drop_empty_components() is None and layer.num_components == 6
    with torch.no_grad():
        layer.widths.zero_()
    assert layer.drop_empty_components() is None and layer.num_components == 6  # the collapse warning's case
    frozen = empty_layer().freeze_structure()
    assert frozen.drop_empty_components() is None


class Components(Callback):
    """The number of components of layer 0 at the first batch of each epoch."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.counts.append(gblr_layers(pl_module.backbone)[0][1].num_components)


def teacher_fit(drop: bool, rule=None, callbacks=(), root: Path | None = None, ckpt_path: str | None = None,
                epochs: int = 8, phase1: int = 6) -> GSMModule:
    """The low-rank teacher's student (``tests/test_regrowth.py``), by default with the default cut, a path over 30 %
    of phase 1 and regrowth from half-way."""
    rule = rule if rule is not None else BudgetRule(path_fraction=0.3, regrowth=Regrowth(start=0.5, interval=0.1))
    return regrowth_teacher_fit(None, callbacks=callbacks, root=root, ckpt_path=ckpt_path, epochs=epochs,
                                phase1=phase1, rule=rule, drop_empty=drop)[0]


def test_a_fit_that_drops_empty_components_matches_one_that_keeps_them():
    """The default learner with regrowth on the low-rank teacher (128 components, budget 0.125): most components are
    cut to nothing along the path and dropped at the next epoch; the fit is the one that keeps them to the switch (up
    to float summation order), the structure the same to the grid."""
    counts, rec = Components(), LossRecorder()
    dropped = teacher_fit(True, callbacks=[counts, rec])
    kept_counts, kept_rec = Components(), LossRecorder()
    kept = teacher_fit(False, callbacks=[kept_counts, kept_rec])
    assert kept_counts.counts[:6] == [128] * 6  # phase 1 keeps all of them ...
    assert counts.counts[0] == 128 and counts.counts[5] < 40, counts.counts  # ... or drops the empty ones
    assert all(a >= b for a, b in zip(counts.counts, counts.counts[1:]))
    torch.testing.assert_close([loss for _, loss in rec.losses], [loss for _, loss in kept_rec.losses],
                               rtol=1e-4, atol=1e-7)
    a, b = gblr_layers(dropped.backbone)[0][1], gblr_layers(kept.backbone)[0][1]
    assert torch.equal(a.int_widths(), b.int_widths()) and torch.equal(a.int_locations(), b.int_locations())
    torch.testing.assert_close(a.weight_in, b.weight_in, rtol=1e-3, atol=1e-5)
    assert dropped.rule.learner.slots == {"0": 128} and kept.rule.learner.slots == {}


def test_the_optimizer_keeps_the_state_of_the_components_kept():
    before, after = {}, {}

    class Before(Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            m = gblr_layers(pl_module.backbone)[0][1]
            opt = trainer.optimizers[0]
            before[trainer.current_epoch + 1] = (m.live_components(), {
                name: {k: v.clone() for k, v in opt.state[p].items()}
                for name, p in (("weight_in", m.weight_in), ("locations", m.locations))})

    class After(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == 0:
                m = gblr_layers(pl_module.backbone)[0][1]
                opt = trainer.optimizers[0]
                in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
                assert {id(m.weight_in), id(m.weight_out), id(m.widths), id(m.locations)} <= in_opt
                after[trainer.current_epoch] = (m.num_components, {
                    name: {k: v.clone() for k, v in opt.state[p].items()}
                    for name, p in (("weight_in", m.weight_in), ("locations", m.locations))})

    teacher_fit(True, callbacks=[Before(), After()], epochs=4, phase1=4)
    drops = [e for e, (keep, _) in before.items() if keep is not None and e in after]
    assert drops, "no epoch started with empty components"
    for epoch in drops:
        keep, old = before[epoch]
        count, new = after[epoch]
        assert count == keep.numel()
        for name, dim in (("weight_in", 0), ("locations", 1)):
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(new[name][key], old[name][key].index_select(dim, keep)), (epoch, name, key)


def test_a_run_killed_after_a_drop_resumes_bit_identically(tmp_path):
    def fit(callbacks, root, ckpt_path):
        return teacher_fit(True, callbacks=callbacks, root=root, ckpt_path=ckpt_path)

    full, full_rec, resumed, rec, ckpt = killed_and_resumed(fit, tmp_path)
    assert ckpt["gsm_dropped_epoch"] == 2 and ckpt["gsm_learner"]["slots"] == {"0": 128}
    assert ckpt["state_dict"]["backbone.0.weight_in"].shape[0] < 128  # dropped at the start of epoch 2
    assert_resumed_exactly(full, full_rec, resumed, rec, range(41, 129))


@pytest.mark.parametrize("rule, drops", [(PaperRule(prox_lambda=2.0), False), (SensitivityRule(), True)])
def test_only_rules_that_support_it_drop_components(rule, drops):
    counts = Components()
    module = teacher_fit(True, rule=rule, callbacks=[counts], epochs=4, phase1=3)
    assert (counts.counts[2] < 128) == drops, counts.counts
    if drops:
        f = module.rule.fisher
        assert not f or all(v.shape[0] <= counts.counts[2] for v in f.values())
