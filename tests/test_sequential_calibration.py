"""Sequential, teacher-target calibration (``convert_sequentially``, ``Calibration(sequential=True)``): the corrected
weight is the ridge least-squares solution (brute force on a stacked system), the second layer of a two-layer model
reaches the optimal rank-r error to the dense output given the converted first layer (reduced-rank regression), a
lossless first layer gives the plain conversion back, and GSMModule converts GBLR and the baselines this way."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from gsm_lightning.core.baselines import LowRankLinear, baselinify
from gsm_lightning.core.calibration import (
    InputStats,
    PairStats,
    collect_input_stats,
    collect_pair_stats,
    convert_sequentially,
    layer_groups,
    target_corrected_weight,
)
from gsm_lightning.core.conversion import gsmify
from gsm_lightning.core.conversion_spec import Calibration, Conversion
from gsm_lightning.core.layer import GBLRLinear
from gsm_lightning.training.module import GSMModule

from .helpers import adamw
from .test_calibration import _free_port, _one_thread  # noqa: F401  (_one_thread: the autouse one-thread fixture)


class Block(nn.Module):
    """q/k/v-like projections of one input, then a two-layer MLP: groups [[q, k, v], [fc1], [fc2]]."""

    def __init__(self, d: int = 12, bias: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = (nn.Linear(d, d, bias=bias) for _ in range(3))
        self.fc1, self.fc2 = nn.Linear(d, 2 * d, bias=bias), nn.Linear(2 * d, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.q(x) * torch.sigmoid(self.k(x)) + 0.5 * self.v(x)
        return self.fc2(torch.relu(self.fc1(h)))


def data(n: int = 4, d: int = 12, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d) + 0.6 * torch.randn(d, d, generator=g)
    return [torch.randn(24, d, generator=g) @ mix for _ in range(n)]


def lowrank(budget: float = 0.3):
    return lambda student, names, stats: baselinify(student, "lowrank", budget, include=names, init="pretrained",
                                                    calibration=stats)


def test_corrected_weight_is_the_ridge_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    out_f, in_f, n = 5, 7, 60
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    xt = torch.randn(n, in_f, generator=g, dtype=torch.float64)
    xs = xt + 0.3 * torch.randn(n, in_f, generator=g, dtype=torch.float64)  # the student's perturbed inputs
    pair = PairStats(InputStats(xs.t() @ xs, n), xt.t() @ xs)
    for damp in (1e-2, 0.5):
        d = damp * float((xs.t() @ xs).diagonal().mean())
        # brute force: min ||xs A^T - xt W^T||^2 + d ||A - W||^2 as one stacked least-squares problem
        lhs = torch.cat([xs, d ** 0.5 * torch.eye(in_f, dtype=torch.float64)])
        rhs = torch.cat([xt @ w.t(), d ** 0.5 * w.t()])
        expected = torch.linalg.lstsq(lhs, rhs).solution.t()
        torch.testing.assert_close(target_corrected_weight(w, pair, damp), expected, rtol=1e-9, atol=1e-9)
    # equal inputs: the weight itself; diagonal statistics: a per-channel scaling of the same ridge problem
    same = PairStats(InputStats(xt.t() @ xt, n), xt.t() @ xt)
    torch.testing.assert_close(target_corrected_weight(w, same), w, rtol=1e-10, atol=1e-10)
    diag = PairStats(InputStats(xs.pow(2).sum(0), n), (xt * xs).sum(0))
    d = 1e-2 * float(xs.pow(2).sum(0).mean())
    for j in range(in_f):  # column j alone: min ||xs_j a - xt_j w||^2 + d (a - w)^2, per output row
        scale = (float(xt[:, j] @ xs[:, j]) + d) / (float(xs[:, j] @ xs[:, j]) + d)
        torch.testing.assert_close(target_corrected_weight(w, diag)[:, j], w[:, j] * scale)
    with pytest.raises(ValueError, match="damp must be > 0"):
        target_corrected_weight(w, pair, 0.0)
    with pytest.raises(ValueError, match="does not take the 7 inputs"):
        target_corrected_weight(w[:, :3], pair)


def test_groups_follow_the_forward_and_shared_inputs():
    assert layer_groups(Block(), data()[0]) == [["q", "k", "v"], ["fc1"], ["fc2"]]
    assert layer_groups(Block(), data()[0], ["fc2", "q"]) == [["q"], ["fc2"]]


def test_pair_stats_are_the_products_of_both_models_inputs():
    dense = Block()
    student = copy.deepcopy(dense)
    baselinify(student, "lowrank", 0.3, include=["fc1"], init="pretrained")
    xs = data()
    pairs = collect_pair_stats(student, dense, xs, ["fc2"])
    with torch.no_grad():
        def fc2_input(model, x):
            h = x + model.q(x) * torch.sigmoid(model.k(x)) + 0.5 * model.v(x)
            return torch.relu(model.fc1(h)).double()
        hs = torch.cat([fc2_input(student, x) for x in xs])
        ht = torch.cat([fc2_input(dense, x) for x in xs])
    assert pairs["fc2"].student.count == 96
    torch.testing.assert_close(pairs["fc2"].student.h, hs.t() @ hs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pairs["fc2"].cross, ht.t() @ hs, rtol=1e-6, atol=1e-6)
    # the same model twice: the cross product is the student's own
    same = collect_pair_stats(dense, copy.deepcopy(dense), xs, ["q", "k", "v"])
    torch.testing.assert_close(same["k"].cross, same["k"].student.h)
    torch.testing.assert_close(same["q"].student.h, collect_input_stats(dense, xs, ["q"])["q"].h)


def test_second_layer_reaches_the_optimal_rank_r_error_to_the_dense_output():
    """Two linears around a ReLU, no bias: given the converted first layer, the sequential fit of the second is the
    reduced-rank regression of the dense output on the student's hidden activations (oracle: project the fitted
    values onto their top-r left singular vectors), up to the tiny ridge."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(10, 16, bias=False), nn.ReLU(), nn.Linear(16, 8, bias=False))
    xs = data(6, d=10)
    model = copy.deepcopy(dense)

    def convert(student, names, stats):  # the first layer: a perturbed dense layer (a well-conditioned hidden layer)
        if names == ["0"]:
            noisy = nn.Linear(10, 16, bias=False)
            with torch.no_grad():
                noisy.weight.copy_(student[0].weight + 0.2 * torch.randn(16, 10))
            student[0] = noisy
            return None
        return lowrank(0.3)(student, names, stats)

    convert_sequentially(model, xs, None, convert, damp=1e-10)
    rank = model[2].rank
    x = torch.cat(xs)
    with torch.no_grad():
        hidden = torch.relu(model[0](x)).double()  # the student's input to the second layer
        target = dense(x).double()
        got = (model[2](hidden.float()).double() - target).norm()
        a = torch.linalg.lstsq(hidden, target).solution.t()  # least squares: target ~ hidden a^T
        fitted = hidden @ a.t()
        u = torch.linalg.svd(fitted.t(), full_matrices=False)[0][:, :rank]
        best = (hidden @ (u @ u.t() @ a).t() - target).norm()
        plain = copy.deepcopy(dense)  # the same first layer, the second fitted on the dense model's inputs
        baselinify(plain, "lowrank", 0.3, include=["2"], init="pretrained", calibration=collect_input_stats(plain, xs))
        plain[0] = model[0]
        plain_err = (plain(x).double() - target).norm()
    assert float(got) == pytest.approx(float(best), rel=1e-4)
    assert float(got) < float(plain_err)  # and better than fitting each layer on the dense inputs


