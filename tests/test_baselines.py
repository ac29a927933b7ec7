"""Tests of the baseline structured layers (low-rank, Monarch, block-sparse) and baselinify."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gsm_lightning.core.baselines import (
    BaselineReport,
    BlockSparseLinear,
    LowRankLinear,
    MonarchLinear,
    baselinify,
    blocks_for_budget,
    nblocks_for_budget,
    rank_for_budget,
)
from gsm_lightning.core.conversion import GSMReport

torch.manual_seed(0)


def _check_forward(layer: nn.Module, batch_shape=(3, 5)) -> None:
    x = torch.randn(*batch_shape, layer.in_features)
    y = layer(x)
    assert y.shape == (*batch_shape, layer.out_features)
    ref = F.linear(x, layer.to_dense(), layer.bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------- low rank
def test_rank_for_budget():
    assert rank_for_budget(384, 384, 0.5) == 96  # 96 * 768 = 0.5 * 384^2
    assert rank_for_budget(384, 1536, 0.3) == int(0.3 * 384 * 1536 / 1920)
    assert rank_for_budget(10, 1000, 1.0) == 9  # r * 1010 <= 10000
    assert rank_for_budget(4, 4, 1.0) == 2
    with pytest.raises(ValueError, match="too small for a rank-1"):
        rank_for_budget(1, 1000, 1.0)
    with pytest.raises(ValueError, match="too small for a rank-1"):
        rank_for_budget(100, 100, 0.01)
    for bad in (0, -0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="budget"):
            rank_for_budget(8, 8, bad)


def test_rank_for_budget_is_largest():
    for in_f, out_f, budget in [(384, 384, 0.3), (384, 1536, 0.5), (17, 33, 0.7), (100, 7, 1.0)]:
        r = rank_for_budget(in_f, out_f, budget)
        assert r * (in_f + out_f) <= budget * in_f * out_f
        assert r == min(in_f, out_f) or (r + 1) * (in_f + out_f) > budget * in_f * out_f


def test_lowrank_forward_and_structure():
    layer = LowRankLinear(12, 20, rank=3)
    _check_forward(layer)
    torch.testing.assert_close(layer.to_dense(), layer.weight_out @ layer.weight_in)
    assert torch.linalg.matrix_rank(layer.to_dense().detach()) == 3
    assert layer.flops() == 3 * (12 + 20)
    assert layer.dense_flops() == 240
    assert layer.params() == sum(p.numel() for p in layer.parameters())
    nobias = LowRankLinear(12, 20, rank=3, bias=False)
    assert nobias.bias is None and nobias.params() == sum(p.numel() for p in nobias.parameters())
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(12, 20, rank=13)
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(12, 20, rank=0)
    with pytest.raises(ValueError, match="last dimension 12"):
        layer(torch.randn(2, 11))


def test_lowrank_from_linear_is_truncated_svd():
    lin = nn.Linear(30, 20)
    for rank in (1, 5, 20):
        layer = LowRankLinear.from_linear(lin, rank)
        s = torch.linalg.svdvals(lin.weight.detach())
        err = (layer.to_dense() - lin.weight).norm() ** 2
        torch.testing.assert_close(err, s[rank:].pow(2).sum(), rtol=1e-4, atol=1e-6)  # Eckart-Young
        torch.testing.assert_close(layer.bias, lin.bias)
    x = torch.randn(4, 30)
    torch.testing.assert_close(LowRankLinear.from_linear(lin, 20)(x), lin(x), rtol=1e-4, atol=1e-5)


def test_lowrank_gradients_flow():
    layer = LowRankLinear(8, 6, 2)
    layer(torch.randn(4, 8)).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


# ---------------------------------------------------------------------------------------------------------- monarch
def _grid_transpose(rows: int, cols: int) -> torch.Tensor:
    """Permutation matrix P with (P v) = v viewed (rows, cols), transposed, flattened."""
    eye = torch.eye(rows * cols)
    return eye.view(rows, cols, rows * cols).transpose(0, 1).reshape(rows * cols, rows * cols)


def _monarch_reference(layer: MonarchLinear) -> torch.Tensor:
    """P_out L P_mid R built from explicit block-diagonal and permutation matrices."""
    b = layer.nblocks
    r_full = torch.block_diag(*[blk for blk in layer.blocks_in.detach()])
    l_full = torch.block_diag(*[blk for blk in layer.blocks_out.detach()])
    w = _grid_transpose(b, layer.s) @ l_full @ _grid_transpose(b, layer.q) @ r_full
    return w[: layer.out_features, : layer.in_features]


@pytest.mark.parametrize("in_f,out_f,nb", [(16, 16, 4), (9, 9, 3), (12, 20, 4), (20, 12, 4), (10, 7, 3), (8, 32, 2), (5, 5, 1), (6, 4, 6)])
def test_monarch_forward_and_structural_definition(in_f, out_f, nb):
    layer = MonarchLinear(in_f, out_f, nb)
    _check_forward(layer)
    torch.testing.assert_close(layer.to_dense().detach(), _monarch_reference(layer), rtol=1e-5, atol=1e-6)
    p, q, s = layer.p, layer.q, layer.s
    assert (p, s) == (-(-in_f // nb), -(-out_f // nb)) and q == min(p, s)
    assert layer.flops() == nb * q * (p + s) == sum(x.numel() for x in (layer.blocks_in, layer.blocks_out))


def test_monarch_square_is_paper_definition():
    """For n = m^2 with m blocks of m x m: W = P L P^T R with P the (m, m) grid transpose."""
    m = 4
    layer = MonarchLinear(m * m, m * m, m)
    P = _grid_transpose(m, m)
    torch.testing.assert_close(P, P.t())
    L = torch.block_diag(*layer.blocks_out.detach())
    R = torch.block_diag(*layer.blocks_in.detach())
    torch.testing.assert_close(layer.to_dense().detach(), P @ L @ P.t() @ R, rtol=1e-5, atol=1e-6)
    assert layer.flops() == 2 * m**3


@pytest.mark.parametrize("in_f,out_f,nb", [(16, 16, 4), (12, 24, 4), (24, 12, 4), (16, 16, 2), (18, 12, 6), (10, 7, 3)])
def test_monarch_from_linear_recovers_monarch(in_f, out_f, nb):
    src = MonarchLinear(in_f, out_f, nb)
    proj = MonarchLinear.from_linear(src.to_linear(), nb)
    torch.testing.assert_close(proj.to_dense(), src.to_dense(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(proj.bias, src.bias)


def test_monarch_projection_is_optimal():
    """The projection of a dense matrix beats any other Monarch matrix, and small perturbations of it."""
    torch.manual_seed(1)
    lin = nn.Linear(16, 16)
    proj = MonarchLinear.from_linear(lin, 4)
    w = lin.weight.detach()
    err = (proj.to_dense() - w).norm().item()
    assert err < w.norm().item()
    for _ in range(5):
        other = MonarchLinear(16, 16, 4)
        assert (other.to_dense() - w).norm().item() > err
        with torch.no_grad():
            pert = MonarchLinear(16, 16, 4)
            pert.load_state_dict(proj.state_dict())
            pert.blocks_in.add_(1e-3 * torch.randn_like(pert.blocks_in))
            pert.blocks_out.add_(1e-3 * torch.randn_like(pert.blocks_out))
        assert (pert.to_dense() - w).norm().item() >= err - 1e-6
    # square b^2 Monarch: every (c, i) sub-block is rank 1, projection = per-block best rank-1 approximation
    sub = w.view(4, 4, 4, 4).permute(1, 2, 0, 3)  # rows j*4 + c, cols i*4 + u -> (c, i, j, u)
    s = torch.linalg.svdvals(sub)
    torch.testing.assert_close(torch.tensor(err**2), s[..., 1:].pow(2).sum(), rtol=1e-4, atol=1e-6)


def test_nblocks_for_budget():
    assert nblocks_for_budget(384, 384, 1.0) == 2  # 2 n^2 / b
    assert nblocks_for_budget(384, 384, 0.5) == 4
    assert nblocks_for_budget(384, 1536, 0.5) == 3  # 1.25 / b
    for in_f, out_f, budget in [(384, 384, 0.3), (384, 1536, 0.3), (1536, 384, 0.1), (100, 70, 0.4)]:
        nb = nblocks_for_budget(in_f, out_f, budget)
        assert MonarchLinear(in_f, out_f, nb).flops() <= budget * in_f * out_f
        if nb > 1:
            assert MonarchLinear(in_f, out_f, nb - 1).flops() > budget * in_f * out_f
    with pytest.raises(ValueError, match="too small for any Monarch"):
        nblocks_for_budget(4, 4, 0.1)
    with pytest.raises(ValueError, match="budget"):
        nblocks_for_budget(4, 4, 0.0)
    with pytest.raises(ValueError, match="nblocks"):
        MonarchLinear(4, 4, 5)


# ----------------------------------------------------------------------------------------------------- block sparse
@pytest.mark.parametrize("mode", ["bmm", "dense", "auto"])
@pytest.mark.parametrize("in_f,out_f,bs,density", [(64, 96, 16, 0.3), (50, 70, 16, 0.5), (32, 32, 8, 1.0), (32, 32, 8, 0.05)])
def test_blocksparse_forward(mode, in_f, out_f, bs, density):
    layer = BlockSparseLinear(in_f, out_f, bs, density=density, forward_mode=mode)
    _check_forward(layer)
    assert layer.flops() == layer.nnz_blocks * bs * bs
    assert layer.params() == sum(p.numel() for p in layer.parameters())


def test_blocksparse_structural_definition_and_grads():
    mask = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.bool)
    layer = BlockSparseLinear(12, 8, 4, block_mask=mask, forward_mode="bmm")
    ref = torch.zeros(8, 12)
    for k, (r, c) in enumerate(mask.nonzero().tolist()):
        ref[4 * r:4 * r + 4, 4 * c:4 * c + 4] = layer.blocks[k].detach()
    torch.testing.assert_close(layer.to_dense().detach(), ref)
    x = torch.randn(5, 12)
    for mode in ("bmm", "dense"):
        layer.forward_mode = mode
        layer.zero_grad()
        layer(x).pow(2).sum().backward()
        if mode == "bmm":
            g_bmm = layer.blocks.grad.clone()
    torch.testing.assert_close(layer.blocks.grad, g_bmm, rtol=1e-5, atol=1e-5)


def test_blocksparse_patterns():
    diag = BlockSparseLinear(32, 32, 8, density=0.25).block_mask
    torch.testing.assert_close(diag, torch.eye(4, dtype=torch.bool))
    two = BlockSparseLinear(32, 32, 8, density=0.5).block_mask
    torch.testing.assert_close(two, torch.eye(4, dtype=torch.bool) | torch.eye(4, dtype=torch.bool).roll(1, 1))
    r1 = BlockSparseLinear(64, 64, 8, density=0.3, pattern="random", seed=3).block_mask
    r2 = BlockSparseLinear(64, 64, 8, density=0.3, pattern="random", seed=3).block_mask
    assert torch.equal(r1, r2) and int(r1.sum()) == int(0.3 * 64)
    with pytest.raises(ValueError, match="exactly one"):
        BlockSparseLinear(32, 32, 8)
    with pytest.raises(ValueError, match="exactly one"):
        BlockSparseLinear(32, 32, 8, density=0.5, block_mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="grid shape"):
        BlockSparseLinear(32, 32, 8, block_mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="no nonzero"):
        BlockSparseLinear(32, 32, 8, block_mask=torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="pattern"):
        BlockSparseLinear(32, 32, 8, density=0.5, pattern="magic")
    with pytest.raises(ValueError, match="density"):
        BlockSparseLinear(32, 32, 8, density=1.5)


def test_blocksparse_from_linear_keeps_largest_blocks():
    lin = nn.Linear(24, 16)
    with torch.no_grad():
        lin.weight.mul_(0.01)
        lin.weight[8:16, 0:8] = 5.0  # block (1, 0)
        lin.weight[0:8, 16:24] = -3.0  # block (0, 2)
    layer = BlockSparseLinear.from_linear(lin, 8, density=2 / 6)
    assert layer.block_mask.tolist() == [[False, False, True], [True, False, False]]
    expected = lin.weight.detach() * torch.kron(layer.block_mask.float(), torch.ones(8, 8))
    torch.testing.assert_close(layer.to_dense(), expected)  # exact restriction (projection) of the weight
    full = BlockSparseLinear.from_linear(lin, 8, density=1.0)
    x = torch.randn(3, 24)
    torch.testing.assert_close(full(x), lin(x), rtol=1e-5, atol=1e-5)
    diag = BlockSparseLinear.from_linear(lin, 8, density=2 / 6, pattern="diagonal")
    assert int(diag.block_mask.sum()) == 2


def test_blocks_for_budget():
    assert blocks_for_budget(384, 384, 32, 0.5) == 72  # half of the 12 x 12 grid
    assert blocks_for_budget(40, 40, 16, 1.0) == 6  # 6 * 256 <= 1600 < 7 * 256 (padded 3 x 3 grid)
    with pytest.raises(ValueError, match="too small for one 32x32 block"):
        blocks_for_budget(64, 64, 32, 0.2)


# ------------------------------------------------------------------------------------------------------- baselinify
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({"fc1": nn.Linear(64, 128), "fc2": nn.Linear(128, 64)}) for _ in range(2)])
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = x + blk["fc2"](torch.relu(blk["fc1"](x)))
        return self.head(x)


@pytest.mark.parametrize("method,cls", [("lowrank", LowRankLinear), ("monarch", MonarchLinear), ("blocksparse", BlockSparseLinear)])
@pytest.mark.parametrize("budget", [1.0, 0.5, 0.3])
def test_baselinify_budget_and_report(method, cls, budget):
    net = _Net()
    ref = _Net()
    ref.load_state_dict(net.state_dict())
    kwargs = {"block_size": 16} if method == "blocksparse" else {}
    report = baselinify(net, method, budget, include="blocks.*", **kwargs)
    assert isinstance(report, BaselineReport) and isinstance(report, GSMReport)
    assert report.method == method and len(report) == 4
    assert report.names == ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"]
    assert isinstance(net.head, nn.Linear)
    for layer in report.layers:
        module = net.get_submodule(layer.name)
        assert isinstance(module, cls)
        assert layer.flops == module.flops() <= budget * layer.dense_flops
        assert 0 <= layer.fit_error < 1
        w = ref.get_submodule(layer.name).weight.detach()
        err = float((module.to_dense().detach() - w).pow(2).sum() / w.pow(2).sum())
        assert layer.fit_error == pytest.approx(err, rel=1e-4, abs=1e-7)
    assert report.flops_ratio <= budget
    assert net(torch.randn(2, 64)).shape == (2, 10)
    assert method in str(report)


def _copy(net: nn.Module) -> nn.Module:
    m = _Net()
    m.load_state_dict(net.state_dict())
    return m


def test_baselinify_error_decreases_with_budget_and_random_init():
    torch.manual_seed(0)
    net = _Net()
    for method in ("lowrank", "monarch", "blocksparse"):
        kw = {"block_size": 16} if method == "blocksparse" else {}
        errs = [sum(layer.fit_error for layer in baselinify(_copy(net), method, b, include="blocks.*", **kw).layers)
                for b in (1.0, 0.5, 0.25)]
        assert errs[0] < errs[1] < errs[2], (method, errs)
    rnd = _copy(net)
    report = baselinify(rnd, "monarch", 0.5, init="random")
    assert report.init == "random" and all(layer.fit_error is None for layer in report.layers)
    assert isinstance(rnd.blocks[0]["fc1"], MonarchLinear)
    assert not torch.allclose(rnd.blocks[0]["fc1"].to_dense(), MonarchLinear.from_linear(net.blocks[0]["fc1"], 4).to_dense())


def _gblr_law_draw(in_f: int, out_f: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GBLRLinear.reset_parameters' draw, written out independently: trunc-normal weight at 1/sqrt(in), cut at 2 std,
    then the bias uniform in +-1/sqrt(in)."""
    torch.manual_seed(seed)
    std = in_f ** -0.5
    w = torch.nn.init.trunc_normal_(torch.empty(out_f, in_f), std=std, a=-2 * std, b=2 * std)
    b = torch.empty(out_f).uniform_(-in_f ** -0.5, in_f ** -0.5)
    return w, b


