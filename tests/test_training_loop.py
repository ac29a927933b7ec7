"""The training loop end to end, against oracles computed here: phase 1 reaches the budget by the learner's steps
(not by the projection at the switch), the switch keeps the network's function and the Adam moments of the kept
components, the default schedule's learning rate at every step, ``prox_start_step``, every ``method`` and
``task="lm"`` through ``GSMModule`` with the FLOPs a ``FlopCounterMode`` measures, and the warning for a checkpoint of
another budget.  (That the learned structure beats fixed ones on a teacher of known structure is
tests/test_structure_recovery.py; the exact resume is tests/test_resume.py.)"""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from gsm_lightning.training.module import GSMModule

from .helpers import adamw, digits_loaders, mlp

STEPS_PER_EPOCH = 8  # digits_loaders(n_train=512, batch_size=64)


def trainer(tmp_path, max_epochs: int, **kw) -> pl.Trainer:
    args = dict(max_epochs=max_epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=tmp_path, deterministic=True, num_sanity_val_steps=0)
    args.update(kw)
    return pl.Trainer(**args)


def gsm(**kw) -> GSMModule:
    args = dict(num_classes=10, budget=0.3, include=["0", "2"], phase1_epochs=3, optimizer=adamw())
    args.update(kw)
    return GSMModule(mlp(), **args)


def cosine_path(step: int, start: float, budget: float, steps: int) -> float:
    """The budget learner's target after ``step`` steps (README: cosine from the start to the budget, then held)."""
    if step >= steps:
        return budget
    return budget + (start - budget) * 0.5 * (1 + math.cos(math.pi * step / steps))


class StepTrace(pl.Callback):
    """After every optimizer step of phase 1: the FLOPs ratio, integer widths/locations and the learner's report;
    at the start of the switch epoch (callbacks run before the module's hook): the ratio before the switch."""

    def __init__(self) -> None:
        self.ratios: list[float] = []
        self.widths: list[torch.Tensor] = []
        self.locations: list[torch.Tensor] = []
        self.reports: list[dict] = []
        self.before_switch: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.phase == 1:
            layers = [m for _, m in pl_module.gblr_layers]
            self.ratios.append(pl_module.flops_ratio())
            self.widths.append(torch.cat([m.int_widths().flatten() for m in layers]))
            self.locations.append(torch.cat([m.int_locations().flatten() for m in layers]))
            self.reports.append(dict(pl_module._last_prox))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == pl_module.phase1_epochs:
            self.before_switch = pl_module.flops_ratio()


def fit_recorded(module: GSMModule, tmp_path, max_epochs: int, callbacks: list) -> list[str]:
    """Fit on digits; returns the messages of every warning raised during the fit."""
    train, val = digits_loaders(n_train=512, batch_size=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, max_epochs=max_epochs, callbacks=callbacks).fit(module, train, val)
    return [str(w.message) for w in caught]


