"""GBLRLinear: forward modes, init, FLOPs accounting, freezing, mask cache, checkpoints, gradients."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from gsm_lightning import GBLRLinear
from gsm_lightning.core.masks import boxcar_mask

SHAPES = [(5, 7), (7, 5), (16, 16), (1, 9), (9, 1), (33, 20)]


def reference_output(layer: GBLRLinear, x: torch.Tensor) -> torch.Tensor:
    y = x @ layer.to_dense().t()
    return y + layer.bias if layer.bias is not None else y


def randomize_structure(layer: GBLRLinear, zero_frac: float = 0.3) -> None:
    """Random widths/locations in [0, 1], some widths rounding to zero on one side."""
    with torch.no_grad():
        layer.widths.uniform_(0, 1)
        layer.locations.uniform_(0, 1)
        k = layer.num_components
        dead = torch.rand(2, k) < zero_frac
        layer.widths[dead] = 0.0


# ---------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("in_f,out_f", SHAPES)
@pytest.mark.parametrize("mode", ["lowrank", "dense", "auto"])
def test_forward_equals_dense_weight(in_f: int, out_f: int, mode: str) -> None:
    for bias in (True, False):
        for sigma in (None, 2.0):
            layer = GBLRLinear(in_f, out_f, bias=bias, sigma=sigma, forward_mode=mode, location_init="random")
            randomize_structure(layer)
            for batch in [(), (2, 3), (2, 1, 3)]:
                x = torch.randn(*batch, in_f)
                y = layer(x)
                assert y.shape == (*batch, out_f)
                torch.testing.assert_close(y, reference_output(layer, x), atol=1e-5, rtol=1e-4)


def test_forward_modes_agree_and_auto_picks_cheaper_path() -> None:
    layer = GBLRLinear(16, 16, location_init="random")
    randomize_structure(layer)
    x = torch.randn(3, 5, 16)
    outs = {}
    for mode in ("lowrank", "dense", "auto"):
        layer.forward_mode = mode
        outs[mode] = layer(x)
    torch.testing.assert_close(outs["lowrank"], outs["dense"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outs["auto"], outs["dense"], atol=1e-5, rtol=1e-4)
    # K=16, 16x16: masked low-rank costs 16*32 per token, dense 16*256 once + 256 per token
    layer.forward_mode = "auto"
    assert not layer._use_dense(1)
    assert layer._use_dense(1000)


def test_forward_rejects_wrong_input_size() -> None:
    layer = GBLRLinear(6, 4)
    with pytest.raises(ValueError, match="last dimension 6"):
        layer(torch.randn(2, 5))


def test_float64_layer_and_to_linear() -> None:
    layer = GBLRLinear(12, 8, dtype=torch.float64, location_init="random")
    randomize_structure(layer)
    x = torch.randn(5, 12, dtype=torch.float64)
    y = layer(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, reference_output(layer, x))
    lin = layer.to_linear()
    assert isinstance(lin, nn.Linear) and lin.weight.dtype == torch.float64
    torch.testing.assert_close(lin(x), y)


def test_zero_components_is_the_bias() -> None:
    layer = GBLRLinear(8, 6, num_components=0)
    x = torch.randn(3, 8, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, layer.bias.expand(3, 6))
    y.sum().backward()
    assert layer.flops() == 0 and layer.effective_rank() == 0 and layer.params() == 6


# ------------------------------------------------------------------------------------------------ init
def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="in_features and out_features"):
        GBLRLinear(0, 4)
    with pytest.raises(ValueError, match="rank_per_component"):
        GBLRLinear(4, 4, rank_per_component=5)
    with pytest.raises(ValueError, match="num_components"):
        GBLRLinear(4, 4, num_components=-1)
    with pytest.raises(ValueError, match="width_init"):
        GBLRLinear(4, 4, width_init="wide")
    with pytest.raises(ValueError, match="width_init"):
        GBLRLinear(4, 4, width_init=1.5)
    with pytest.raises(ValueError, match="location_init"):
        GBLRLinear(4, 4, location_init="left")
    with pytest.raises(ValueError, match="forward_mode"):
        GBLRLinear(4, 4, forward_mode="sparse")
    with pytest.raises(ValueError, match="init_std"):
        GBLRLinear(4, 4, init_std=0.0)
    with pytest.raises(ValueError, match="'fan_in'"):
        GBLRLinear(4, 4, init_std="lecun")


@pytest.mark.parametrize("width_init", ["splr", "full", 0.25])
@pytest.mark.parametrize("location_init", ["zero", "uniform", "random"])
def test_init_widths_and_locations_in_unit_interval(width_init, location_init) -> None:
    for in_f, out_f in SHAPES:
        layer = GBLRLinear(in_f, out_f, width_init=width_init, location_init=location_init)
        assert layer.widths.shape == layer.locations.shape == (2, layer.num_components)
        assert layer.num_components == min(in_f, out_f)
        for p in (layer.widths, layer.locations):
            assert p.requires_grad
            assert ((p >= 0) & (p <= 1)).all()
        if width_init == "full":
            assert (layer.widths == 1).all()
        if location_init == "zero":
            assert (layer.locations == 0).all()


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_splr_init_costs_the_dense_flops(rank: int) -> None:
    shapes = [(32, 128), (128, 32), (37, 149), (66, 66), (64, 256), (30, 50), (100, 7)]
    for in_f, out_f in shapes:
        layer = GBLRLinear(in_f, out_f, rank_per_component=rank)
        k = layer.num_components
        assert k == min(in_f, out_f) // rank
        # widths are floored to the grid on both sides: never above dense, at most one step each per component
        # below it.  When even K full-width components cost less than dense, all widths are 1.
        target = min(in_f * out_f, k * rank * (in_f + out_f))
        assert target - 2 * k * rank <= layer.flops() <= target, (in_f, out_f, layer.flops())
        # reference structure: a block of full-width components, the rest at one common width (to a grid step)
        w = layer.widths
        assert ((w[0] - w[1]).abs() <= 1 / min(in_f, out_f) + 1e-6).all()
        n_full = int((w[0] == 1).sum())
        assert (w[0, :n_full] == 1).all() and (w[0, n_full:] < 1).all()
        if k > n_full:
            assert torch.allclose(w[0, n_full:], w[0, n_full].expand(k - n_full))


@pytest.mark.parametrize("in_f, out_f, width, b", [(96, 96, 0.25, 4), (96, 192, 1 / 3, 3), (49, 64, 0.2, 5),
                                                   (64, 49, 0.2, 5), (12, 30, 0.5, 2), (7, 5, 0.1, 5)])
def test_tiled_init_is_the_per_tile_truncated_svd_of_the_dense_init(in_f, out_f, width, b) -> None:
    torch.manual_seed(3)
    layer = GBLRLinear(in_f, out_f, width_init=width, location_init="tiled", init_std="fan_in")
    # the dense matrix reset_parameters drew (the first draw from the generator after the seed)
    torch.manual_seed(3)
    std = 1 / in_f ** 0.5
    dense = nn.init.trunc_normal_(torch.empty(out_f, in_f), std=std, a=-2 * std, b=2 * std).double()
    # oracle: tiles from integer edges, component k on tile k mod b^2, each tile its own truncated SVD
    k = min(in_f, out_f)
    e_in = [i * in_f // b for i in range(b + 1)]
    e_out = [i * out_f // b for i in range(b + 1)]
    expected = torch.zeros(out_f, in_f, dtype=torch.float64)
    covered = torch.zeros(out_f, in_f, dtype=torch.int64)
    for t in range(b * b):
        n_comp = len(range(t, k, b * b))
        r0, r1, c0, c1 = e_out[t // b], e_out[t // b + 1], e_in[t % b], e_in[t % b + 1]
        u, s, vh = np.linalg.svd(dense[r0:r1, c0:c1].numpy())
        expected[r0:r1, c0:c1] = torch.from_numpy((u[:, :n_comp] * s[:n_comp]) @ vh[:n_comp])
        covered[r0:r1, c0:c1] += 1
    assert (covered == 1).all()  # the tiles partition the matrix
    assert torch.allclose(layer.to_dense().double(), expected, atol=1e-5)
    # every component's window is exactly its tile, on the grid
    windows = torch.stack([layer.int_widths(), layer.int_locations()])  # (2: width/loc, 2: in/out, K)
    t = torch.arange(k) % (b * b)
    assert windows[1, 0].tolist() == [e_in[i] for i in (t % b).tolist()]
    assert windows[1, 1].tolist() == [e_out[i] for i in (t // b).tolist()]
    assert windows[0, 0].tolist() == [e_in[i + 1] - e_in[i] for i in (t % b).tolist()]
    assert windows[0, 1].tolist() == [e_out[i + 1] - e_out[i] for i in (t // b).tolist()]


def test_tiled_init_costs_monarchs_flops_and_restores() -> None:
    from gsm_lightning.core.baselines import _monarch_flops

    for in_f, out_f, b in [(96, 96, 4), (96, 192, 3), (192, 96, 3), (96, 384, 4)]:
        layer = GBLRLinear(in_f, out_f, width_init=1 / b, location_init="tiled")
        assert layer.flops() == _monarch_flops(in_f, out_f, b)  # the same block structure up to a row permutation
    layer = GBLRLinear(24, 24, width_init=0.25, location_init="tiled")
    w0, l0, d0 = layer.widths.detach().clone(), layer.locations.detach().clone(), layer.to_dense().detach().clone()
    randomize_structure(layer)
    torch.manual_seed(0)
    layer.reset_parameters()
    assert torch.equal(layer.widths, w0) and torch.equal(layer.locations, l0)
    assert not torch.allclose(layer.to_dense(), d0)  # a new random matrix in the same layout


def test_tiled_init_needs_a_numeric_width() -> None:
    with pytest.raises(ValueError, match="location_init='tiled' needs a numeric width_init"):
        GBLRLinear(8, 8, location_init="tiled")
    with pytest.raises(ValueError, match="random-init layout"):
        GBLRLinear.from_linear(nn.Linear(8, 8), budget=0.5, location_init="tiled")


def test_full_width_init_reconstructs_the_trunc_normal_matrix() -> None:
    std = 0.02
    layer = GBLRLinear(48, 40, width_init="full", init_std=std)
    w = layer.to_dense()
    # the full SVD reconstructs a trunc-normal matrix (cut at 2 std): bounded, with std ~0.88 * std
    assert w.abs().max() <= 2 * std + 1e-6
    assert 0.8 * std < w.std() < 0.95 * std


def test_fan_in_init_std_is_lecun_scale() -> None:
    layer = GBLRLinear(48, 40, width_init="full", init_std="fan_in")
    std = 1 / 48 ** 0.5
    assert layer.init_std == pytest.approx(std)
    w = layer.to_dense()
    assert w.abs().max() <= 2 * std + 1e-6
    assert 0.8 * std < w.std() < 0.95 * std
    assert GBLRLinear(96, 8, init_std="fan_in").init_std == pytest.approx(96 ** -0.5)  # the input side's fan-in


def test_reset_parameters_restores_the_initial_structure() -> None:
    layer = GBLRLinear(20, 12, location_init="uniform")
    widths0, locs0 = layer.widths.detach().clone(), layer.locations.detach().clone()
    dense0 = layer.to_dense().detach().clone()
    randomize_structure(layer)
    with torch.no_grad():
        layer.weight_in.mul_(3)
    layer.reset_parameters()
    torch.testing.assert_close(layer.widths.detach(), widths0)
    torch.testing.assert_close(layer.locations.detach(), locs0)
    assert not torch.allclose(layer.to_dense(), dense0)  # fresh random factors
    assert layer.bias.abs().max() <= 1 / math.sqrt(20)
    assert layer.widths.requires_grad and layer.locations.requires_grad and not layer.is_frozen


def test_extra_repr() -> None:
    layer = GBLRLinear(10, 6, bias=False, rank_per_component=2)
    text = repr(layer)
    for part in ("in_features=10", "out_features=6", "bias=False", "rank_per_component=2", "num_components=3",
                 "sigma=inf", "frozen=False"):
        assert part in text, text
    layer.set_sigma(2.5)
    assert "sigma=2.5" in repr(layer)
    layer.set_sigma(None)
    layer.freeze_structure()
    assert "frozen=True" in repr(layer)


def test_set_sigma_validates_and_changes_masks() -> None:
    layer = GBLRLinear(16, 16, location_init="random")
    for bad in (0.0, -3.0, float("nan")):
        with pytest.raises(ValueError, match="sigma"):
            layer.set_sigma(bad)
    with pytest.raises(ValueError, match="sigma"):
        GBLRLinear(4, 4, sigma=-1.0)
    layer.eval()
    with torch.no_grad():
        hard = layer.masks()[0]
        layer.set_sigma(1.0)
        assert float(layer.sigma) == 1.0
        soft = layer.masks()[0]
        assert (soft - hard).abs().max() > 0.1
        layer.set_sigma(math.inf)
        torch.testing.assert_close(layer.masks()[0], hard)
        layer.set_sigma(None)
        assert math.isinf(float(layer.sigma))


# ----------------------------------------------------------------------------------------------- FLOPs
def test_flops_params_and_effective_rank_are_analytic() -> None:
    for rank in (1, 2):
        layer = GBLRLinear(10, 6, rank_per_component=rank, num_components=5)
        w_in = torch.tensor([10, 3, 0, 5, 7])
        w_out = torch.tensor([6, 2, 4, 0, 1])
        with torch.no_grad():
            # off-grid fractions that round to the integers above
            layer.widths.copy_(torch.stack([(w_in + 0.3) / 10, (w_out - 0.2).clamp(min=0) / 6]))
        assert layer.int_widths().tolist() == [w_in.tolist(), w_out.tolist()]
        active = [True, True, False, False, True]
        assert layer.active_components().tolist() == active
        expected = rank * ((10 + 6) + (3 + 2) + (7 + 1))
        assert layer.flops() == expected
        assert layer.dense_flops() == 60
        assert layer.flops_ratio() == pytest.approx(expected / 60)
        assert layer.params() == expected + 6
        assert layer.effective_rank() == 3 * rank
        assert GBLRLinear(10, 6, bias=False, width_init="full").params() == 6 * (10 + 6)


def test_effective_rank_bounds_the_rank() -> None:
    layer = GBLRLinear(24, 18, num_components=18, location_init="random")
    randomize_structure(layer, zero_frac=0.4)
    assert layer.effective_rank() < 18
    rank = int(torch.linalg.matrix_rank(layer.to_dense().double(), rtol=1e-4))  # float32 masks: ~1e-7 noise
    assert rank <= layer.effective_rank()
    full = GBLRLinear(24, 18, num_components=7, width_init="full")
    assert int(torch.linalg.matrix_rank(full.to_dense().double(), rtol=1e-4)) == full.effective_rank() == 7


# ---------------------------------------------------------------------------------------------- freeze
def union_of_boxcars(layer: GBLRLinear) -> torch.Tensor:
    """Boolean (out, in): union over components of (output boxcar) x (input boxcar)."""
    w, loc = layer.int_widths(), layer.int_locations()
    m_in = boxcar_mask(w[0], loc[0], layer.in_features)
    m_out = boxcar_mask(w[1], loc[1], layer.out_features)
    return (m_out.t() @ m_in) > 0


@pytest.mark.parametrize("in_f,out_f,rank", [(20, 12, 1), (12, 20, 1), (17, 17, 2), (9, 3, 1)])
def test_freeze_structure_drops_components_and_keeps_outputs(in_f: int, out_f: int, rank: int) -> None:
    layer = GBLRLinear(in_f, out_f, rank_per_component=rank, sigma=None, location_init="random")
    randomize_structure(layer)
    with torch.no_grad():
        layer.widths[:, 0] = 0.4 / max(in_f, out_f)  # rounds to zero on both sides
    x = torch.randn(4, 3, in_f)
    before = layer(x).detach()
    active = int(layer.active_components().sum())
    structure_before = layer.structure()
    assert active < layer.num_components
    assert layer.freeze_structure() is layer
    assert layer.is_frozen and layer.num_components == active
    assert layer.active_components().all()
    assert not layer.widths.requires_grad and not layer.locations.requires_grad
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    # the integer structure of the kept components is unchanged, widths/locations on the grid
    keep = [i for i, (a, b) in enumerate(zip(*structure_before["widths"])) if a > 0 and b > 0]
    assert layer.int_widths().tolist() == [[row[i] for i in keep] for row in structure_before["widths"]]
    assert layer.int_locations().tolist() == [[row[i] for i in keep] for row in structure_before["locations"]]
    n = torch.tensor([[in_f], [out_f]])
    torch.testing.assert_close(layer.widths * n, torch.round(layer.widths * n))
    # FLOPs of the frozen layer = brute-force count of nonzero entries of the masked factors
    nnz = int((layer.weight_in != 0).sum() + (layer.weight_out != 0).sum())
    v, u = layer.masked_factors()
    assert nnz == int((v != 0).sum() + (u != 0).sum()) == layer.flops()
    # the dense weight lives inside the union of the components' row x column boxcars
    dense = layer.to_dense().detach()
    assert not (dense != 0)[~union_of_boxcars(layer)].any()
    # idempotent; structure gradients off, weight gradients on
    assert layer.freeze_structure() is layer and layer.num_components == active
    layer.train()
    layer(x).sum().backward()
    assert layer.widths.grad is None and layer.locations.grad is None
    assert layer.weight_in.grad is not None and layer.weight_in.grad.abs().sum() > 0


def test_freeze_can_drop_every_component() -> None:
    layer = GBLRLinear(8, 5, width_init=0.01)  # rounds to zero width on both sides
    x = torch.randn(2, 8)
    layer.freeze_structure()
    assert layer.num_components == 0 and layer.flops() == 0
    torch.testing.assert_close(layer(x), layer.bias.expand(2, 5))


def test_freeze_with_gaussian_masks_switches_to_hard_boxcars() -> None:
    layer = GBLRLinear(16, 12, sigma=1.5, location_init="random")
    randomize_structure(layer)
    x = torch.randn(5, 16)
    soft = layer(x).detach()
    layer.set_sigma(None)
    hard = layer(x).detach()
    layer.set_sigma(1.5)
    layer.freeze_structure()
    out = layer(x)
    torch.testing.assert_close(out, hard, atol=1e-5, rtol=1e-5)
    assert (out - soft).abs().max() > 1e-3


def test_freeze_rejects_non_finite_structure() -> None:
    layer = GBLRLinear(6, 6)
    with torch.no_grad():
        layer.widths[0, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        layer.freeze_structure()
    with pytest.raises(FloatingPointError, match="non-finite"):
        layer(torch.randn(2, 6))


# ------------------------------------------------------------------------------------------ mask cache
def test_masks_are_cached_in_eval_and_when_frozen() -> None:
    layer = GBLRLinear(10, 8, location_init="random")
    layer.train()
    a, b = layer.masks(), layer.masks()
    assert a[0] is not b[0] and a[0].requires_grad  # training: fresh masks carrying structure gradients
    layer.eval()
    with torch.no_grad():
        a, b = layer.masks(), layer.masks()
        assert a[0] is b[0] and a[1] is b[1]
        layer.widths.copy_(torch.full_like(layer.widths, 0.5))  # in-place change invalidates
        c = layer.masks()
        assert c[0] is not a[0]
        torch.testing.assert_close(c[0].sum(-1), torch.full((layer.num_components,), 5.0))
        layer.locations.add_(0.1)
        d = layer.masks()
        assert d[0] is not c[0] and not torch.equal(d[0], c[0])
    layer.freeze_structure()
    layer.train()
    a, b = layer.masks(), layer.masks()  # frozen: cached even with gradients enabled
    assert a[0] is b[0] and not a[0].requires_grad
    with torch.no_grad():
        layer.widths[0].fill_(0.2)
    c = layer.masks()
    assert c[0] is not a[0]
    assert c[0].sum(-1).tolist() == [2.0] * layer.num_components


def test_masks_cached_in_inference_mode_do_not_leak_into_training() -> None:
    layer = GBLRLinear(10, 8).freeze_structure()
    layer.invalidate_cache()
    x = torch.randn(3, 10)
    with torch.inference_mode():
        ref = layer(x)
    y = layer(x)  # would fail if inference-mode masks were reused by autograd
    y.sum().backward()
    torch.testing.assert_close(y.detach(), ref.clone())
    assert layer.weight_in.grad is not None


# ---------------------------------------------------------------------------------------- checkpoints
def test_frozen_state_dict_round_trip_into_fresh_layer() -> None:
    src = GBLRLinear(20, 14, sigma=None, location_init="random")
    randomize_structure(src, zero_frac=0.4)
    src.freeze_structure()
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst = GBLRLinear(20, 14, sigma=3.0)
    assert dst.num_components != src.num_components and not dst.is_frozen
    dst.load_state_dict(torch.load(buf))
    assert dst.num_components == src.num_components
    assert dst.is_frozen and not dst.widths.requires_grad and not dst.locations.requires_grad
    assert torch.equal(dst.widths, src.widths) and torch.equal(dst.locations, src.locations)
    assert dst.structure() == src.structure()
    assert dst.flops() == src.flops()
    x = torch.randn(6, 20)
    torch.testing.assert_close(dst(x), src(x), atol=0, rtol=0)
    # and back: an unfrozen checkpoint makes a frozen layer trainable again
    fresh = GBLRLinear(20, 14, sigma=2.0)
    dst.load_state_dict(fresh.state_dict())
    assert not dst.is_frozen and dst.widths.requires_grad and dst.num_components == fresh.num_components
    assert float(dst.sigma) == 2.0
    torch.testing.assert_close(dst(x), fresh(x), atol=0, rtol=0)


def test_loading_a_checkpoint_of_another_shape_raises() -> None:
    src = GBLRLinear(20, 14).freeze_structure()
    for other in (GBLRLinear(14, 20), GBLRLinear(20, 15), GBLRLinear(20, 14, rank_per_component=2)):
        with pytest.raises(RuntimeError, match="another architecture"):
            other.load_state_dict(src.state_dict())
    model = nn.Sequential(GBLRLinear(8, 4))
    with pytest.raises(RuntimeError, match="'0'"):  # names the layer
        model.load_state_dict(nn.Sequential(GBLRLinear(8, 5)).state_dict())


@pytest.mark.parametrize("frozen", [True, False])
def test_restore_structure_round_trips_a_record_into_a_layer_of_another_k(frozen: bool) -> None:
    src = GBLRLinear(20, 14, num_components=9, sigma=None, location_init="random")
    randomize_structure(src, zero_frac=0.3 if frozen else 0.0)
    if frozen:
        src.freeze_structure()
    record = src.structure()
    dst = GBLRLinear(20, 14, num_components=4, sigma=3.0, location_init="random")
    if not frozen:
        dst.freeze_structure()  # the record must also unfreeze
    assert dst.num_components != src.num_components and dst.is_frozen != frozen
    assert dst.restore_structure(record) is dst
    assert dst.structure() == record
    assert dst.is_frozen == frozen and bool(dst.frozen) == frozen
    assert dst.widths.requires_grad == dst.locations.requires_grad == (not frozen)
    assert dst.weight_in.shape == src.weight_in.shape and dst.weight_out.shape == src.weight_out.shape
    assert not dst.weight_in.any() and not dst.weight_out.any()  # factors are not part of a structure: zero
    assert float(dst.sigma) == 3.0
    # the weights load on top, as GSMModule does on resume (structure first, then the state dict)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(5, 20)
    torch.testing.assert_close(dst(x), src(x), atol=0, rtol=0)
    # a structure-file record (no num_components/frozen: it describes a frozen layer) and tensor records read back too
    if frozen:
        plain = {k: record[k] for k in ("in_features", "out_features", "rank_per_component", "widths", "locations")}
        assert GBLRLinear(20, 14).restore_structure(plain).structure() == record
        assert GBLRLinear(20, 14).restore_structure(src.structure(tensors=True)).structure() == record


def test_restore_structure_keeps_factors_when_k_is_unchanged_and_rejects_other_shapes() -> None:
    layer = GBLRLinear(12, 10, num_components=5)
    w_in = layer.weight_in.detach().clone()
    other = GBLRLinear(12, 10, num_components=5, width_init=0.5, location_init="uniform").freeze_structure()
    layer.restore_structure(other.structure())
    assert torch.equal(layer.weight_in, w_in) and layer.structure() == other.structure()
    for bad in (GBLRLinear(10, 12), GBLRLinear(12, 10, rank_per_component=2)):
        with pytest.raises(ValueError, match="in/out/rank"):
            layer.restore_structure(bad.structure())
    with pytest.raises(ValueError, match=r"\(2, K\)"):
        layer.restore_structure({**other.structure(), "num_components": 4})


def test_bisect_threshold_and_set_submodule() -> None:
    from gsm_lightning.core.flops import bisect_threshold
    from gsm_lightning.core.modules import set_submodule

    seen = []
    tau = bisect_threshold(lambda t: seen.append(t) or t >= 0.3, 0.0, 1.0, 40)
    assert seen[:3] == [0.5, 0.25, 0.375] and len(seen) == 40 and 0.3 <= tau < 0.3 + 2 ** -39
    assert bisect_threshold(lambda t: True, 0.0, 0.7, 0) == 0.7
    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 4)))
    new = GBLRLinear(3, 4)
    set_submodule(model, "1.1", new)
    assert model[1][1] is new
    with pytest.raises(AttributeError):
        set_submodule(model, "2.x", new)
    root = nn.Module()
    set_submodule(root, "backbone.blocks.0.q", new, create_parents=True)
    set_submodule(root, "backbone.blocks.1", nn.ReLU(), create_parents=True)
    assert root.get_submodule("backbone.blocks.0.q") is new
    assert [n for n, _ in root.named_modules()] == ["", "backbone", "backbone.blocks", "backbone.blocks.0",
                                                    "backbone.blocks.0.q", "backbone.blocks.1"]


# ------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("sigma", [None, 1.0, 30.0])
def test_gradients_reach_weights_widths_and_locations(sigma: float | None) -> None:
    layer = GBLRLinear(12, 10, sigma=sigma, location_init="random")
    layer.train()
    x = torch.randn(7, 12)
    target = torch.randn(7, 10)
    ((layer(x) - target) ** 2).mean().backward()
    for name in ("weight_in", "weight_out", "widths", "locations", "bias"):
        grad = getattr(layer, name).grad
        assert grad is not None, name
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name


def test_pruned_component_receives_width_gradient() -> None:
    layer = GBLRLinear(12, 10, sigma=None, location_init="random")
    with torch.no_grad():
        layer.widths[:, 3] = torch.tensor([0.0, 0.5])  # input side pruned, output side alive
    x = torch.randn(7, 12)
    y = layer(x)
    torch.testing.assert_close(y, reference_output(layer, x))
    ((y - torch.randn(7, 10)) ** 2).mean().backward()
    assert torch.isfinite(layer.widths.grad).all()
    assert layer.widths.grad[0, 3].abs() > 0
    # with both sides pruned the product rule gives no gradient to either width (as in the reference)
    layer.zero_grad()
    with torch.no_grad():
        layer.widths[:, 3] = 0.0
    ((layer(x) - torch.randn(7, 10)) ** 2).mean().backward()
    assert (layer.widths.grad[:, 3] == 0).all()


@pytest.mark.parametrize("sigma", [None, 10.0, 1.0])
@pytest.mark.parametrize("tokens", [3, 64])
def test_components_empty_on_both_sides_are_left_out_exactly(sigma, tokens):
    """Phase-1 forward skips the components whose two widths round to 0: same output and the same gradients of
    every parameter as the full computation over all K components (issue 26)."""
    torch.manual_seed(0)
    layer = GBLRLinear(24, 40, num_components=10, width_init=0.5, location_init="random")
    layer.set_sigma(sigma)
    with torch.no_grad():
        layer.widths[:, :4] = 0.0                       # empty on both sides: left out
        layer.widths[0, 4] = 0.0                        # empty input side only: kept (its width gradient is not 0)
        layer.widths[1, 5] = 0.01                       # rounds to 0 on the output side (0.4 of a row) ...
        layer.widths[0, 5] = 0.01                       # ... and on the input side (0.24 of a column): left out
    assert layer.live_components().tolist() == [4, 6, 7, 8, 9]
    x = torch.randn(tokens, 24)
    gy = torch.randn(tokens, 40)

    def grads(fn):
        layer.zero_grad(set_to_none=True)
        y = fn(x)
        (y * gy).sum().backward()
        return y.detach(), {n: p.grad.detach().clone() for n, p in layer.named_parameters()}

    def full(x):
        v, u = layer.masked_factors()
        return torch.nn.functional.linear(torch.nn.functional.linear(x, v), u.t(), layer.bias)

    y_live, g_live = grads(layer)
    y_full, g_full = grads(full)
    torch.testing.assert_close(y_live, y_full, rtol=1e-5, atol=1e-6)
    for name in g_full:
        torch.testing.assert_close(g_live[name], g_full[name], rtol=1e-5, atol=1e-6, msg=name)
    assert float(g_full["widths"][:, :4].abs().max()) == 0.0  # why skipping is exact
    assert float(g_full["widths"][0, 4].abs()) > 0              # why a one-sided empty component is kept
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y_full, rtol=1e-5, atol=1e-6)  # no-grad path: cached masks' rows
        layer.widths[:, 0] = 0.5                        # regrown in place: the live set follows the widths
    assert layer.live_components().tolist() == [0, 4, 6, 7, 8, 9]
    with torch.inference_mode():  # a validation loop, then training again: the index made there is not reused
        layer(x)
    y_live, g_live = grads(layer)
    torch.testing.assert_close(g_live["widths"], grads(full)[1]["widths"], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        layer.widths.fill_(0.5)
    assert layer.live_components() is None
