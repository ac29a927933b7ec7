"""``Regrowth``: short windows grow back along their edges by the loss gradient.  Oracles: autograd on the masked
factors as leaf tensors for the gradients, an exhaustive enumeration for the greedy growth, the layer's own output
for function preservation, the teacher for what the growth is for, a full run for resume."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from gsm_lightning.core.flops import layers_flops
from gsm_lightning.core.layer import GBLRLinear, gblr_layers
from gsm_lightning.data.teacher import TeacherStudentDataModule, make_teacher
from gsm_lightning.learn.regrowth import Regrowth, edge_gradients, grow_edges
from gsm_lightning.learn.rules import BudgetRule, build_rule
from gsm_lightning.training.module import GSMModule

from .helpers import assert_resumed_exactly, killed_and_resumed
from .test_structure_recovery import fit as recovery_fit


def partial_layer(dtype=torch.float64) -> GBLRLinear:
    torch.manual_seed(0)
    layer = GBLRLinear(12, 9, rank_per_component=2, num_components=4, bias=False, dtype=dtype)
    with torch.no_grad():
        layer.widths.copy_(torch.tensor([[6, 3, 0, 12], [4, 9, 5, 2]], dtype=torch.float32)
                           / torch.tensor([[12.0], [9.0]]))
        layer.locations.copy_(torch.tensor([[10, 2, 4, 0], [7, 0, 3, 5]], dtype=torch.float32)
                              / torch.tensor([[12.0], [9.0]]))
    layer.set_sigma(None)  # exact boxcars
    return layer


def test_edge_gradients_are_the_gradients_of_the_masked_factors_inside_and_outside_the_windows():
    layer = partial_layer()
    x, t = torch.randn(2, 5, 12, dtype=torch.float64), torch.randn(2, 5, 9, dtype=torch.float64)
    v, u = (f.detach().clone().requires_grad_(True) for f in layer.masked_factors())  # (K r, in), (K r, out)
    loss = ((x @ v.t() @ u - t) ** 2).sum()  # the layer's product, with every entry of the factors a leaf
    loss.backward()
    out = layer(x)
    torch.testing.assert_close(out, x @ v.detach().t() @ u.detach())
    dy = 2 * (out - t).detach()
    index = torch.tensor([0, 1, 3])
    g_in, g_out = edge_gradients(layer, x, dy, index)
    assert g_in.shape == (3, 2, 12) and g_out.shape == (3, 2, 9)
    rows = torch.tensor([0, 1, 2, 3, 6, 7])
    torch.testing.assert_close(g_in.reshape(6, 12), v.grad[rows])
    torch.testing.assert_close(g_out.reshape(6, 9), u.grad[rows])
    # outside a window the masked factor is 0 and its gradient is not: that is what growth reads
    assert float(v.detach()[0, 4:10].abs().max()) < 1e-7 and float(v.grad[0, 4:10].abs().sum()) > 0  # window 10..3


def windows(layer: GBLRLinear) -> list[tuple[int, int, int, int]]:
    w, loc = layer.int_widths(), layer.int_locations()
    return [(int(loc[0, k]), int(w[0, k]), int(loc[1, k]), int(w[1, k])) for k in range(layer.num_components)]


def test_growth_is_greedy_by_the_next_entrys_score_per_flop_and_keeps_the_function():
    layer = partial_layer()
    x = torch.randn(16, 12, dtype=torch.float64)
    before_out, before = layer(x).detach(), windows(layer)
    s_in, s_out = torch.rand(4, 12, dtype=torch.float64), torch.rand(4, 9, dtype=torch.float64)
    cost = layers_flops([layer])["flops"]
    added = grow_edges([layer], 2 * 5 + 1, [(s_in, s_out)])  # rank 2: 5 grid steps fit, the 6th does not
    assert added == 10 and layers_flops([layer])["flops"] == cost + 10
    after = windows(layer)
    # component 2 is empty on its input side: it never grows; component 3 is full on its input side
    assert after[2] == before[2] and after[3][1] == 12
    # oracle: repeat "take the best next entry at any edge of any active component" by enumeration
    state = {k: list(before[k]) for k in (0, 1, 3)}
    for _ in range(5):
        best = None
        for k, (li, wi, lo, wo) in state.items():
            for side, (loc, wid, n, s) in enumerate(((li, wi, 12, s_in), (lo, wo, 9, s_out))):
                if wid >= n:
                    continue
                for d, pos in ((-1, (loc - 1) % n), (1, (loc + wid) % n)):
                    cand = (float(s[k, pos]), k, side, d)
                    best = cand if best is None or cand[0] > best[0] else best
        _, k, side, d = best
        li, wi, lo, wo = state[k]
        if side == 0:
            state[k] = [(li - 1) % 12 if d < 0 else li, wi + 1, lo, wo]
        else:
            state[k] = [li, wi, (lo - 1) % 9 if d < 0 else lo, wo + 1]
    assert {k: tuple(v) for k, v in state.items()} == {k: after[k] for k in (0, 1, 3)}
    layer.invalidate_cache()
    torch.testing.assert_close(layer(x), before_out, rtol=0, atol=1e-6)  # added entries are zero (the FFT masks leak ~1e-8)


@pytest.mark.parametrize("room", [13, 40, 1e9])
def test_growth_across_layers_of_several_ranks_matches_an_enumeration(room):
    # a rank-2 and a rank-1 layer: the rank-2 entries score more per FLOP, so they go first; once less than 2 FLOPs
    # are left only the rank-1 layer's entries fit (the loop must not stop at the first entry that does not fit)
    torch.manual_seed(1)
    big = partial_layer()
    small = GBLRLinear(10, 8, rank_per_component=1, num_components=3, bias=False)
    with torch.no_grad():
        small.widths.copy_(torch.tensor([[2, 5, 10], [3, 0, 1]], dtype=torch.float32) / torch.tensor([[10.0], [8.0]]))
        small.locations.copy_(torch.tensor([[9, 1, 0], [6, 2, 7]], dtype=torch.float32) / torch.tensor([[10.0], [8.0]]))
    layers = [big, small]
    scores = [(10 * torch.rand(4, 12, dtype=torch.float64), 10 * torch.rand(4, 9, dtype=torch.float64)),
              (torch.rand(3, 10, dtype=torch.float64), torch.rand(3, 8, dtype=torch.float64))]
    state = [{k: list(w) for k, w in enumerate(windows(m)) if w[1] > 0 and w[3] > 0} for m in layers]
    added = grow_edges(layers, room, scores)
    # oracle: repeatedly take the best next entry per FLOP among those that still fit, until none does
    spent = 0
    while True:
        best = None
        for i, (m, st) in enumerate(zip(layers, state)):
            r = m.rank_per_component
            for k, (li, wi, lo, wo) in st.items():
                for side, (loc, wid, n) in enumerate(((li, wi, m.in_features), (lo, wo, m.out_features))):
                    if wid >= n or spent + r > room:
                        continue
                    for d, pos in ((-1, (loc - 1) % n), (1, (loc + wid) % n)):
                        cand = (float(scores[i][side][k, pos]) / r, i, k, side, d)
                        best = cand if best is None or cand[0] > best[0] else best
        if best is None:
            break
        _, i, k, side, d = best
        li, wi, lo, wo = state[i][k]
        n = (layers[i].in_features, layers[i].out_features)[side]
        state[i][k] = ([(li - 1) % n if d < 0 else li, wi + 1, lo, wo] if side == 0 else
                       [li, wi, (lo - 1) % n if d < 0 else lo, wo + 1])
        spent += layers[i].rank_per_component
    assert added == spent
    for m, st in zip(layers, state):
        after = windows(m)
        assert {k: tuple(v) for k, v in st.items()} == {k: after[k] for k in st}
    if room == 13:
        assert added == 13  # 12 by rank-2 steps, then one rank-1 step into the last FLOP


def test_growth_stops_at_full_width_and_at_the_room_given():
    layer = partial_layer()
    ones = (torch.ones(4, 12), torch.ones(4, 9))
    assert grow_edges([layer], 1.5, [ones]) == 0.0  # less than one grid step of rank 2
    total = grow_edges([layer], 1e9, [ones])
    w = layer.int_widths()
    assert w[:, [0, 1, 3]].tolist() == [[12, 12, 12], [9, 9, 9]] and w[:, 2].tolist() == [0, 5]
    assert total == 2 * ((12 - 6) + (12 - 3) + (9 - 4) + (9 - 9) + (9 - 2))
    assert grow_edges([layer], 1e9, [None]) == 0.0


class Ratios(pl.Callback):
    def __init__(self) -> None:
        self.ratios: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ratios.append(pl_module.flops_ratio())


def teacher_fit(regrowth: Regrowth | None, seed: int = 0, callbacks=(), root: Path | None = None,
                ckpt_path: str | None = None, epochs: int = 24, phase1: int = 18, rule=None, drop_empty: bool = True):
    """The low-rank teacher's student, with ``BudgetRule(regrowth=regrowth, cost_power=0)`` unless ``rule`` is given;
    ``drop_empty``: ``GSMModule.drop_empty``.  Returns the module and its test error (None when resumed)."""
    teacher = make_teacher("low_rank", seed=seed)
    pl.seed_everything(seed)
    data = TeacherStudentDataModule(teacher.weight, num_train=1024, num_val=64, num_test=512, noise_std=0.01,
                                    batch_size=64, seed=seed)
    module = GSMModule(nn.Sequential(nn.Linear(128, 128, bias=False)), task="regression", include=["0"],
                       budget=teacher.flops_ratio, phase1_epochs=phase1, warmup_epochs=1.0,
                       optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0),
                       # the plain energy cut (cost_power 0, the default before 2026-12-07): what the overshoot's
                       # take-back relies on; with 0.3 a partial window keeps its share and 9 components remain
                       rule=rule if rule is not None else BudgetRule(regrowth=regrowth, cost_power=0.0))
    module.drop_empty = drop_empty
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=root is not None,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, deterministic=True, callbacks=list(callbacks), default_root_dir=root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        rel = trainer.test(module, datamodule=data, verbose=False)[0]["test/rel_mse"] if ckpt_path is None else None
    return module, rel


def test_regrowth_grows_the_windows_the_cut_left_short_into_the_teachers_structure():
    """The low-rank teacher (rank 8 on 128x128, budget 0.125: 8 full components), short recipe: the default learner
    ends with 9 components, most of them short of full width, at 2.6x the error of a fixed low-rank student.  With
    growth above the budget (annealed to 0) and the learner's cut taking it back, the same run ends with the
    teacher's structure, 8 full components, and below that student's error."""
    base, base_rel = teacher_fit(None)
    ratios = Ratios()
    grown, rel = teacher_fit(Regrowth(overshoot=0.05), callbacks=[ratios])
    budget = make_teacher("low_rank").flops_ratio
    assert (gblr_layers(base.backbone)[0][1].int_widths() < 128).any()
    w = gblr_layers(grown.backbone)[0][1].int_widths()
    assert w.shape == (2, 8) and (w == 128).all(), w
    assert grown.flops_ratio() == pytest.approx(budget) and grown.projection_delta == 0.0
    g = grown.rule.regrowth
    assert g.start_step == round(0.65 * 18 * 16) and g.grown > 0
    after = ratios.ratios[g.start_step - 1:18 * 16]
    assert max(after) == pytest.approx(budget * 1.05, abs=2 / 128**2)  # the first growth: the whole overshoot
    assert max(after[len(after) // 2:]) < budget * 1.025  # annealed: half-way, under half of it
    assert after[-1] <= budget + 1e-9  # the learner's cuts took it back
    lowrank = fixed_lowrank()
    assert rel < base_rel / 2 and rel < 1.2 * lowrank, (rel, base_rel, lowrank)


def test_with_no_overshoot_regrowth_only_fills_what_the_cuts_left():
    ratios = Ratios()
    module, _ = teacher_fit(Regrowth(start=0.5, interval=0.1), callbacks=[ratios], epochs=8, phase1=6, seed=1)
    budget = make_teacher("low_rank").flops_ratio
    g = module.rule.regrowth
    assert g.overshoot == 0.0 and g.grown > 0
    assert max(ratios.ratios[g.start_step - 1:96]) <= budget + 1e-9
    assert module.phase1_end_ratio == pytest.approx(budget, abs=2 / 128**2)  # filled to the last grid step


def fixed_lowrank() -> float:
    """The fixed low-rank student of the same recipe (trained once per session by the recovery tests' cache)."""
    return recovery_fit("low_rank", method="lowrank")[1]


def test_overshoot_rises_above_the_budget_then_the_cut_takes_it_back():
    ratios = Ratios()
    module, _ = teacher_fit(Regrowth(start=0.6, interval=0.1, overshoot=0.1), callbacks=[ratios], epochs=8, phase1=6)
    budget = make_teacher("low_rank").flops_ratio
    rule = module.rule
    assert rule.regrowth.start_step == round(0.6 * 96) and rule.regrowth.interval_steps == round(0.1 * 96)
    phase1 = ratios.ratios[:96]
    assert max(phase1) > budget * 1.05  # a growth went above it ...
    assert phase1[-1] <= budget + 1e-9  # ... and the learner's cuts brought it back
    assert module.phase == 2 and module.projection_delta == 0.0


def test_a_run_killed_while_regrowing_resumes_bit_identically(tmp_path):
    def fit(callbacks, root, ckpt_path):
        return teacher_fit(Regrowth(start=0.5, interval=0.1, measure=1.0), callbacks=callbacks, root=root,
                           ckpt_path=ckpt_path, epochs=6, phase1=4)[0]

    full, full_rec, resumed, rec, ckpt = killed_and_resumed(fit, tmp_path)
    sums = ckpt["gsm_learner"]["regrowth"]["sums"]
    assert set(sums) == {"0"} and float(sums["0"][0].abs().sum()) > 0  # mid-measurement (growths at 32, 38, 44, ...)
    assert_resumed_exactly(full, full_rec, resumed, rec, range(41, 97))
    assert resumed.rule.regrowth.grown == full.rule.regrowth.grown


def test_the_rule_with_regrowth_rebuilds_from_its_config():
    rule = BudgetRule(path_fraction=0.3, regrowth=Regrowth(start=0.7, interval=0.05, overshoot=0.02))
    back = build_rule(rule.config())
    assert isinstance(back.regrowth, Regrowth) and back.init_args() == rule.init_args()
    assert back.init_args()["regrowth"]["init_args"] == {"start": 0.7, "interval": 0.05, "overshoot": 0.02,
                                                          "measure": 0.25}
    off = BudgetRule(regrowth=None)
    assert off.init_args()["regrowth"] is None and build_rule(off.config()).regrowth is None
    assert isinstance(BudgetRule().regrowth, Regrowth) and BudgetRule().regrowth is not BudgetRule().regrowth
    plain = BudgetRule(regrowth={"class_path": "gsm_lightning.learn.regrowth.Regrowth", "init_args": {"start": 0.5}})
    assert plain.regrowth.start == 0.5
    # the schedule starts no earlier than the path's end
    rule.start(1000)
    assert rule.regrowth.start_step == 700
    late = BudgetRule(path_fraction=0.8, regrowth=Regrowth(start=0.5))
    late.start(1000)
    assert late.regrowth.start_step == 800


def test_the_gradients_are_summed_over_the_last_part_of_each_interval_and_of_phase_one():
    def measured(g: Regrowth) -> list[int]:
        steps = []
        for n in range(1, 101):  # the forward of optimizer step n runs after n - 1 steps
            g.steps = n - 1
            if g.measuring:
                steps.append(n)
        return steps

    g = Regrowth(start=0.5, interval=0.1, measure=0.3)
    g.begin(100)
    assert (g.start_step, g.interval_steps, g.measure_steps) == (50, 10, 3)
    # growths after steps 50, 60, 70, 80, 90; the sums of steps 98-100 feed the switch's growth
    assert measured(g) == [n for n in range(48, 101) if n % 10 in (8, 9, 0)]
    full = Regrowth(start=0.5, interval=0.1, measure=1.0)
    full.begin(100)
    assert measured(full) == list(range(41, 101))


@pytest.mark.parametrize("bad, match", [({"measure": 0}, "measure"), ({"start": 1.5}, "start"), ({"interval": 0}, "interval"),
                                        ({"overshoot": -0.1}, "overshoot"), ({"overshoot": True}, "overshoot")])
def test_bad_arguments_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        Regrowth(**bad)


def test_a_wrong_regrowth_class_is_named():
    with pytest.raises(ValueError, match="regrowth class_path"):
        BudgetRule(regrowth={"class_path": "gsm_lightning.learn.rules.PaperRule"})
    with pytest.raises(ValueError, match="regrowth must be"):
        BudgetRule(regrowth=0.05)


def test_a_checkpoint_without_regrowth_state_keeps_the_schedule():
    rule = BudgetRule()
    rule.load_state_dict({"steps": 40, "start_ratio": 0.9, "dual_tau": 0.0, "mean_sq": {}})  # written before regrowth
    assert rule.learner.steps == 40 and rule.regrowth.steps == 40 and rule.regrowth.sums == {}


def test_regrowth_is_pickled_without_its_hooks():
    import pickle

    g = Regrowth()
    layer = nn.Sequential(GBLRLinear(8, 8))
    g.begin(10)
    g.attach(layer)
    assert g._hooks
    back = pickle.loads(pickle.dumps(g))
    assert back._hooks == [] and back.start_step == g.start_step



def test_regrowth_is_configured_from_yaml(tmp_path):
    from gsm_lightning.cli import build_cli

    root = Path(__file__).resolve().parents[1]
    overlay = tmp_path / "regrowth.yaml"
    overlay.write_text("model:\n  rule:\n    class_path: gsm_lightning.learn.rules.BudgetRule\n    init_args:\n"
                       "      regrowth:\n        class_path: gsm_lightning.learn.regrowth.Regrowth\n"
                       "        init_args: {start: 0.7, overshoot: 0.02}\n")
    cli = build_cli(["--config", str(root / "configs" / "quickstart.yaml"), "--config", str(overlay)], run=False)
    g = cli.model.rule.regrowth
    assert isinstance(g, Regrowth) and (g.start, g.interval, g.overshoot) == (0.7, 0.03, 0.02)
    off = tmp_path / "off.yaml"
    off.write_text("model:\n  rule:\n    class_path: gsm_lightning.learn.rules.BudgetRule\n"
                   "    init_args: {regrowth: null}\n")
    cli = build_cli(["--config", str(root / "configs" / "quickstart.yaml"), "--config", str(off)], run=False)
    assert cli.model.rule.regrowth is None
    cli = build_cli(["--config", str(root / "configs" / "quickstart.yaml")], run=False)
    assert isinstance(cli.model.rule.regrowth, Regrowth)  # the default


def test_per_layer_growth_fills_each_layer_to_its_own_room():
    """Two layers at half the budget, the first with far larger gradient scores: grown for the model, the first takes
    the room of both (ending above the budget on its own); grown per layer (``BudgetRule(allocation="layer")``), each
    ends at the budget to the last grid step and no layer goes above it."""
    def model():
        torch.manual_seed(0)
        m = nn.Sequential(GBLRLinear(20, 30, num_components=6, bias=False), GBLRLinear(30, 20, num_components=6,
                                                                                        bias=False))
        for layer in m:
            with torch.no_grad():
                layer.widths.fill_(0.15)
                layer.locations.zero_()
        return m

    def grow(per_layer: bool) -> nn.Sequential:
        m = model()
        g = Regrowth()
        for (name, layer), scale in zip(gblr_layers(m), (100.0, 1.0)):
            k, r = layer.num_components, layer.rank_per_component
            gen = torch.Generator().manual_seed(1)
            g.sums[name] = (scale * torch.rand(k, r, layer.in_features, generator=gen),
                            scale * torch.rand(k, r, layer.out_features, generator=gen))
        with torch.no_grad():
            g._grow(m, 0.4, per_layer=per_layer)
        return m

    ratios = [layers_flops([layer])["flops"] / layers_flops([layer])["dense_flops"] for layer in grow(False)]
    assert ratios[0] > 0.45 and ratios[1] < 0.35, ratios
    for layer in grow(True):
        cost = layers_flops([layer])
        step = layer.rank_per_component / cost["dense_flops"]
        assert 0.4 - step < cost["flops"] / cost["dense_flops"] <= 0.4


def test_the_layer_allocation_rule_rebuilds_from_its_config_and_holds_every_layer_to_the_budget():
    rule = BudgetRule(allocation="layer")
    again = build_rule(rule.config())
    assert again.learner.allocation == "layer" and again.init_args() == rule.init_args()
    assert "allocation" not in BudgetRule().init_args()  # the default's config is unchanged
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :4].argmax(1)), batch_size=32)
    backbone = nn.Sequential(nn.Linear(16, 48), nn.GELU(), nn.Linear(48, 48), nn.GELU(), nn.Linear(48, 4))
    module = GSMModule(backbone, num_classes=4, budget=0.4, phase1_epochs=3, include=["0", "2"],
                       optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), rule=BudgetRule(allocation="layer"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_val_batches=0).fit(module, data)
    assert module.phase == 2 and module.projection_delta == 0.0
    for _, layer in gblr_layers(module.backbone):
        cost = layers_flops([layer])
        assert 0.4 - 2 * layer.rank_per_component * 48 / cost["dense_flops"] < cost["flops"] / cost["dense_flops"] <= 0.4


