"""Tile-aligned structures: the rounding rule, the aligned freeze of GBLRLinear, and what it buys CompactGBLR."""

from __future__ import annotations

import pytest
import torch

from gsm_lightning import GBLRLinear
from gsm_lightning.core.align import align_side, align_structure, side_alignment
from gsm_lightning.infer.inference import CompactGBLR, plan_side


def test_side_alignment_is_the_gcd_and_rejects_bad_values() -> None:
    assert side_alignment(384, 32) == 32
    assert side_alignment(96, 64) == 32
    assert side_alignment(49, 16) == 1
    for bad in (0, -8, 2.5, True):
        with pytest.raises(ValueError, match="align must be an integer >= 1"):
            side_alignment(64, bad)


@pytest.mark.parametrize("seed", range(5))
def test_align_side_keeps_total_width_and_every_component(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n, a = 384, 16
    w = torch.randint(a, n + 1, (40,), generator=g)
    w[:3] = torch.tensor([0, n, 23])
    s = torch.randint(0, n, (40,), generator=g)
    wa, sa = align_side(w, s, n, a)
    assert (wa % a == 0).all() and (sa % a == 0).all() and ((sa >= 0) & (sa < n)).all()
    assert wa[0] == 0 and wa[1] == n and ((wa > 0) == (w > 0)).all()
    assert int(wa.sum()) <= int(w.sum())  # no width >= one tile here, so the budget holds exactly
    assert ((wa - w).abs() < a).all()
    assert int(w.sum()) - int(wa.sum()) < a * 40  # the spare width was spent (largest remainders first)
    start_err = torch.remainder(sa - s + n // 2, n) - n // 2
    assert (start_err.abs() <= a // 2).all()


def test_align_side_rounds_the_largest_remainders_up_first() -> None:
    # widths 24 (rem 8), 28 (rem 12), 30 (rem 14) on tiles of 16: total 82 allows 16+16+16 + two round-ups = 80
    wa, _ = align_side(torch.tensor([24, 28, 30]), torch.zeros(3, dtype=torch.int64), 64, 16)
    assert wa.tolist() == [16, 32, 32]


def test_align_side_keeps_narrow_components_at_one_tile() -> None:
    wa, _ = align_side(torch.tensor([1, 2, 3]), torch.tensor([0, 5, 9]), 64, 8)
    assert wa.tolist() == [8, 8, 8]  # never dropped: the floor of one tile wins over the width budget


def test_align_structure_checks_shapes() -> None:
    with pytest.raises(ValueError, match=r"expected \(2, K\)"):
        align_structure(torch.zeros(3, 2, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64), 8, 8, 4)


def _random_layer(n_in: int = 96, n_out: int = 64, k: int = 12, seed: int = 0) -> GBLRLinear:
    torch.manual_seed(seed)
    layer = GBLRLinear(n_in, n_out, num_components=k, rank_per_component=2, sigma=None, init_std="fan_in")
    with torch.no_grad():
        layer.widths.uniform_(0.1, 0.9)
        layer.locations.uniform_(0, 1)
    return layer


def test_aligned_freeze_snaps_windows_and_never_raises_flops() -> None:
    layer = _random_layer()
    before = layer.flops()
    layer.freeze_structure(align=16)
    w, loc = layer.int_widths(), layer.int_locations()
    assert (w % 16 == 0).all() and (loc % 16 == 0).all()
    assert layer.flops() <= before and layer.num_components == 12
    # still exactly the integer-boxcar matrix of the aligned windows
    m_in, m_out = layer.masks()
    assert set(m_in.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal((layer.weight_in != 0).any(1), m_in.bool() & (layer.weight_in != 0).any(1))


def test_align_one_is_the_plain_freeze() -> None:
    a, b = _random_layer(seed=3), _random_layer(seed=3)
    a.freeze_structure()
    b.freeze_structure(align=1)
    assert torch.equal(a.widths, b.widths) and torch.equal(a.locations, b.locations)
    assert torch.equal(a.to_dense(), b.to_dense())


def _tile_macs(layer: GBLRLinear, tile: int) -> int:
    """Multiply-adds per token of the tiles path with ``tile``-wide tiles and one bucket per member count."""
    w, loc, r = layer.int_widths(), layer.int_locations(), layer.rank_per_component
    return sum(plan_side(loc[i].numpy(), w[i].numpy(), n, r, tile, threshold=1.0, max_buckets=10_000).weights
               for i, n in enumerate((layer.in_features, layer.out_features)))


def test_aligned_windows_cost_the_tiles_path_exactly_their_flops() -> None:
    plain, aligned = _random_layer(seed=1), _random_layer(seed=1)
    plain.freeze_structure()
    aligned.freeze_structure(align=16)
    assert _tile_macs(plain, 16) > plain.flops()  # partial tiles are padded
    assert _tile_macs(aligned, 16) == aligned.flops()
    compact = CompactGBLR.from_gblr(aligned, path="tiles")
    x = torch.randn(5, 96)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), aligned(x), rtol=1e-5, atol=1e-5)