def test_random_init_is_the_projection_of_gblrs_draw():
    """Equal init: a baseline's init='random' is its structure's projection of the dense matrix GBLR draws."""
    from gsm_lightning.core.conversion import gsmify

    w, b = _gblr_law_draw(48, 40, seed=3)
    # GBLR at full width from the same seed is that very matrix (K r >= min(in, out): all singular components)
    g = nn.Sequential(nn.Linear(48, 40))
    torch.manual_seed(3)
    gsmify(g, budget=1.0, init="random", init_std="fan_in", location_init="uniform", width_init="full")
    torch.testing.assert_close(g[0].to_dense(), w, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g[0].bias.detach(), b)
    for method, cls in (("lowrank", LowRankLinear), ("monarch", MonarchLinear)):
        net = nn.Sequential(nn.Linear(48, 40))
        torch.manual_seed(3)
        report = baselinify(net, method, 0.3, init="random")
        expect = cls.from_linear(_linear_with(w, b), report.layers[0].num_components)  # truncated / per-block SVD
        torch.testing.assert_close(net[0].to_dense(), expect.to_dense(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(net[0].bias.detach(), b)
        assert report.init == "random" and report.layers[0].fit_error is None
    u, s, vh = torch.linalg.svd(w)
    r = rank_for_budget(48, 40, 0.3)
    net = nn.Sequential(nn.Linear(48, 40))
    torch.manual_seed(3)
    baselinify(net, "lowrank", 0.3, init="random")
    torch.testing.assert_close(net[0].to_dense(), (u[:, :r] * s[:r]) @ vh[:r], rtol=1e-4, atol=1e-5)
    net = nn.Sequential(nn.Linear(48, 40))
    torch.manual_seed(3)
    baselinify(net, "blocksparse", 0.5, init="random", block_size=8)
    keep = net[0].to_dense() != 0
    assert keep.any() and torch.equal(net[0].to_dense()[keep], w[keep])  # the draw restricted to the diagonal blocks
    # init_std scales the draw
    a, c = nn.Sequential(nn.Linear(48, 40)), nn.Sequential(nn.Linear(48, 40))
    torch.manual_seed(5)
    baselinify(a, "lowrank", 0.3, init="random", init_std=0.02)
    torch.manual_seed(5)
    baselinify(c, "lowrank", 0.3, init="random", init_std=0.04)
    torch.testing.assert_close(2 * a[0].to_dense(), c[0].to_dense(), rtol=1e-4, atol=1e-6)


def _linear_with(w: torch.Tensor, b: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return lin


def test_per_factor_init_is_the_old_independent_init():
    """init='per_factor' keeps the pre-equal-init start: each factor like its own nn.Linear (smaller outputs)."""
    net = nn.Sequential(nn.Linear(64, 96))
    torch.manual_seed(11)
    baselinify(net, "lowrank", 0.3, init="per_factor")
    torch.manual_seed(11)
    old = LowRankLinear(64, 96, rank_for_budget(64, 96, 0.3))
    torch.testing.assert_close(net[0].to_dense(), old.to_dense())
    fair = nn.Sequential(nn.Linear(64, 96))
    baselinify(fair, "lowrank", 0.3, init="random")
    x = torch.randn(256, 64)
    assert net[0](x).std() < 0.75 * fair[0](x).std()


def test_baselinify_errors():
    net = _Net()
    with pytest.raises(ValueError, match="unknown baseline method 'butterfly'"):
        baselinify(net, "butterfly", 0.5)
    for bad in (0, 1.5, -1, "half"):
        with pytest.raises(ValueError, match="budget"):
            baselinify(net, "lowrank", bad)
    with pytest.raises(ValueError, match="unknown init"):
        baselinify(net, "lowrank", 0.5, init="zeros")
    with pytest.raises(ValueError, match="matches no linear layer"):
        baselinify(net, "lowrank", 0.5, include="nothing.*")
    with pytest.raises(ValueError, match="too small for a rank-1"):
        baselinify(net, "lowrank", 0.01)
    with pytest.raises(ValueError, match="unexpected options"):
        baselinify(net, "lowrank", 0.5, block_size=8)
    with pytest.raises(ValueError, match="magnitude"):
        baselinify(net, "blocksparse", 0.5, init="random", pattern="magnitude")
    with pytest.raises(ValueError, match="magnitude"):
        baselinify(net, "blocksparse", 0.5, init="per_factor", pattern="magnitude")
    with pytest.raises(ValueError, match="init_std sets the random dense matrix"):
        baselinify(net, "lowrank", 0.5, init="pretrained", init_std=0.02)
    with pytest.raises(ValueError, match="init_std must be"):
        baselinify(net, "lowrank", 0.5, init="random", init_std=-1.0)
    assert all(isinstance(m, nn.Linear) for m in (net.head, net.blocks[0]["fc1"]))  # nothing swapped on error


def test_baselinify_conv1d():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(48, 16)  # 16 inputs -> 48 outputs, weight stored (16, 48)
    nn.init.normal_(conv.bias)
    x = torch.randn(3, 16)
    full = LowRankLinear.from_linear(conv, 16)  # full rank: lossless
    assert (full.in_features, full.out_features) == (16, 48)
    torch.testing.assert_close(full(x), conv(x), rtol=1e-4, atol=1e-5)
    for method in ("monarch", "blocksparse"):
        kw = {"block_size": 8} if method == "blocksparse" else {}
        model = nn.Sequential(Conv1D(48, 16))
        model[0].load_state_dict(conv.state_dict())
        report = baselinify(model, method, 1.0, **kw)
        layer = report.layers[0]
        assert (layer.kind, layer.in_features, layer.out_features) == ("Conv1D", 16, 48)
        assert model(x).shape == (3, 48)
        w = conv.weight.detach().t()
        assert layer.fit_error == pytest.approx(float((model[0].to_dense().detach() - w).pow(2).sum() / w.pow(2).sum()), rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("layer", [LowRankLinear(12, 20, 4), MonarchLinear(12, 20, 4), BlockSparseLinear(12, 20, 4, density=0.4)],
                         ids=["lowrank", "monarch", "blocksparse"])
def test_to_linear_and_state_dict_roundtrip(layer):
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer.to_linear()(x), layer(x), rtol=1e-5, atol=1e-5)
    args = (4, 0.4) if isinstance(layer, BlockSparseLinear) else (4,)
    clone = type(layer)(12, 20, *args)
    clone.load_state_dict(layer.state_dict())
    torch.testing.assert_close(clone(x), layer(x))
    assert layer.params() == sum(p.numel() for p in layer.parameters())