def test_lossless_first_layer_gives_the_plain_conversion():
    dense = Block()
    xs = data()

    def convert(student, names, stats):  # q, k, v lossless (kept as they are), fc1 and fc2 at 30 %
        if names == ["q", "k", "v"]:
            return None
        return baselinify(student, "lowrank", 0.3, include=names, init="pretrained", calibration=stats)

    seq = copy.deepcopy(dense)
    reports = convert_sequentially(seq, xs, None, convert)
    assert reports[0] is None and [r.names for r in reports[1:]] == [["fc1"], ["fc2"]]
    plain = copy.deepcopy(dense)
    baselinify(plain, "lowrank", 0.3, include=["fc1"], init="pretrained", calibration=collect_input_stats(plain, xs))
    torch.testing.assert_close(seq.fc1.to_dense(), plain.fc1.to_dense(), rtol=1e-4, atol=1e-5)
    assert seq.q is dense.q or torch.equal(seq.q.weight, dense.q.weight)
    assert not torch.allclose(seq.fc2.to_dense(), dense.fc2.weight, atol=1e-3)  # fc2 sees fc1's error: corrected


def test_gblr_sequential_and_an_error_leaves_the_model_untouched():
    dense = Block()
    xs = data()
    model = copy.deepcopy(dense)
    reports = convert_sequentially(model, xs, ["fc1", "fc2"], lambda s, names, stats: gsmify(
        s, 0.4, include=names, init="pretrained", fit_steps=0, calibration=stats))
    assert isinstance(model.fc1, GBLRLinear) and isinstance(model.fc2, GBLRLinear) and isinstance(model.q, nn.Linear)
    assert sum(r.flops for r in reports) <= 0.4 * 2 * 288 + 1e-9
    torch.testing.assert_close(model.q.weight, dense.q.weight)

    calls = []

    def failing(student, names, stats):
        calls.append(names)
        if names == ["fc2"]:
            raise RuntimeError("boom")
        return lowrank()(student, names, stats)

    model = copy.deepcopy(dense)
    with pytest.raises(RuntimeError, match="boom"):
        convert_sequentially(model, xs, None, failing)
    assert calls == [["q", "k", "v"], ["fc1"], ["fc2"]]
    for module in model.modules():  # nothing converted, no weight changed
        assert not isinstance(module, LowRankLinear)
    for (n, p), q in zip(model.named_parameters(), dense.parameters()):
        assert torch.equal(p, q), n


