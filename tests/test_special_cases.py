"""Classic structured matrices are special cases of GBLR: the constructors reproduce them exactly."""

from __future__ import annotations

import pytest
import torch

from gsm_lightning import GBLRLinear


def check_layer_is(layer: GBLRLinear, dense: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """layer.to_dense() == dense and the forward is x @ dense^T + bias, before and after freezing."""
    atol = 1e-5 * max(1.0, float(dense.abs().max()))
    torch.testing.assert_close(layer.to_dense().detach(), dense, atol=atol, rtol=1e-5)
    x = torch.randn(3, 2, dense.shape[1], dtype=dense.dtype)
    expected = x @ dense.t() + (bias if bias is not None else 0)
    torch.testing.assert_close(layer(x).detach(), expected, atol=10 * atol, rtol=1e-5)
    flops = layer.flops()
    frozen = layer.freeze_structure()  # hard boxcars: exact 0/1 masks
    assert frozen.flops() == flops
    tight = 1e-10 if dense.dtype == torch.float64 else atol
    torch.testing.assert_close(frozen.to_dense().detach(), dense, atol=tight * max(1.0, float(dense.abs().max())), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("out_f,in_f,rank", [(9, 6, 2), (6, 9, 3), (8, 8, 8), (5, 1, 1)])
def test_from_low_rank(out_f: int, in_f: int, rank: int, dtype: torch.dtype) -> None:
    u, v = torch.randn(out_f, rank, dtype=dtype), torch.randn(rank, in_f, dtype=dtype)
    bias = torch.randn(out_f, dtype=dtype)
    layer = GBLRLinear.from_low_rank(u, v, bias=bias)
    assert layer.num_components == rank and layer.effective_rank() == rank
    assert layer.flops() == rank * (in_f + out_f)
    assert (layer.int_widths() == torch.tensor([[in_f], [out_f]])).all()
    check_layer_is(layer, u @ v, bias)
    with pytest.raises(ValueError, match="out x rank"):
        GBLRLinear.from_low_rank(u, torch.randn(rank + 1, in_f))


@pytest.mark.parametrize("in_f,out_f,rank", [(20, 12, 3), (12, 20, 1), (16, 16, 16)])
def test_low_rank_layer(in_f: int, out_f: int, rank: int) -> None:
    layer = GBLRLinear.low_rank(in_f, out_f, rank)
    assert layer.effective_rank() == rank == layer.num_components
    assert int(torch.linalg.matrix_rank(layer.to_dense().double(), rtol=1e-4)) == rank
    assert layer.flops() == rank * (in_f + out_f)
    for bad in (0, min(in_f, out_f) + 1):
        with pytest.raises(ValueError, match="rank"):
            GBLRLinear.low_rank(in_f, out_f, bad)


def test_from_block_diagonal_equal_blocks_and_flops() -> None:
    b, s = 4, 5
    blocks = [torch.randn(s, s, dtype=torch.float64) for _ in range(b)]
    layer = GBLRLinear.from_block_diagonal(blocks)
    assert (layer.in_features, layer.out_features) == (b * s, b * s)
    assert layer.bias is None
    assert layer.flops() == b * s * (s + s)  # s rank-1 components of widths (s, s) per block
    assert layer.effective_rank() == b * s
    check_layer_is(layer, torch.block_diag(*blocks))


def test_from_block_diagonal_rectangular_blocks_with_bias() -> None:
    blocks = [torch.randn(2, 3), torch.randn(4, 1), torch.randn(3, 3), torch.randn(1, 5)]
    bias = torch.randn(10)
    layer = GBLRLinear.from_block_diagonal(blocks, bias=bias)
    assert (layer.in_features, layer.out_features) == (12, 10)
    assert layer.flops() == sum(min(bo, bi) * (bo + bi) for bo, bi in (blk.shape for blk in blocks))
    check_layer_is(layer, torch.block_diag(*blocks), bias)


def test_from_block_sparse() -> None:
    dense = torch.randn(12, 18, dtype=torch.float64)
    bo, bi = 3, 6
    block_mask = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 0]], dtype=torch.bool)
    layer = GBLRLinear.from_block_sparse(dense, (bo, bi), block_mask)
    expected = dense * torch.kron(block_mask.double(), torch.ones(bo, bi, dtype=torch.float64))
    nnz_blocks = int(block_mask.sum())
    assert layer.num_components == nnz_blocks * min(bo, bi)
    assert layer.flops() == nnz_blocks * min(bo, bi) * (bo + bi)
    check_layer_is(layer, expected)
    # an empty pattern is the zero matrix
    empty = GBLRLinear.from_block_sparse(dense, (bo, bi), torch.zeros(4, 3, dtype=torch.bool))
    assert empty.num_components == 0 and empty.flops() == 0
    assert (empty.to_dense() == 0).all() and empty.to_dense().shape == (12, 18)