def probed_layer(in_features: int = 12, out_features: int = 9, **kwargs) -> GBLRLinear:
    """Five components of rank 2: three active, one live on its output side only, one empty."""
    torch.manual_seed(0)
    layer = GBLRLinear(in_features, out_features, rank_per_component=2, num_components=5, bias=True,
                       dtype=torch.float64, **kwargs)
    n = torch.tensor([[in_features], [out_features]], dtype=torch.float64)
    with torch.no_grad():
        layer.widths.copy_(torch.tensor([[0, 3, 0, 6, 2], [0, 9, 5, 4, 2]]) / n)
        layer.locations.copy_(torch.tensor([[0, 2, 4, 10, 7], [0, 0, 3, 7, 5]]) / n)
    layer.set_sigma(8.0)
    return layer


@pytest.mark.parametrize("mode", ["lowrank", "dense", "windowed"])
def test_the_probe_sums_the_edge_gradients_whichever_product_the_forward_ran(mode, monkeypatch):
    """The full products (low-rank, materialised) hand the probe the gradients of their masked factors; a windowed
    product does not compute them outside its tiles, and the probe computes them from the layer's input and output
    gradient.  Either way the sums are :func:`edge_gradients` of the active components."""
    import gsm_lightning.learn.regrowth as regrowth_module

    if mode == "windowed":
        layer = probed_layer(32, 24, window_tile=4)
        layer.window_min_macs, layer.window_max_fraction = 0, 1.0
        layer.set_sigma(None)
    else:
        layer = probed_layer(forward_mode=mode)
    model = nn.Sequential(layer)
    calls = []
    monkeypatch.setattr(regrowth_module, "edge_gradients",
                        lambda *a: calls.append(1) or edge_gradients(*a))
    g = Regrowth(start=0.0, interval=0.5, measure=1.0)
    g.begin(10)
    g.attach(model)
    assert g.measuring and layer.keep_factors
    x = torch.randn(3, 7, layer.in_features, dtype=torch.float64)
    t = torch.randn(3, 7, layer.out_features, dtype=torch.float64)
    out = model(x)
    assert layer._last_factors is None  # taken by the probe in the forward: no graph is kept on the layer
    ((out - t) ** 2).sum().backward()
    index = layer.active_components().nonzero().flatten()
    assert index.tolist() == [1, 3, 4]
    g_in, g_out = edge_gradients(layer, x, 2 * (out - t).detach(), index)
    sums = g.sums["0"]
    torch.testing.assert_close(sums[0][index], g_in.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sums[1][index], g_out.float(), rtol=1e-5, atol=1e-6)
    assert float(sums[0][[0, 2]].abs().sum() + sums[1][[0, 2]].abs().sum()) == 0.0  # not active: nothing added
    assert len(calls) == (1 if mode == "windowed" else 0)  # the full products cost no extra product
    g.detach()
    assert not layer.keep_factors and layer._last_factors is None