def test_bad_input_is_named():
    dense = Block()
    with pytest.raises(ValueError, match="batches is empty"):
        convert_sequentially(copy.deepcopy(dense), [], None, lowrank())

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(12, 12)

        def forward(self, x):
            return self.a(self.a(x))

    with pytest.raises(ValueError, match="layer 'a' is called more than once"):
        convert_sequentially(Twice(), data(), None, lowrank())

    class Skips(Block):
        def forward(self, x):
            return self.fc1(x)

    with pytest.raises(ValueError, match="does not reach the converted layer.*fc2"):
        convert_sequentially(Skips(), data(), ["fc1", "fc2"], lowrank())
    with pytest.raises(ValueError, match="teacher .* has no linear layer 'fc2'"):
        collect_pair_stats(Block(), nn.Sequential(nn.Linear(12, 12)), data(), ["fc2"])
    with pytest.raises(ValueError, match="sequential must be true or false"):
        Calibration(sequential="yes")
    with pytest.raises(ValueError, match="damp must be a number > 0"):
        Calibration(damp=0)


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.block(x))


@pytest.mark.parametrize("method,allocation", [("lowrank", "uniform"), ("lowrank", "global"), ("gblr", "measured"),
                                               ("monarch", "uniform"), ("blocksparse", "uniform")])
def test_module_converts_sequentially(method, allocation):
    batches = [(x, torch.zeros(len(x), dtype=torch.long)) for x in data()]
    kwargs = {"block_size": 6} if method == "blocksparse" else {}
    conv = Conversion(method=method, include=["block.*"], init="pretrained", fit_steps=0, layer_kwargs=kwargs,
                      calibration=Calibration(batches=4, sequential=True, damp=1e-9),
                      allocation=allocation)
    m = GSMModule(Classifier(), num_classes=3, budget=0.5, conversion=conv, phase1_epochs=1, optimizer=adamw())
    m.convert(batches)
    assert m.report.names == ["block.q", "block.k", "block.v", "block.fc1", "block.fc2"]
    assert m.report.flops_ratio <= 0.5 + 1e-9
    assert isinstance(m.backbone.head, nn.Linear)
    if allocation == "global":  # the ranks chosen on the dense model, as the plain global conversion chooses them
        ref = GSMModule(Classifier(), num_classes=3, budget=0.5, phase1_epochs=1, optimizer=adamw(),
                        conversion=Conversion(method=method, include=["block.*"], init="pretrained",
                                              calibration=Calibration(batches=4), allocation="global"))
        ref.convert(batches)
        assert m.report.ranks == ref.report.ranks and m.report.allocation == "global"
    # the last layer given the rest: its fit to the dense output beats the plain fit of the same layer (lowrank:
    # optimal; GBLR at fit_steps=0 starts from the same whitened SVD)
    plain = GSMModule(Classifier(), num_classes=3, budget=0.5, phase1_epochs=1, optimizer=adamw(),
                      conversion=Conversion(method=method, include=["block.*"], init="pretrained", fit_steps=0,
                                            layer_kwargs=kwargs, calibration=Calibration(batches=4),
                                            allocation=allocation))
    plain.convert(batches)
    assert [layer.flops for layer in plain.report.layers] == [layer.flops for layer in m.report.layers]
    hybrid = copy.deepcopy(m.backbone.block)
    hybrid.fc2 = plain.backbone.block.fc2
    dense = Classifier().block
    x = torch.cat(data())
    with torch.no_grad():
        err = lambda block: float((block(x) - dense(x)).norm() / dense(x).norm())  # noqa: E731
        if method in ("lowrank", "gblr"):
            assert err(m.backbone.block) < err(hybrid)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = Block()
        shard = data(5)[:3] if rank == 0 else data(5)[3:]
        convert_sequentially(model, shard, None, lowrank())
        torch.save(model.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_sequential_conversion_equals_one_process_on_the_union(tmp_path):
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                                          start_method="fork")
    single = Block()
    convert_sequentially(single, data(5), None, lowrank())
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, value in single.state_dict().items():
            torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5)


def test_cli_config_builds_a_sequential_calibration(tmp_path):
    from pathlib import Path

    from gsm_lightning.cli import build_cli

    config = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    cli = build_cli(["--config", str(config), "--model.conversion.init", "pretrained",
                     "--model.conversion.calibration", "{batches: 4, sequential: true, damp: 0.05, mask_padding: false}",
                     "--trainer.default_root_dir", str(tmp_path)], run=False)
    cal = cli.model.conversion.calibration
    assert (cal.batches, cal.sequential, cal.damp, cal.mask_padding) == (4, True, 0.05, False)