# ------------------------------------------------------------------------------------------- 1. learning
def test_phase1_reaches_the_budget_by_the_learners_steps(tmp_path):
    m = gsm()
    start = m.flops_ratio()
    trace = StepTrace()
    msgs = fit_recorded(m, tmp_path, max_epochs=4, callbacks=[trace])
    phase1 = 3 * STEPS_PER_EPOCH
    path_steps = round(0.4 * phase1)  # path_fraction 0.4 of phase 1
    assert m.learner.path_steps == path_steps and len(trace.ratios) == phase1
    assert start > 0.9  # 'splr' init: about the dense cost
    assert abs(m.learner.start_ratio - start) < 0.02  # the path starts where the model started
    for k, ratio in enumerate(trace.ratios):  # step k + 1 cuts onto the target of learner step k
        target = cosine_path(k, m.learner.start_ratio, 0.3, path_steps)
        assert ratio <= target + 1e-9, (k, ratio, target)
        assert ratio >= target - 0.02, (k, ratio, target)  # it follows the path, no faster
    assert trace.ratios[path_steps // 2] < start - 0.25  # half-way down the path: the ratio really falls
    assert max(trace.ratios[path_steps:]) <= 0.3 + 1e-9  # at the budget from the end of the path on, and held
    # the ratio at the switch is measured before it (and so before any projection), and is the learner's
    assert trace.before_switch == trace.ratios[-1]
    assert m.phase1_end_ratio == trace.before_switch <= 0.3 + 1e-9
    assert m.projection_delta == 0.0
    assert not [s for s in msgs if "above the budget" in s or "projected onto the budget" in s], msgs
    # the structure is learned, not only cut: cuts only lower widths, so a width that grows took a gradient step;
    # the locations move too (they are only moved by the optimizer's structure group)
    # (steps across an epoch start where empty components were dropped compare different components: skipped)
    grew = sum(int((b > a).sum()) for a, b in zip(trace.widths, trace.widths[1:]) if a.shape == b.shape)
    moved = sum(int((b != a).sum()) for a, b in zip(trace.locations, trace.locations[1:]) if a.shape == b.shape)
    assert grew > 0 and moved > 0, (grew, moved)


@pytest.mark.parametrize("shrink", ["budget", "paper"])
def test_no_shrink_or_cut_before_prox_start_step(tmp_path, shrink):
    start_step = 5
    m = gsm(phase1_epochs=2, prox_start_step=start_step, shrink=shrink,
            **({"prox_lambda": 50.0, "structure_lr": 0.01} if shrink == "paper" else {}))
    start = m.flops_ratio()
    trace = StepTrace()
    fit_recorded(m, tmp_path, max_epochs=2, callbacks=[trace])
    early, late = trace.reports[:start_step], trace.reports[start_step:]
    assert all(r["shrink"] == 0.0 for r in early), early
    assert late[0]["shrink"] == 1.0  # the first step after prox_start_step shrinks (the ratio is above the target)
    if shrink == "budget":
        assert all(r["cut"] == 0.0 for r in early)
        # without a cut the ratio stays far above the path (the width steps alone do not follow it) ...
        target = cosine_path(start_step - 1, m.learner.start_ratio, 0.3, m.learner.path_steps)
        assert trace.ratios[start_step - 1] > target + 0.1, (trace.ratios[start_step - 1], target)
        # ... and the first cut brings it onto the path at once
        assert trace.ratios[start_step] <= cosine_path(start_step, m.learner.start_ratio, 0.3, m.learner.path_steps)
    else:  # the soft threshold only lowers widths by lambda * lr per step
        assert min(trace.ratios[:start_step]) > start - 0.05
        assert trace.ratios[start_step] < trace.ratios[start_step - 1]


# ---------------------------------------------------------------------------------------- 2. the switch
class SwitchProbe(pl.Callback):
    """The network's output on fixed inputs and the optimizer state just before the switch (a callback's
    on_train_epoch_start runs before the module's, which freezes) and just after it (the first batch of phase 2)."""

    def __init__(self, x: torch.Tensor, switch_epoch: int) -> None:
        self.x, self.switch_epoch = x, switch_epoch
        self.before: dict = {}
        self.after: dict = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch != self.switch_epoch:
            return
        opt = trainer.optimizers[0]
        layers = dict(pl_module.gblr_layers)
        with torch.no_grad():
            self.before["out"] = pl_module(self.x)
        self.before["sigma"] = [float(m.sigma) for m in layers.values()]
        self.before["keep"] = {n: ((m.int_widths()[0] > 0) & (m.int_widths()[1] > 0)).nonzero().flatten()
                               for n, m in layers.items()}
        self.before["K"] = {n: m.num_components for n, m in layers.items()}
        self.before["state"] = {n: {k: {s: v.clone() for s, v in opt.state[getattr(m, k)].items()}
                                    for k in ("weight_in", "weight_out")} for n, m in layers.items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch != self.switch_epoch or batch_idx != 0:
            return
        opt = trainer.optimizers[0]
        with torch.no_grad():
            self.after["out"] = pl_module(self.x)
        self.after["state"] = {n: {k: {s: v.clone() for s, v in opt.state[getattr(m, k)].items()}
                                   for k in ("weight_in", "weight_out")} for n, m in pl_module.gblr_layers}
        self.after["opt_params"] = [p for g in opt.param_groups for p in g["params"]]
        self.after["state_keys"] = list(opt.state.keys())


# Measured relative (Frobenius) output change at the switch of this fit: 8.6e-4 with sigma1 = 100 (the masks are
# still slightly smooth), 1.2e-7 with sigma1 = None (exact boxcars: float rounding only), 3.7e-2 when the last
# phase-1 epoch runs at sigma = 10 only, and 0.57 when the switch re-randomises the kept input factors.  The bounds
# keep a margin of 10x (sigma1 = 100) and 80x (Dirichlet).
@pytest.mark.parametrize("sigma1, tol", [(100.0, 1e-2), (None, 1e-5)], ids=["sigma1=100", "dirichlet"])
def test_switch_keeps_the_function_and_the_adam_moments_of_kept_components(tmp_path, sigma1, tol):
    train, _ = digits_loaders(n_train=512, batch_size=64)
    x = train.dataset.tensors[0][:256]
    m = gsm(phase1_epochs=2, sigma1=sigma1, sigma_end_epoch=1)  # the last phase-1 epoch runs at sigma1
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # shuffle the components (the same function), so the kept ones are not the first K'
        for _, layer in m.gblr_layers:
            perm = torch.randperm(layer.num_components, generator=g)
            for t in (layer.weight_in, layer.weight_out):
                t.copy_(t[perm])
            for t in (layer.widths, layer.locations):
                t.copy_(t[:, perm])
    probe = SwitchProbe(x, switch_epoch=2)
    fit_recorded(m, tmp_path, max_epochs=3, callbacks=[probe])
    assert probe.before["sigma"] == [math.inf if sigma1 is None else sigma1] * 2
    before, after = probe.before["out"], probe.after["out"]
    rel = float((after - before).norm() / before.norm())
    assert rel < tol, rel
    assert m.projection_delta == 0.0  # nothing was projected: the change is the masks' hardening alone

    dropped = 0
    for name, keep in probe.before["keep"].items():
        dropped += probe.before["K"][name] - keep.numel()
        for k in ("weight_in", "weight_out"):
            old, new = probe.before["state"][name][k], probe.after["state"][name][k]
            assert set(new) == set(old) == {"step", "exp_avg", "exp_avg_sq"}
            assert torch.equal(new["step"], old["step"])
            for s in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(new[s], old[s][keep]), (name, k, s)
    assert dropped > 0  # the test covers dropped components, and kept ones that are not a prefix
    assert any(not torch.equal(keep, torch.arange(keep.numel())) for keep in probe.before["keep"].values())
    # no optimizer state is left for parameters the optimizer no longer holds (old factors, widths, locations)
    held = {id(p) for p in probe.after["opt_params"]}
    assert all(id(p) in held for p in probe.after["state_keys"])
    assert not any(p.ndim == 2 and p.shape[0] == 2 for p in probe.after["state_keys"])  # no widths/locations


# --------------------------------------------------------------------------------------- 6. the rest
def test_default_schedule_is_linear_warmup_then_cosine_per_step(tmp_path):
    lrs: list[dict[str, float]] = []

    class LR(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            lrs.append({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})

    m = gsm(phase1_epochs=1, warmup_epochs=1.0, structure_lr=2e-3)
    fit_recorded(m, tmp_path, max_epochs=3, callbacks=[LR()])
    total, warmup = 3 * STEPS_PER_EPOCH, STEPS_PER_EPOCH
    assert len(lrs) == total

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    for step, lr in enumerate(lrs):
        assert lr["decay"] == pytest.approx(3e-3 * factor(step), rel=1e-12, abs=1e-15), step
        assert lr["no_decay"] == pytest.approx(3e-3 * factor(step), rel=1e-12, abs=1e-15), step
        assert lr["structure"] == pytest.approx(2e-3 * factor(step), rel=1e-12, abs=1e-15), step
        assert lr["widths"] == 0.0  # the budget learner moves the widths, never the optimizer
    decay = [lr["decay"] for lr in lrs]
    assert all(a < b for a, b in zip(decay[:warmup], decay[1:warmup]))  # rises during warmup ...
    assert decay[warmup - 1] == decay[warmup] == 3e-3  # ... to the base lr, held for one step ...
    assert all(a > b for a, b in zip(decay[warmup:], decay[warmup + 1:]))  # ... then falls
    assert decay[0] == pytest.approx(3e-3 / warmup)


@pytest.mark.parametrize("method, kwargs", [
    ("dense", {}), ("lowrank", {}), ("monarch", {}), ("blocksparse", {"block_size": 16, "forward_mode": "bmm"}),
    ("gblr", {}),
], ids=["dense", "lowrank", "monarch", "blocksparse", "gblr"])
def test_every_method_trains_and_costs_what_a_flop_counter_measures(tmp_path, method, kwargs):
    losses: list[float] = []

    class Loss(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    m = gsm(method=method, layer_kwargs=kwargs or None, phase1_epochs=1 if method == "gblr" else 0,
            optimizer=adamw(1e-2))
    fit_recorded(m, tmp_path, max_epochs=4, callbacks=[Loss()])
    assert all(math.isfinite(v) for v in losses) and len(losses) == 4 * STEPS_PER_EPOCH
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4  # starts at about ln(10) = 2.30
    assert last < 0.8 * first, (first, last)  # measured: 0.34 (dense) to 0.66 (gblr) of the start
    # FLOPs: a FlopCounterMode on the trained model (frozen GBLR layers route through their counted operator)
    tokens = 37
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        m(torch.randn(tokens, 64))
    head = 2 * tokens * 96 * 10  # the unconverted output layer
    dense = 2 * tokens * (64 * 96 + 96 * 96)
    measured = (counter.get_total_flops() - head) / dense
    assert m.flops_ratio() == pytest.approx(measured, rel=1e-12)
    assert measured <= (1.0 if method == "dense" else 0.3 + 1e-9)
    assert measured > (0.99 if method == "dense" else 0.1)


def test_lm_task_trains_next_token_prediction_through_gblr(tmp_path):
    vocab, seq = 16, 12
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, vocab, (256, 1), generator=g)
    steps = torch.randint(1, 3, (256, 1), generator=g)  # each sequence counts up by 1 or 2 (mod vocab)
    ids = (starts + steps * torch.arange(seq + 1)) % vocab
    data = TensorDataset(ids[:, :-1], ids[:, 1:])  # (input_ids, labels shifted by one), as the WikiText module yields
    backbone = nn.Sequential(nn.Embedding(vocab, 32), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                             nn.Linear(64, vocab))
    m = GSMModule(backbone, task="lm", budget=0.5, include=["1", "3"], phase1_epochs=2, optimizer=adamw(1e-2))
    losses: list[float] = []

    class Loss(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    t = trainer(tmp_path, max_epochs=4, callbacks=[Loss()])
    t.fit(m, DataLoader(data, batch_size=32), DataLoader(data, batch_size=64))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    # perplexity is exp of the next-token loss, computed here from the logits and the labels
    x, y = data.tensors
    with torch.no_grad():
        loss = nn.functional.cross_entropy(m(x).flatten(0, 1), y.flatten())
    assert float(t.callback_metrics["val/ppl"]) == pytest.approx(math.exp(float(loss)), rel=1e-4)
    assert float(t.callback_metrics["val/ppl"]) < vocab / 2  # well below guessing among the successors
    # a bare input_ids batch (HF style) is shifted by the module into the same (inputs, labels) pair
    inputs, labels = m._unpack(torch.cat([x[:4], y[:4, -1:]], dim=1))
    assert torch.equal(inputs, x[:4]) and torch.equal(labels, y[:4])
    # FLOPs of the frozen layers, as counted on the real forward
    assert m.phase == 2 and m.phase1_end_ratio <= 0.5 + 1e-9 and m.projection_delta == 0.0
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        m(x[:2])
    tokens = 2 * seq
    other = 2 * tokens * 64 * vocab  # the unconverted head
    assert counter.get_total_flops() - other == 2 * tokens * sum(layer.flops() for _, layer in m.gblr_layers)


def test_checkpoint_of_another_budget_warns_and_keeps_its_structure(tmp_path):
    m = gsm(budget=0.35, phase1_epochs=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    train, val = digits_loaders(n_train=256, batch_size=64)
    trainer(tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[ckpt]).fit(m, train, val)
    path = tmp_path / "last.ckpt"
    with pytest.warns(UserWarning, match=r"checkpoint was trained with budget 0\.35; this module targets 0\.5\. "
                                         r"The structure is restored from the checkpoint") as record:
        other = GSMModule.load_from_checkpoint(path, backbone=mlp(), budget=0.5)
    assert [w.filename for w in record if "trained with budget" in str(w.message)] == [__file__]  # points here
    assert {n: layer.structure() for n, layer in other.gblr_layers} == {n: layer.structure() for n, layer in m.gblr_layers}
    assert other.budget == 0.5 and other.flops_ratio() == m.flops_ratio()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="checkpoint was trained with budget")
        GSMModule.load_from_checkpoint(path, backbone=mlp())  # same budget: no warning
