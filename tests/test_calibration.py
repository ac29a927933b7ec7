"""Activation-aware (calibrated) conversion: input statistics, the whitened low-rank rule, the calibrated GBLR fit,
the calibrated baselines and the global rank allocation, each checked against an independent oracle."""

from __future__ import annotations

import copy
import itertools
import math
import os
import socket

import pytest
import torch
from torch import nn

from gsm_lightning.core.baselines import (
    BlockSparseLinear,
    LowRankLinear,
    MonarchLinear,
    allocate_ranks_greedy,
    baselinify,
    rank_for_budget,
)
from gsm_lightning.core.calibration import (
    InputStats,
    collect_input_stats,
    optimal_low_rank_error,
    relative_output_error,
    whitened_low_rank,
    whitened_svd,
)
from gsm_lightning.core.conversion import gsmify
from gsm_lightning.core.layer import GBLRLinear


@pytest.fixture(autouse=True)
def _one_thread():
    """Small matrices: one intra-op thread (several threads only spin on a loaded 2-core machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 5))


def batches(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, 6, generator=g) for _ in range(n)]


def direct_grams(model: nn.Sequential, xs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """X^T X of both linears' inputs from the stacked activations, computed by hand (no hooks)."""
    x0 = torch.cat([x.reshape(-1, 6) for x in xs]).double()
    with torch.no_grad():  # batch by batch in float32 as in the model (no dropout in eval)
        x1 = torch.cat([torch.relu(model[0](x)).reshape(-1, 8) for x in xs]).double()
    return {"0": x0.t() @ x0, "3": x1.t() @ x1}