def test_from_block_low_rank_with_exact_low_rank_tiles() -> None:
    bo, bi, r, grid = 4, 5, 2, (3, 2)
    tiles = [[torch.randn(bo, r) @ torch.randn(r, bi) for _ in range(grid[1])] for _ in range(grid[0])]
    dense = torch.cat([torch.cat(row, 1) for row in tiles], 0)
    layer = GBLRLinear.from_block_low_rank(dense, (bo, bi), rank=r)
    n_tiles = grid[0] * grid[1]
    assert layer.num_components == n_tiles * r
    assert layer.flops() == n_tiles * r * (bo + bi)
    check_layer_is(layer, dense)
    # below the tile rank: each tile becomes its best rank-1 approximation
    trunc = GBLRLinear.from_block_low_rank(dense, (bo, bi), rank=1)
    expected = torch.zeros_like(dense)
    for i in range(grid[0]):
        for j in range(grid[1]):
            tile = dense[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi]
            uu, ss, vh = torch.linalg.svd(tile)
            expected[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi] = ss[0] * torch.outer(uu[:, 0], vh[0])
    torch.testing.assert_close(trunc.to_dense().detach(), expected, atol=1e-5, rtol=1e-5)
    assert (trunc.to_dense() - dense).abs().max() > 1e-2


def test_block_constructors_validate() -> None:
    dense = torch.randn(12, 18)
    with pytest.raises(ValueError, match="must divide"):
        GBLRLinear.from_block_low_rank(dense, (5, 6), rank=1)
    with pytest.raises(ValueError, match="block grid shape"):
        GBLRLinear.from_block_sparse(dense, (3, 6), torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not fit"):
        GBLRLinear.from_blocks(4, 4, [(0, 0, torch.randn(5, 2))])


def test_blocks_are_placed_cyclically() -> None:
    blk = torch.randn(2, 3)
    layer = GBLRLinear.from_blocks(6, 5, [(4, 5, blk)])  # wraps around both edges
    expected = torch.zeros(5, 6)
    for a in range(2):
        for b in range(3):
            expected[(4 + a) % 5, (5 + b) % 6] = blk[a, b]
    check_layer_is(layer, expected)


def monarch(b: int, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list, list]:
    """M = P L P^T R (Dao et al. 2022) with n = b*s: R = diag(R_0..R_{b-1}) (s x s blocks),
    L = diag(L_0..L_{s-1}) (b x b blocks), (P y)[a*s + c] = y[c*b + a]."""
    n = b * s
    rs = [torch.randn(s, s, dtype=torch.float64) for _ in range(b)]
    ls = [torch.randn(b, b, dtype=torch.float64) for _ in range(s)]
    big_r, big_l = torch.block_diag(*rs), torch.block_diag(*ls)
    perm = torch.zeros(n, n, dtype=torch.float64)
    for a in range(b):
        for c in range(s):
            perm[a * s + c, c * b + a] = 1.0
    return perm @ big_l @ perm.t() @ big_r, perm, big_l, big_r, ls, rs


@pytest.mark.parametrize("b,s", [(4, 3), (3, 4), (4, 4)])
def test_monarch_is_block_low_rank_after_a_row_permutation(b: int, s: int) -> None:
    m, perm, big_l, big_r, ls, rs = monarch(b, s)
    n = b * s
    # M[(a,c),(a',c')] = L_c[a,a'] R_{a'}[c,c']
    for a in range(b):
        for c in range(s):
            for a2 in range(b):
                for c2 in range(s):
                    assert m[a * s + c, a2 * s + c2] == pytest.approx(float(ls[c][a, a2] * rs[a2][c, c2]), abs=1e-12)
    # group rows by c: P^T M = L P^T R, whose (b x s) tiles (c, a') are rank-1 outer products
    mp = perm.t() @ m
    for c in range(s):
        for a2 in range(b):
            tile = mp[c * b:(c + 1) * b, a2 * s:(a2 + 1) * s]
            torch.testing.assert_close(tile, torch.outer(ls[c][:, a2], rs[a2][c]))
            sv = torch.linalg.svdvals(tile)
            assert sv[1:].max() < 1e-10 * sv[0]
    # without the permutation the same tiling is not rank-1 (the test would notice a wrong P)
    ranks = [int(torch.linalg.matrix_rank(m[i * b:(i + 1) * b, j * s:(j + 1) * s])) for i in range(s) for j in range(b)]
    assert max(ranks) > 1
    layer = GBLRLinear.from_block_low_rank(mp, (b, s), rank=1)
    assert layer.num_components == n
    # Monarch cost: R is b blocks of s x s, L is s blocks of b x b -> b s^2 + s b^2 = n (b + s)
    assert layer.flops() == b * s * s + s * b * b == n * (b + s)
    check_layer_is(layer, mp)
    x = torch.randn(5, n, dtype=torch.float64)
    torch.testing.assert_close(layer(x) @ perm.t(), x @ m.t())  # y = P (P^T M) x


def test_special_cases_are_trainable_gblr_layers() -> None:
    """Built layers are ordinary GBLR layers: structure gradients flow (the class is closed under steps)."""
    layer = GBLRLinear.from_block_diagonal([torch.randn(3, 3), torch.randn(3, 3)])
    assert not layer.is_frozen and layer.widths.requires_grad
    layer.train()
    layer(torch.randn(4, 6)).pow(2).sum().backward()
    assert torch.isfinite(layer.widths.grad).all() and layer.widths.grad.abs().sum() > 0
