"""CompactGBLR / optimize_inference: exact equality with the merged dense layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gsm_lightning.core.layer import GBLRLinear
from gsm_lightning.infer.inference import CompactGBLR, SidePlan, optimize_inference, plan_side

D = torch.float64


def random_frozen(n_in: int, n_out: int, k: int, r: int = 1, seed: int = 0, bias: bool = True,
                  max_width: float = 1.0) -> GBLRLinear:
    g = torch.Generator().manual_seed(seed)
    layer = GBLRLinear(n_in, n_out, bias=bias, rank_per_component=r, num_components=k, dtype=D)
    with torch.no_grad():
        layer.widths.copy_(torch.rand(2, k, generator=g) * max_width)
        layer.locations.copy_(torch.rand(2, k, generator=g))
        layer.weight_in.copy_(torch.randn(k, r, n_in, generator=g, dtype=D))
        layer.weight_out.copy_(torch.randn(k, r, n_out, generator=g, dtype=D))
        if bias:
            layer.bias.copy_(torch.randn(n_out, generator=g, dtype=D))
    return layer.freeze_structure()


def check_equal(layer: GBLRLinear, compact: CompactGBLR, lead=(3, 5)) -> None:
    x = torch.randn(*lead, layer.in_features, dtype=D)
    ref = nn.functional.linear(x, layer.to_dense(), layer.bias)
    y = compact(x)
    assert y.shape == (*lead, layer.out_features)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(17, 23, 9, 1), (32, 16, 20, 2), (50, 40, 40, 3), (5, 7, 3, 1), (96, 64, 64, 1)])
@pytest.mark.parametrize("tile", [None, 1, 3, 8, 1000])
@pytest.mark.parametrize("buckets", [1, 8])
def test_random_structures_match_dense(shape, tile, buckets):
    n_in, n_out, k, r = shape
    layer = random_frozen(n_in, n_out, k, r, seed=n_in + k + (tile or 0))
    compact = CompactGBLR.from_gblr(layer, tile_in=tile, tile_out=tile, max_buckets=buckets)
    check_equal(layer, compact)
    v, u = compact.masked_factors()
    v0, u0 = layer.masked_factors()
    assert torch.equal(v, v0) and torch.equal(u, u0)


def test_wrap_around_windows():
    layer = GBLRLinear._from_factors(torch.randn(3, 1, 10, dtype=D), torch.randn(3, 1, 12, dtype=D),
                                     torch.tensor([[5, 12, 3], [4, 7, 10]]), torch.tensor([[10, 7, 11], [8, 9, 0]]),
                                     torch.randn(10, dtype=D)).freeze_structure()
    # windows wrap around the end of both sides
    assert ((layer.int_locations() + layer.int_widths()) > torch.tensor([[12], [10]])).all(dim=0).any()
    for tile in (None, 2, 5, 12):
        check_equal(layer, CompactGBLR.from_gblr(layer, tile_in=tile, tile_out=tile))


def test_low_rank_is_two_thin_gemms():
    layer = GBLRLinear.from_low_rank(torch.randn(30, 4, dtype=D), torch.randn(4, 20, dtype=D),
                                     torch.randn(30, dtype=D)).freeze_structure()
    c = CompactGBLR.from_gblr(layer)
    assert c.plan_in.tile == 20 and c.plan_out.tile == 30
    assert c.in_view and c.z_identity_in and c.z_identity_out and c.out_identity
    assert c.macs() == layer.flops()
    check_equal(layer, c)


def test_block_diagonal_and_block_low_rank_have_no_waste():
    bd = GBLRLinear.from_block_diagonal([torch.randn(16, 8, dtype=D) for _ in range(4)]).freeze_structure()
    c = CompactGBLR.from_gblr(bd, tile_in=8, tile_out=16)
    assert c.in_view and c.z_identity_in and c.z_identity_out and c.out_identity
    assert c.macs() == bd.flops()
    check_equal(bd, c)
    dense = torch.randn(48, 32, dtype=D)
    blr = GBLRLinear.from_block_low_rank(dense, (12, 8), rank=2).freeze_structure()
    c = CompactGBLR.from_gblr(blr, tile_in=8, tile_out=12)  # block-aligned tiles: no waste
    assert c.macs() == blr.flops()
    check_equal(blr, c)
    check_equal(blr, CompactGBLR.from_gblr(blr))  # whatever the cost model picks


def test_identity_input_side_with_padded_output_tiles():
    # all input windows full (input side = one identity tile) while output tiles need padding slots
    g = torch.Generator().manual_seed(7)
    k = 6
    widths = torch.tensor([[10] * k, [1, 2, 9, 3, 1, 4]])
    locations = torch.tensor([[0] * k, [0, 3, 1, 8, 5, 2]])
    layer = GBLRLinear._from_factors(torch.randn(k, 1, 11, generator=g, dtype=D), torch.randn(k, 1, 10, generator=g, dtype=D),
                                     widths, locations).freeze_structure()
    c = CompactGBLR.from_gblr(layer, tile_in=10, tile_out=4, max_buckets=1)
    assert c.z_identity_in and not c.z_identity_out and c.out_identity
    assert (c.plan_out.buckets[0][1] < 0).any()  # padding slots present
    check_equal(layer, c)


def test_empty_layer_k0():
    layer = random_frozen(12, 9, 5, seed=1)
    with torch.no_grad():
        layer2 = GBLRLinear(12, 9, num_components=0, dtype=D, sigma=None)
        layer2.bias.copy_(layer.bias)
    layer2.freeze_structure()
    c = CompactGBLR.from_gblr(layer2)
    check_equal(layer2, c)
    assert c.to_dense().abs().sum() == 0


def test_float32_leading_dims_and_single_token():
    layer = random_frozen(40, 24, 24, seed=3)
    layer32 = layer.float()
    c = CompactGBLR.from_gblr(layer32, tokens=1)
    for lead in [(1,), (2, 3, 4), ()]:
        x = torch.randn(*lead, 40)
        torch.testing.assert_close(c(x), layer32(x), rtol=1e-5, atol=1e-5)


def test_to_gblr_round_trip():
    layer = random_frozen(30, 20, 15, r=2, seed=4)
    back = CompactGBLR.from_gblr(layer).to_gblr()
    assert torch.equal(back.int_widths(), layer.int_widths())
    assert torch.equal(back.int_locations(), layer.int_locations())
    torch.testing.assert_close(back.to_dense(), layer.to_dense(), rtol=0, atol=0)


def test_errors():
    with pytest.raises(ValueError, match="freeze_structure"):
        CompactGBLR.from_gblr(GBLRLinear(8, 8))
    with pytest.raises(TypeError, match="GBLRLinear"):
        CompactGBLR.from_gblr(nn.Linear(4, 4))
    c = CompactGBLR.from_gblr(random_frozen(8, 6, 4))
    with pytest.raises(ValueError, match="last dimension 8"):
        c(torch.randn(2, 7, dtype=D))
    with pytest.raises(ValueError, match="unknown mode"):
        optimize_inference(nn.Sequential(), mode="fast")
    with pytest.raises(ValueError, match="widths must be in"):
        plan_side([0, 1], [0, 3], 8, 1, 4)


def test_plan_side_cover():
    # two clusters of windows on a side of 32, tile 8: tiles 0 and 3 only
    p = plan_side([0, 2, 25], [6, 4, 7], 32, 1, 8, threshold=0.9, max_buckets=4)
    assert isinstance(p, SidePlan)
    tiles = sorted(np.concatenate([t for t, _ in p.buckets]).tolist())
    assert tiles == [0, 3]  # component 2 covers 25..31
    assert p.weights == 8 * 2 + 8 * 1


def make_model() -> nn.Sequential:
    return nn.Sequential(random_frozen(24, 48, 20, seed=5), nn.GELU(), random_frozen(48, 24, 20, seed=6),
                         nn.Linear(24, 3, dtype=D))


@pytest.mark.parametrize("mode,kw", [("compact", {}), ("dense", {}), ("auto", {}), ("auto", {"tokens": 8}),
                                     ("auto", {"sample_input": torch.randn(4, 24, dtype=D)})])
def test_optimize_inference_modes(mode, kw):
    model = make_model()
    x = torch.randn(6, 24, dtype=D)
    with torch.no_grad():
        ref = model(x)
    report = optimize_inference(model, mode=mode, reps=3, **kw)
    assert len(report) == 2 and "optimize_inference" in str(report)
    kinds = {type(model[0]), type(model[2])}
    if mode == "compact":
        assert kinds == {CompactGBLR}
    elif mode == "dense":
        assert kinds == {nn.Linear}
    assert all(c.choice in ("compact", "dense") for c in report.layers)
    if "tokens" in kw or "sample_input" in kw:
        assert all(c.compact_time is not None and c.compact_time > 0 for c in report.layers)
    assert not any(isinstance(m, GBLRLinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-10, atol=1e-10)


def test_optimize_inference_skips_unfrozen_layers():
    model = nn.Sequential(GBLRLinear(8, 8), random_frozen(8, 8, 4))
    report = optimize_inference(model, mode="compact")
    assert isinstance(model[0], GBLRLinear) and isinstance(model[1], CompactGBLR)
    assert [c.name for c in report.layers] == ["1"]


@pytest.mark.parametrize("seed", range(12))
def test_mixed_identity_and_tiled_sides(seed):
    """Random mixes of full-width (identity) and windowed sides, tile sizes and bucket counts."""
    rng = np.random.default_rng(seed)
    n_in, n_out, k = int(rng.integers(4, 40)), int(rng.integers(4, 40)), int(rng.integers(1, 12))
    r = int(rng.integers(1, 3))
    n = np.array([[n_in], [n_out]])
    widths = rng.integers(1, n + 1, size=(2, k))
    for side in range(2):
        if rng.random() < 0.5:
            widths[side] = n[side, 0]
    locations = rng.integers(0, n, size=(2, k))
    g = torch.Generator().manual_seed(seed)
    layer = GBLRLinear._from_factors(torch.randn(k, r, n_out, generator=g, dtype=D), torch.randn(k, r, n_in, generator=g, dtype=D),
                                     torch.as_tensor(widths), torch.as_tensor(locations), torch.randn(n_out, dtype=D)).freeze_structure()
    tiles = [None, int(rng.integers(1, n_in + 1)), n_in]
    for tile_in in tiles:
        for tile_out in (None, int(rng.integers(1, n_out + 1)), n_out):
            for mb in (1, 3):
                check_equal(layer, CompactGBLR.from_gblr(layer, tile_in=tile_in, tile_out=tile_out, max_buckets=mb), lead=(4,))


# ------------------------------------------------------------------------------------- blocks path, fallback
def from_windows(n_in: int, n_out: int, widths, locations, r: int = 1, seed: int = 0) -> GBLRLinear:
    g = torch.Generator().manual_seed(seed)
    k = len(widths[0])
    return GBLRLinear._from_factors(torch.randn(k, r, n_out, generator=g, dtype=D), torch.randn(k, r, n_in, generator=g, dtype=D),
                                    torch.tensor(widths), torch.tensor(locations), torch.randn(n_out, generator=g, dtype=D)).freeze_structure()


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("merge,max_blocks", [(False, None), (True, None), (True, 1), (True, 3)])
def test_blocks_path_matches_dense(seed, merge, max_blocks):
    rng = np.random.default_rng(100 + seed)
    n_in, n_out, k, r = int(rng.integers(5, 48)), int(rng.integers(5, 48)), int(rng.integers(1, 14)), int(rng.integers(1, 3))
    layer = random_frozen(n_in, n_out, k, r, seed=seed)
    c = CompactGBLR.from_gblr(layer, path="blocks", merge_blocks=merge, max_blocks=max_blocks)
    assert c.path == "blocks"
    if max_blocks is not None:
        assert len(c.block_meta) <= max_blocks
    check_equal(layer, c)
    v, u = c.masked_factors()
    v0, u0 = layer.masked_factors()
    assert torch.equal(v, v0) and torch.equal(u, u0)
    assert c.macs() >= layer.flops()
    torch.testing.assert_close(c.to_gblr().to_dense(), layer.to_dense(), rtol=0, atol=0)


def test_blocks_wrapping_windows_both_sides():
    # block 0 wraps on the input side, block 1 on the output side, block 2 on both, block 3 is full on both
    layer = from_windows(20, 16, [[8, 5, 12, 20], [6, 10, 9, 16]], [[15, 2, 14, 7], [3, 12, 10, 5]], r=2)
    c = CompactGBLR.from_gblr(layer, path="blocks", merge_blocks=False)
    wraps = [(m[2], m[5]) for m in c.block_meta]
    assert sorted(wraps) == sorted([(True, False), (False, True), (True, True), (False, False)])
    assert c.block_meta[0][3] == 0 and c.block_meta[0][4] == 16  # the full-output block starts the output
    assert c.macs() == layer.flops()
    check_equal(layer, c)
    check_equal(layer, c, lead=(1,))


def test_blocks_merge_identical_windows_is_exact():
    # 6 components, 2 distinct window pairs: 2 blocks of rank 4 and 2, no padding
    layer = from_windows(32, 24, [[8, 8, 8, 8, 16, 16], [12, 12, 12, 12, 6, 6]],
                         [[4, 4, 4, 4, 30, 30], [0, 0, 0, 0, 20, 20]])
    c = CompactGBLR.from_gblr(layer, path="blocks", merge_blocks=False)
    assert len(c.block_meta) == 2
    assert sorted(c.blocks.block_rank(p) for p in range(2)) == [2, 4]
    assert c.macs() == layer.flops()
    check_equal(layer, c)


def test_blocks_merge_nearly_identical_windows():
    # windows shifted by one position: merging pads a little and saves gemm launches
    k = 8
    layer = from_windows(64, 64, [[32] * k, [32] * k], [list(range(k)), list(range(10, 10 + k))])
    c = CompactGBLR.from_gblr(layer, path="blocks", tokens=16)
    assert len(c.block_meta) == 1 and c.block_meta[0][1] == 32 + k - 1
    assert c.macs() == k * 2 * (32 + k - 1)
    check_equal(layer, c)
    plain = CompactGBLR.from_gblr(layer, path="blocks", merge_blocks=False)
    assert len(plain.block_meta) == k and plain.macs() == layer.flops()
    check_equal(layer, plain)


def test_arc_union():
    from gsm_lightning.infer.compact_plan import _arc_union

    a, w = _arc_union(np.array([2, 30, 0, 10]), np.array([5, 6, 40, 4]), np.array([4, 1, 7, 30]), np.array([6, 3, 3, 8]), 40)
    # [2,7)+[4,10) -> [2,10); [30,36)+[1,4) wraps -> [30,44); full stays full; [10,14)+[30,38) -> [30,54) (wrapping
    # is shorter than [10,38))
    assert a.tolist() == [2, 30, 0, 30] and w.tolist() == [8, 14, 40, 24]


@pytest.mark.parametrize("path", ["tiles", "blocks"])
def test_outputs_are_contiguous(path):
    layer = random_frozen(40, 24, 12, seed=9, max_width=0.5)
    for tile in (None, 8):
        c = CompactGBLR.from_gblr(layer, path=path, tile_in=tile, tile_out=tile)
        y = c(torch.randn(3, 7, 40, dtype=D))
        assert y.is_contiguous() and y.shape == (3, 7, 24)


def test_low_rank_path_is_row_major():
    layer = GBLRLinear.from_low_rank(torch.randn(30, 4, dtype=D), torch.randn(4, 20, dtype=D), torch.randn(30, dtype=D)).freeze_structure()
    for path in ("tiles", "blocks"):
        c = CompactGBLR.from_gblr(layer, path=path)
        assert c.macs() == layer.flops()
        assert c.lowrank if path == "tiles" else len(c.block_meta) == 1
        check_equal(layer, c)


def test_auto_path_choice_is_exact():
    for seed in range(4):
        layer = random_frozen(64, 48, 30, seed=seed, max_width=0.6)
        c = CompactGBLR.from_gblr(layer, tokens=64)
        assert c.path in ("tiles", "blocks")
        check_equal(layer, c)
    with pytest.raises(ValueError, match="unknown path"):
        CompactGBLR.from_gblr(layer, path="fast")


def test_dense_fallback_below_threshold():
    layer = random_frozen(24, 16, 10, seed=11)
    c = CompactGBLR.from_gblr(layer, path="blocks")
    marker = torch.zeros(16, 24, dtype=D)  # a wrong dense weight shows which branch ran
    c.set_dense_fallback(8, marker)
    assert c.dense_below == 8 and "dense below 8" in repr(c)
    x = torch.randn(5, 24, dtype=D)
    torch.testing.assert_close(c(x), layer.bias.expand(5, 16))  # dense branch: bias only
    check_equal(layer, c, lead=(2, 4))  # 8 tokens: compact branch
    c.set_dense_fallback(8)  # the true dense weight
    check_equal(layer, c, lead=(5,))
    torch.testing.assert_close(c.to_dense(), layer.to_dense())
    c.set_dense_fallback(0)
    assert c.dense_below == 0 and "dense_weight" not in dict(c.named_buffers())
    with pytest.raises(ValueError, match="must be"):
        c.set_dense_fallback(4, torch.zeros(3, 3, dtype=D))


def test_fallback_threshold():
    from gsm_lightning.infer.inference import _fallback_threshold

    assert _fallback_threshold({1: True, 8: True, 64: True}) == 0
    assert _fallback_threshold({1: False, 8: False, 64: True}) == 64
    assert _fallback_threshold({1: False, 8: True, 16: False, 64: True}) == 64
    assert _fallback_threshold({1: True, 8: False, 64: True, 256: True}) == 64


@pytest.mark.parametrize("kw", [{"tokens": 64}, {}])
def test_optimize_inference_fallback_and_paths(kw):
    model = make_model()
    x = torch.randn(70, 24, dtype=D)
    with torch.no_grad():
        ref = model(x)
    report = optimize_inference(model, mode="auto", reps=3, **kw)
    for c in report.layers:
        mod = model.get_submodule(c.name)
        if c.choice == "compact":
            assert isinstance(mod, CompactGBLR) and c.path == mod.path and c.dense_below == mod.dense_below
        else:
            assert c.path is None and c.dense_below == 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(model(x[:3]), ref[:3], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="paths"):
        optimize_inference(make_model(), paths=("fast",))


def test_optimize_inference_single_path_and_no_fallback():
    model = make_model()
    report = optimize_inference(model, mode="auto", tokens=16, reps=2, fallback=False, path="blocks")
    assert all(c.dense_below == 0 for c in report.layers)
    assert all(c.path in (None, "blocks") for c in report.layers)


def _compact_wins_per_layer(monkeypatch):
    """Make every per-layer timing say compact beats dense (fake burst times of layers, the last one being dense);
    the whole-model timing, whose functions are not layers, stays real."""
    from gsm_lightning import inference

    real = inference._burst_times

    def burst_times(fns, x, reps, rounds=3, min_burst_s=0.01):
        if all(isinstance(f, nn.Module) for f in fns):
            return [[1.0] * rounds for _ in fns[:-1]] + [[2.0] * rounds]
        return real(fns, x, reps, rounds, min_burst_s)

    monkeypatch.setattr(inference, "_burst_times", burst_times)
    monkeypatch.setattr(inference, "_faster", lambda a, b, x, reps: True)
    return inference


@pytest.mark.parametrize("whole_model_ratio,gain", [(1.5, 0.05), (0.97, 0.05), (0.94, 0.05), (0.97, 0.0), (0.5, 0.05)])
def test_auto_reverts_to_dense_when_the_whole_model_is_not_faster(monkeypatch, whole_model_ratio, gain):
    inference = _compact_wins_per_layer(monkeypatch)
    seen = {}

    def fake_ratio(model, swaps, sample_input, rounds=9, min_burst_s=0.05):
        seen["swaps"] = sorted(swaps)
        assert all(isinstance(c, CompactGBLR) and isinstance(d, nn.Linear) for c, d in swaps.values())
        return whole_model_ratio

    monkeypatch.setattr(inference, "_model_ratio", fake_ratio)
    model = make_model()
    x = torch.randn(6, 24, dtype=D)
    with torch.no_grad():
        ref = model(x)
    report = optimize_inference(model, mode="auto", sample_input=x, reps=3, min_model_gain=gain)
    assert seen["swaps"] == ["0", "2"] and report.model_ratio == whole_model_ratio
    reverted = whole_model_ratio > 1 - gain
    assert report.reverted is reverted and ("every layer merged to dense" in str(report)) is reverted
    for c in report.layers:
        mod = model.get_submodule(c.name)
        assert type(mod) is (nn.Linear if reverted else CompactGBLR)
        assert (c.choice, c.path is None, c.dense_below == 0) == (("dense", True, True) if reverted else ("compact", False, c.dense_below == 0))
    assert report.to_dict()["reverted"] is reverted
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-10, atol=1e-10)


def test_auto_whole_model_check_is_timed_and_optional(monkeypatch):
    _compact_wins_per_layer(monkeypatch)
    model = make_model()
    x = torch.randn(6, 24, dtype=D)
    with torch.no_grad():
        ref = model(x)
    report = optimize_inference(model, mode="auto", sample_input=x, reps=3, verify=False)
    assert report.model_ratio is None and not report.reverted
    assert all(isinstance(model.get_submodule(c.name), CompactGBLR) for c in report.layers)
    from gsm_lightning.infer.inference import _model_ratio

    model = make_model()
    with torch.no_grad():
        ref = model(x)
    report = optimize_inference(model, mode="auto", sample_input=x, reps=3)
    assert report.model_ratio is not None and 0 < report.model_ratio < float("inf")
    assert report.reverted is (report.model_ratio > 0.95)
    kinds = {type(model.get_submodule(c.name)) for c in report.layers}
    assert kinds == ({nn.Linear} if report.reverted else {CompactGBLR})
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="min_model_gain"):
        optimize_inference(make_model(), mode="auto", sample_input=x, min_model_gain=1.0)
    # the timing helper puts the first variant back in place
    swaps = {"0": (model[0], nn.Linear(24, 48, dtype=D))}
    _model_ratio(model, swaps, x, rounds=2, min_burst_s=0.001)
    assert model[0] is swaps["0"][0]


@pytest.mark.parametrize("path", ["tiles", "blocks"])
def test_single_token_calls_leave_buffers_alone(path):
    # a partial output window: the blocks path starts y from the bias (regression: at one token it wrote into it)
    layer = from_windows(12, 10, [[12, 5], [6, 4]], [[0, 3], [2, 7]])
    c = CompactGBLR.from_gblr(layer, path=path)
    state = {k: v.clone() for k, v in c.state_dict().items()}
    for _ in range(3):
        check_equal(layer, c, lead=(1,))
        check_equal(layer, c, lead=())
    assert all(torch.equal(v, c.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("max_blocks", [1, None])
def test_blocks_rank_padding_is_exact_and_counted(bias, max_blocks):
    layer = random_frozen(40, 24, 13, r=2, seed=11, bias=bias, max_width=0.8)
    plain = CompactGBLR.from_gblr(layer, path="blocks", max_blocks=max_blocks)
    padded = CompactGBLR.from_gblr(layer, path="blocks", max_blocks=max_blocks, rank_multiple=8)
    assert padded.rank_multiple == 8 and plain.rank_multiple == 1
    bp = padded.blocks
    for p in range(bp.num_blocks):
        r = bp.block_rank(p)
        v, u = getattr(padded, f"blk_v{p}"), getattr(padded, f"blk_u{p}")
        assert v.shape[1] == u.shape[0] == -(-r // 8) * 8  # zero-padded up to a multiple of 8
        assert not v[:, r:].any() and not u[r:].any()
    extra = sum((-(-bp.block_rank(p) // 8) * 8 - bp.block_rank(p)) * int(bp.in_len[p] + bp.out_len[p])
                for p in range(bp.num_blocks))
    assert extra > 0 and padded.macs() == plain.macs() + extra
    x = torch.randn(5, 3, 40, dtype=D)
    with torch.no_grad():
        torch.testing.assert_close(padded(x), layer(x), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(padded.to_dense(), plain.to_dense(), rtol=0, atol=0)
        rebuilt = padded.to_gblr()
        torch.testing.assert_close(rebuilt(x), layer(x), rtol=1e-10, atol=1e-10)
    assert "rank_multiple=8" in repr(padded) and "->" in repr(padded)
    tiles = CompactGBLR.from_gblr(layer, path="tiles", rank_multiple=8)  # the tiles path has no block ranks to pad
    assert tiles.rank_multiple == 1
    with pytest.raises(ValueError, match="rank_multiple must be >= 1"):
        CompactGBLR.from_gblr(layer, path="blocks", rank_multiple=0)


def test_whole_block_fast_path_matches_the_loop():
    layer = random_frozen(32, 16, 6, r=3, seed=4, max_width=1.0)
    with torch.no_grad():
        layer.widths.fill_(1.0)  # every window whole: one block covering both sides
    layer.freeze_structure()
    for mult in (1, 8):
        m = CompactGBLR.from_gblr(layer, path="blocks", rank_multiple=mult)
        assert m._whole_block and m.blocks.num_blocks == 1
        x = torch.randn(7, 32, dtype=D)
        with torch.no_grad():
            torch.testing.assert_close(m(x), m._forward_blocks(x), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(m(x), layer(x), rtol=1e-10, atol=1e-10)
    assert not CompactGBLR.from_gblr(random_frozen(32, 16, 6, seed=4, max_width=0.5), path="blocks",
                                     merge_blocks=False)._whole_block


def test_auto_times_padded_block_ranks(monkeypatch):
    from gsm_lightning import inference

    built = []
    real = CompactGBLR.from_gblr.__func__

    def spy(cls, layer, **kw):
        built.append((kw.get("path"), kw.get("rank_multiple", 1)))
        return real(cls, layer, **kw)

    monkeypatch.setattr(CompactGBLR, "from_gblr", classmethod(spy))
    model = make_model()
    report = optimize_inference(model, mode="auto", tokens=16, reps=2)
    assert {("tiles", 1), ("blocks", 1), ("blocks", 8)} <= set(built)
    for c in report.layers:
        mod = model.get_submodule(c.name)
        assert c.rank_multiple == (mod.rank_multiple if c.choice == "compact" else 1)
    built.clear()
    optimize_inference(make_model(), mode="auto", tokens=16, reps=2, rank_multiples=(4,), paths=("blocks",))
    assert set(built) == {("blocks", 4)}
    with pytest.raises(ValueError, match="rank_multiples"):
        optimize_inference(make_model(), mode="auto", tokens=16, rank_multiples=(0,))
    assert inference.padded_rank(57, 8) == 64 and inference.padded_rank(64, 8) == 64 and inference.padded_rank(5, 1) == 5