def inputs_with_covariance(n_tokens: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(n) + 0.5 * torch.randn(n, n, generator=g)
    return (torch.randn(n_tokens, n, generator=g) * torch.linspace(0.2, 2.0, n)) @ mix


def stats_of(x: torch.Tensor) -> InputStats:
    x = x.reshape(-1, x.shape[-1]).double()
    return InputStats(x.t() @ x, x.shape[0])


# ------------------------------------------------------------------------------------------------------- statistics
def test_stats_equal_gram_of_stacked_activations_and_model_state_is_restored():
    model = mlp()
    model.train()
    model[2].eval()  # a mixed mode, restored module by module
    xs = batches()
    seen = []
    stats = collect_input_stats(model, xs, forward=lambda m, b: (seen.append(m.training), m(b)))
    assert seen == [False] * len(xs)  # run in eval mode (dropout off)
    assert model.training and model[0].training and not model[2].training
    assert all(not m._forward_pre_hooks for m in model.modules())
    oracle = direct_grams(model, xs)
    assert set(stats) == {"0", "3"}
    for name, h in oracle.items():
        assert stats[name].count == 4 * 12
        assert stats[name].h.dtype == torch.float64
        torch.testing.assert_close(stats[name].h, h, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(stats[name].second_moment(), h / 48)
    diag = collect_input_stats(model, xs, diagonal=True)
    for name, h in oracle.items():
        torch.testing.assert_close(diag[name].h, torch.diagonal(h), rtol=1e-10, atol=1e-10)
        s = diag[name].whitening()
        assert s.shape == (h.shape[0],)
        torch.testing.assert_close(s.pow(2), torch.diagonal(h) / 48, rtol=1e-10, atol=1e-12)


def test_whitening_is_the_cholesky_factor_and_damps_singular_statistics():
    x = inputs_with_covariance(200, 7)
    st = stats_of(x)
    s = st.whitening()
    assert torch.equal(s, s.tril())
    torch.testing.assert_close(s @ s.t(), st.second_moment(), rtol=1e-10, atol=1e-12)  # full rank: no damping
    singular = stats_of(x[:, :3] @ torch.randn(3, 7, dtype=x.dtype))  # rank 3 < 7
    s2 = singular.whitening(damp=1e-2)
    h = singular.second_moment()
    extra = s2 @ s2.t() - h
    torch.testing.assert_close(extra, torch.eye(7, dtype=torch.float64) * extra[0, 0], rtol=1e-8, atol=1e-12)
    assert extra[0, 0] >= 1e-2 * float(torch.diagonal(h).mean()) * (1 - 1e-9)


def test_dict_batches_layers_by_module_and_pattern():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 3)

        def forward(self, input_ids: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return self.b(self.a(input_ids) * scale)

    net = Net()
    xs = [{"input_ids": torch.randn(2, 3, 5), "scale": 2.0} for _ in range(3)]
    by_module = collect_input_stats(net, xs, layers=[net.b])
    by_pattern = collect_input_stats(net, xs, layers="b")
    with torch.no_grad():  # batch by batch like the model's calls: the same float32 rounding
        xb = torch.cat([(net.a(b["input_ids"]) * 2.0).reshape(-1, 4) for b in xs]).double()
    for stats in (by_module, by_pattern):
        assert list(stats) == ["b"]
        torch.testing.assert_close(stats["b"].h, xb.t() @ xb, rtol=1e-10, atol=1e-10)
        assert stats["b"].count == 18


def test_hooks_removed_and_mode_restored_on_error():
    model = mlp().train()

    def boom(m, b):
        m(b)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        collect_input_stats(model, batches(), forward=boom)
    assert model.training and all(m.training for m in model.modules())
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_errors_unreached_layer_and_empty_batches():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.used(x)

    net = Branchy()
    with pytest.raises(ValueError, match=r"does not reach.*unused.*include patterns"):
        collect_input_stats(net, [torch.randn(2, 4)])
    assert all(not m._forward_pre_hooks for m in net.modules())
    assert list(collect_input_stats(net, [torch.randn(2, 4)], layers=["used"])) == ["used"]
    with pytest.raises(ValueError, match="empty"):
        collect_input_stats(net, [], layers=["used"])
    with pytest.raises(ValueError, match="empty"):
        collect_input_stats(net, iter(()), layers=["used"])
    with pytest.raises(ValueError, match="no submodule named 'nope'"):
        collect_input_stats(net, [torch.randn(2, 4)], layers=["nope"])


# ------------------------------------------------------------------------------------------- whitened low rank
@pytest.mark.parametrize("out_f,in_f,rank", [(9, 7, 3), (6, 10, 2), (8, 8, 5)])
def test_whitened_low_rank_reaches_the_optimal_output_error(out_f, in_f, rank):
    """Oracle: the best rank-r W' for ||(W - W') X^T|| is the truncated SVD of Y = W X^T (rows of Y lie in the row
    space of X^T, so the Eckart-Young optimum of Y is attainable): computed from W X^T, not from H or S."""
    torch.manual_seed(out_f + in_f)
    w = torch.randn(out_f, in_f, dtype=torch.float64)
    x = inputs_with_covariance(60, in_f, seed=rank).double()  # tokens x in, full column rank
    y = w @ x.t()
    sv = torch.linalg.svdvals(y)
    best = math.sqrt(float(sv[rank:].pow(2).sum() / sv.pow(2).sum()))
    uy, sy, vyh = torch.linalg.svd(y, full_matrices=False)
    oracle = (uy[:, :rank] * sy[:rank]) @ vyh[:rank] @ torch.linalg.pinv(x.t())  # the unique minimiser
    st = stats_of(x)
    u, v = whitened_low_rank(w, st, rank)
    assert u.shape == (out_f, rank) and v.shape == (in_f, rank)
    approx = u @ v.t()
    err = float((y - approx @ x.t()).norm() / y.norm())
    assert err == pytest.approx(best, rel=1e-8, abs=1e-10)
    torch.testing.assert_close(approx, oracle, rtol=1e-7, atol=1e-9)
    assert optimal_low_rank_error(w, st, rank) == pytest.approx(best, rel=1e-8)
    assert relative_output_error(w, approx, st) == pytest.approx(best, rel=1e-8)
    torch.testing.assert_close(u.norm(dim=0), v.norm(dim=0))  # balanced components
    plain = LowRankLinear.from_linear(_linear(w.float()), rank).to_dense().double()
    assert relative_output_error(w, plain, st) >= best - 1e-9


def test_whitened_low_rank_no_better_solution_found_by_alternating_least_squares():
    """Second oracle on a tiny matrix: alternating least squares on the tokens (A = Y (B X^T)^+, B = A^+ Y (X^T)^+)
    from random rank-r starts, with no SVD of W S, ends no lower."""
    torch.manual_seed(3)
    w = torch.randn(6, 5, dtype=torch.float64)
    x = inputs_with_covariance(30, 5, seed=2).double()
    st = stats_of(x)
    u, v = whitened_low_rank(w, st, 2)
    ours = relative_output_error(w, u @ v.t(), st)
    y, xt_pinv = w @ x.t(), torch.linalg.pinv(x.t())
    best_found = math.inf
    for seed in range(3):
        b = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        for _ in range(300):
            a = y @ torch.linalg.pinv(b @ x.t())
            b = torch.linalg.pinv(a) @ y @ xt_pinv
        best_found = min(best_found, relative_output_error(w, a @ b, st))
    assert ours <= best_found + 1e-9
    assert best_found < ours + 1e-6  # the search does reach the optimum: the oracle is meaningful


def test_one_whitened_svd_gives_every_rank_of_whitened_low_rank():
    """``whitened_svd`` once, truncated at each rank, is ``whitened_low_rank`` at that rank (to rounding) and reaches
    the optimal output error of that rank, for full and diagonal statistics and a given factor; bad ranks are
    named."""
    torch.manual_seed(5)
    w = torch.randn(12, 9)
    x = inputs_with_covariance(80, 9, seed=4)
    full = stats_of(x)
    for source in (full, full.whitening(), InputStats(full.h.diagonal().clone(), full.count)):
        svd = whitened_svd(w, source)
        assert svd.max_rank == 9
        for rank in (0, 1, 4, 9):
            u, v = whitened_low_rank(w, source, rank)
            u2, v2 = svd.factors(rank)
            assert u2.dtype == u.dtype == torch.float32 and u2.shape == u.shape and v2.shape == v.shape
            torch.testing.assert_close(u2, u, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(v2, v, rtol=1e-6, atol=1e-7)
            # independent of whitened_low_rank: the truncation reaches the Eckart-Young optimum of W S at that rank
            err = relative_output_error(w, u2 @ v2.t(), source)
            assert err == pytest.approx(optimal_low_rank_error(w, source, rank), rel=1e-5, abs=1e-6)
            torch.testing.assert_close(u2.norm(dim=0), v2.norm(dim=0))  # balanced components
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 4\] \(the ranks this SVD was kept to\)"):
        whitened_svd(w, stats_of(x), 4).factors(5)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, min\(out, in\)\] = \[0, 9\]"):
        whitened_svd(w, stats_of(x), 10)


def _linear(w: torch.Tensor, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


# --------------------------------------------------------------------------------------------------- calibrated GBLR
@pytest.mark.parametrize("out_f,in_f", [(16, 24), (24, 16), (20, 20)])
@pytest.mark.parametrize("budget", [0.3, 0.5])
def test_calibrated_gblr_never_worse_than_whitened_svd_of_equal_flops(out_f, in_f, budget):
    for seed in range(2):
        torch.manual_seed(seed)
        lin = nn.Linear(in_f, out_f)
        x = inputs_with_covariance(4 * in_f, in_f, seed=seed)
        st = stats_of(x)
        layer = GBLRLinear.from_linear(lin, budget=budget, fit_steps=25, input_factor=st)
        rank = rank_for_budget(in_f, out_f, budget)
        whitened = optimal_low_rank_error(lin.weight, st, rank)
        ours = relative_output_error(lin.weight, layer.to_dense(), st)
        assert ours <= whitened + 1e-5, (seed, ours, whitened)
        assert layer.flops() <= budget * in_f * out_f
        assert ours < relative_output_error(lin.weight, LowRankLinear.from_linear(lin, rank).to_dense(), st)
        torch.testing.assert_close(layer.bias, lin.bias)
        assert layer.sigma.isinf()


def test_calibrated_gblr_beats_whitened_svd_on_a_block_diagonal_layer():
    """GBLR can do better than every rank-r matrix: a block-diagonal weight at the FLOPs of its blocks."""
    torch.manual_seed(0)
    w = torch.block_diag(*[torch.randn(8, 8) for _ in range(4)]) + 0.1 * torch.randn(32, 32)
    lin = _linear(w)
    st = stats_of(inputs_with_covariance(128, 32))
    layer = GBLRLinear.from_linear(lin, budget=0.5, fit_steps=300, input_factor=st)
    whitened = optimal_low_rank_error(w, st, rank_for_budget(32, 32, 0.5))
    ours = relative_output_error(w, layer.to_dense(), st)
    assert layer.flops() <= 0.5 * 32 * 32
    assert ours < 0.95 * whitened, (ours, whitened)


def test_fit_to_with_input_factor_keeps_the_best_iterate_and_old_path_is_unchanged():
    torch.manual_seed(1)
    lin = nn.Linear(12, 10)
    st = stats_of(inputs_with_covariance(60, 12))
    s = st.whitening()
    start = GBLRLinear.from_linear(lin, budget=0.5, fit_steps=0, input_factor=s)
    e0 = relative_output_error(lin.weight, start.to_dense(), s) ** 2
    layer = copy.deepcopy(start)
    e1 = layer.fit_to(lin.weight, 0.5, steps=30, lr=0.5, structure_lr=0.5, input_factor=s)  # wild steps
    assert e1 <= e0 + 1e-6
    assert relative_output_error(lin.weight, layer.to_dense(), s) ** 2 == pytest.approx(e1, rel=1e-4, abs=1e-7)
    torch.manual_seed(5)
    a = GBLRLinear.from_linear(lin, budget=0.4, fit_steps=20)
    torch.manual_seed(5)
    b = GBLRLinear.from_linear(lin, budget=0.4, fit_steps=20, input_factor=None)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    with pytest.raises(ValueError, match="input features"):
        GBLRLinear.from_linear(lin, budget=0.5, input_factor=torch.eye(5))


# ------------------------------------------------------------------------------------------------------ plumbing
def test_gsmify_and_baselinify_calibrated_end_to_end():
    model = mlp()
    xs = [torch.randn(40, 6) @ torch.randn(6, 6) for _ in range(3)]
    stats = collect_input_stats(model, xs)
    g = copy.deepcopy(model)
    report = gsmify(g, 0.5, calibration=stats, fit_steps=20)
    lr = copy.deepcopy(model)
    low = baselinify(lr, "lowrank", 0.5, calibration=stats)
    assert low.calibrated and low.allocation == "uniform"
    for layer, base in zip(report.layers, low.layers):
        w = model.get_submodule(layer.name).weight
        opt = optimal_low_rank_error(w, stats[layer.name], rank_for_budget(w.shape[1], w.shape[0], 0.5))
        assert layer.output_error <= opt + 1e-5
        assert base.output_error == pytest.approx(opt, rel=1e-5)
        u, v = whitened_low_rank(w, stats[layer.name], base.num_components)
        torch.testing.assert_close(lr.get_submodule(layer.name).to_dense(), u @ v.t())
    assert "output error" in str(report) and "output error" in str(low)
    x = torch.randn(5, 6)
    assert g(x).shape == model(x).shape == lr(x).shape


def test_missing_statistics_and_misuse_raise():
    model = mlp()
    stats = collect_input_stats(model, batches(), layers=["0"])
    for convert in (lambda m: gsmify(m, 0.5, calibration=stats),
                    lambda m: baselinify(m, "lowrank", 0.5, calibration=stats),
                    lambda m: baselinify(m, "monarch", 0.5, calibration=stats)):
        m = copy.deepcopy(model)
        with pytest.raises(ValueError, match=r"no input statistics for the converted layer\(s\) 3"):
            convert(m)
        assert isinstance(m[0], nn.Linear)  # nothing converted before the check
    full = collect_input_stats(model, batches())
    with pytest.raises(ValueError, match="init='pretrained'"):
        gsmify(copy.deepcopy(model), 0.5, init="random", calibration=full)
    with pytest.raises(ValueError, match="init='pretrained'"):
        baselinify(copy.deepcopy(model), "lowrank", 0.5, init="random", calibration=full)
    with pytest.raises(ValueError, match="allocation='global'"):
        baselinify(copy.deepcopy(model), "monarch", 0.5, allocation="global")
    with pytest.raises(ValueError, match="unknown allocation"):
        baselinify(copy.deepcopy(model), "lowrank", 0.5, allocation="greedy")


def test_calibrated_monarch_is_optimal_for_block_uncorrelated_inputs():
    """With inputs uncorrelated across Monarch input blocks (H block diagonal) the block-diagonal approximation is
    exact: no Monarch matrix found by gradient descent from the plain projection does better."""
    torch.manual_seed(0)
    n, nb = 16, 4
    w = torch.randn(n, n)
    x = torch.cat([inputs_with_covariance(80, 4, seed=i) for i in range(nb)], 1)  # independent blocks of 4 inputs
    x = x - x.mean(0)
    h = x.double().t() @ x.double()
    mask = torch.block_diag(*[torch.ones(4, 4, dtype=torch.bool)] * nb)
    st = InputStats(h * mask, x.shape[0])  # exactly block diagonal
    lin = _linear(w)
    cal = MonarchLinear.from_linear(lin, nb, input_factor=st)
    plain = MonarchLinear.from_linear(lin, nb)
    e_cal = relative_output_error(w, cal.to_dense(), st)
    e_plain = relative_output_error(w, plain.to_dense(), st)
    assert e_cal < e_plain
    s = st.whitening().float()
    ws = w @ s
    opt = torch.optim.Adam(plain.parameters(), lr=1e-2)
    for _ in range(400):
        opt.zero_grad()
        ((plain.to_dense() @ s - ws).pow(2).sum()).backward()
        opt.step()
    assert e_cal <= relative_output_error(w, plain.to_dense().detach(), st) + 1e-4


def test_calibrated_blocksparse_values_are_the_least_squares_solution():
    """Oracle: for each row, lstsq of that row's outputs on the inputs of its kept columns (from the tokens)."""
    torch.manual_seed(0)
    lin = _linear(torch.randn(8, 12)).double()
    w = lin.weight.detach()
    x = inputs_with_covariance(100, 12).double()
    st = stats_of(x)
    layer = BlockSparseLinear.from_linear(lin, 4, density=0.5, input_factor=st)
    got = layer.to_dense().detach()
    y = x @ w.t()
    for row in range(8):
        support = got[row] != 0
        sol = torch.linalg.lstsq(x[:, support], y[:, row : row + 1]).solution.flatten()
        torch.testing.assert_close(got[row, support], sol, rtol=1e-6, atol=1e-8)
        assert int(support.sum()) == int(layer.block_mask[row // 4].sum()) * 4
    plain = BlockSparseLinear.from_linear(lin, 4, block_mask=layer.block_mask.clone())
    assert relative_output_error(w, got, st) < relative_output_error(w, plain.to_dense().detach(), st)


# ------------------------------------------------------------------------------------------------ global allocation
def test_allocate_ranks_greedy_matches_brute_force_on_equal_cost_layers():
    """Equal shapes, so equal cost per component: the greedy is the exact optimum of total restored energy, which a
    brute force over all rank combinations finds independently."""
    torch.manual_seed(0)
    weights = {f"l{i}": torch.randn(6, 6) * (i + 1) for i in range(3)}
    stats = {n: stats_of(inputs_with_covariance(40, 6, seed=i)) for i, n in enumerate(weights)}
    budget = 0.5  # 0.5 * 108 = 54 multiply-adds = 4 components of cost 12 (rank <= 3 per layer)
    ranks = allocate_ranks_greedy(weights, stats, budget)
    energy = {n: torch.linalg.svdvals(weights[n].double() @ stats[n].whitening()).pow(2) for n in weights}
    best, best_ranks = -1.0, None
    for combo in itertools.product(range(1, 4), repeat=3):
        if sum(combo) * 12 <= 54:
            value = sum(float(energy[n][:r].sum()) for n, r in zip(weights, combo))
            if value > best:
                best, best_ranks = value, dict(zip(weights, combo))
    assert ranks == best_ranks
    assert sum(ranks.values()) * 12 <= 54
    model = nn.Sequential(*[_linear(w) for w in weights.values()])
    report = baselinify(model, "lowrank", budget, calibration={str(i): stats[n] for i, n in enumerate(weights)},
                        allocation="global")
    assert report.allocation == "global"
    assert list(report.ranks.values()) == list(ranks.values())
    assert report.flops <= budget * report.dense_flops
    assert set(report.ratios) == {"0", "1", "2"}


def test_allocate_ranks_greedy_plain_and_errors():
    weights = {"a": torch.diag(torch.tensor([10.0, 9, 8, 1, 1, 1])), "b": torch.diag(torch.tensor([2.0, 1, 1, 1, 1, 1]))}
    ranks = allocate_ranks_greedy(weights, None, 2 / 3)  # plain singular values: 48 = 4 components of cost 12
    assert ranks == {"a": 3, "b": 1}
    assert allocate_ranks_greedy(weights, None, 0.5) == {"a": 2, "b": 1}
    with pytest.raises(ValueError, match="rank 1"):
        allocate_ranks_greedy(weights, None, 0.05)
    with pytest.raises(ValueError, match="no input statistics for layer 'b'"):
        allocate_ranks_greedy(weights, {"a": torch.ones(6)}, 0.5)


# ------------------------------------------------------------------------------------------------------------ DDP
def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = mlp()
        shard = batches(5)[:3] if rank == 0 else batches(5)[3:]  # uneven shards: 3 and 2 batches
        stats = collect_input_stats(model, shard)
        torch.save({n: (s.h, s.count) for n, s in stats.items()}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_statistics_equal_one_process_on_the_union(tmp_path):
    # fork (as DataLoader workers do; one thread in the children): no re-import, so the test stays fast
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                                          start_method="fork")
    single = collect_input_stats(mlp(), batches(5))
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, st in single.items():
            h, count = got[name]
            assert count == st.count == 5 * 12
            torch.testing.assert_close(h, st.h, rtol=1e-12, atol=1e-12)


def test_hf_gpt2_conv1d_statistics_and_calibrated_conversion():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2Model(cfg).eval()
    xs = [{"input_ids": torch.randint(0, 50, (2, 12))} for _ in range(3)]
    seen: list[torch.Tensor] = []
    handle = model.h[0].mlp.c_fc.register_forward_hook(lambda m, args, out: seen.append(args[0].reshape(-1, 16).double()))
    stats = collect_input_stats(model, xs, layers="re:.*(c_attn|c_fc)")
    handle.remove()
    assert set(stats) == {"h.0.attn.c_attn", "h.0.mlp.c_fc"}
    x = torch.cat(seen)
    assert stats["h.0.mlp.c_fc"].count == 72 == x.shape[0]
    torch.testing.assert_close(stats["h.0.mlp.c_fc"].h, x.t() @ x, rtol=1e-10, atol=1e-10)
    weights = {n: model.get_submodule(n).weight.detach().t() for n in stats}  # Conv1D stores (in, out)
    low = baselinify(copy.deepcopy(model), "lowrank", 0.5, include="re:.*(c_attn|c_fc)", calibration=stats)
    g = copy.deepcopy(model)
    report = gsmify(g, 0.5, include="re:.*(c_attn|c_fc)", calibration=stats, fit_steps=5)
    for base, layer in zip(low.layers, report.layers):
        w = weights[layer.name]
        opt = optimal_low_rank_error(w, stats[layer.name], base.num_components)
        assert base.output_error == pytest.approx(opt, rel=1e-5)
        assert layer.output_error <= opt + 1e-5
    assert g(**xs[0]).last_hidden_state.shape == (2, 12, 16)


class _SharedInputs(nn.Module):
    """q, k and v read one tensor (as in attention); ``mutate`` changes that tensor in place between k and v."""

    def __init__(self, mutate: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(6, 5)
        self.mutate = mutate

    def forward(self, x):
        h = x * 1.0
        out = self.q(h).sum() + self.k(h).sum()
        if self.mutate:
            h.mul_(2.0)
        return out + self.v(h).sum()


@pytest.mark.parametrize("diagonal", [False, True])
def test_layers_fed_one_tensor_share_the_product_and_still_get_their_own_statistics(diagonal):
    torch.manual_seed(0)
    batches = [torch.randn(3, 7, 6), torch.randn(2, 6)]
    xs = torch.cat([b.reshape(-1, 6) for b in batches]).double()
    gram = xs.pow(2).sum(0) if diagonal else xs.t() @ xs
    stats = collect_input_stats(_SharedInputs(), batches, diagonal=diagonal)
    for name in ("q", "k", "v"):
        torch.testing.assert_close(stats[name].h, gram)
        assert stats[name].count == 23
    # an in-place change between two layers is a new input: v sees 2x, so 4x the product
    stats = collect_input_stats(_SharedInputs(mutate=True), batches, diagonal=diagonal)
    torch.testing.assert_close(stats["k"].h, gram)
    torch.testing.assert_close(stats["v"].h, 4 * gram)


# ------------------------------------------------------------------------------------------------ padding
class Pooled(nn.Module):
    """A per-token linear, a masked mean, a head on the pooled vector: dict batches with an attention mask."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, batch):
        h = self.tok(batch["x"])
        m = batch["attention_mask"].unsqueeze(-1).float()
        return self.head((h * m).sum(1) / m.sum(1))


def padded_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    out = []
    for lengths in ([5, 2, 3], [1, 4, 4]):
        mask = torch.zeros(3, 5, dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        out.append({"x": torch.randn(3, 5, 6, generator=g) * 3 * (1 - mask.unsqueeze(-1)) + torch.randn(3, 5, 6, generator=g),
                    "attention_mask": mask})
    return out


def test_padding_is_left_out_of_the_statistics_unless_asked():
    from gsm_lightning.core.calibration import padding_mask

    model = Pooled()
    data = padded_batches()
    fwd = lambda m, b: m(b)  # noqa: E731
    masked = collect_input_stats(model, data, forward=fwd)
    everything = collect_input_stats(model, data, forward=fwd, token_mask=None)
    real = torch.cat([b["x"][b["attention_mask"].bool()] for b in data]).double()
    every = torch.cat([b["x"].reshape(-1, 6) for b in data]).double()
    assert masked["tok"].count == 5 + 2 + 3 + 1 + 4 + 4 and everything["tok"].count == 30
    torch.testing.assert_close(masked["tok"].h, real.t() @ real)
    torch.testing.assert_close(everything["tok"].h, every.t() @ every)
    # the head's input is (batch, features): the (batch, seq) mask does not apply, every row counts
    assert masked["head"].count == everything["head"].count == 6
    assert padding_mask((data[0], torch.zeros(3))) is data[0]["attention_mask"]
    assert padding_mask(torch.zeros(3)) is None and padding_mask({"x": torch.zeros(3)}) is None


@pytest.mark.parametrize("mask_padding", [True, False])
def test_module_calibration_masks_padding_by_default(mask_padding):
    from gsm_lightning.core.conversion_spec import Calibration, Conversion
    from gsm_lightning.training.module import GSMModule

    from .helpers import adamw

    data = [(b, torch.zeros(3, dtype=torch.long)) for b in padded_batches()]
    conv = Conversion(method="lowrank", include=["tok"], init="pretrained",
                      calibration=Calibration(batches=2, mask_padding=mask_padding))
    m = GSMModule(Pooled(), num_classes=3, budget=0.4, conversion=conv, phase1_epochs=1, optimizer=adamw())
    m.convert(data)
    ref = Pooled()
    stats = collect_input_stats(ref, [b for b, _ in data], layers=["tok"], forward=lambda mod, b: mod(b),
                                token_mask=None if not mask_padding else (lambda b: b["attention_mask"]))
    baselinify(ref, "lowrank", 0.4, include=["tok"], init="pretrained", calibration=stats)
    torch.testing.assert_close(m.backbone.tok.to_dense(), ref.tok.to_dense())
