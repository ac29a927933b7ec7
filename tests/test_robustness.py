"""Numerical robustness (issue 7, item 4): masks, gradients and GBLR layers stay finite and accurate at the
edges (widths 0 and 1, locations at and near 1, tiny and huge n and sigma), under CPU autocast
(bfloat16, float16), after 16-bit module conversion, and in ``bf16-mixed`` / ``bf16-true`` Lightning runs."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from gsm_lightning import GBLRLinear
from gsm_lightning.core.masks import boxcar_mask, gaudi_mask
from gsm_lightning.learn.proximal import proximal_step
from gsm_lightning.training.module import GSMModule

from .helpers import LossRecorder, adamw, digits_loaders

NS = [1, 2, 3, 7, 64, 1000, 4096, 8192]
SIGMAS = [0.5, 1.0, 10.0, 100.0, 1e4, None]
EPS32 = float(torch.finfo(torch.float32).eps)
# Edge widths and locations: exactly 0 and 1, tiny, one ulp below 1, near-1, and an interior value.
EDGE_W = [0.0, 1.0, 1e-30, 1e-7, EPS32, 1.0 - EPS32 / 2, 1.0 - 1e-3, 0.37]
EDGE_L = [0.0, 1.0, 1.0 - EPS32 / 2, 1.0 - 1e-7, 0.999, 1e-30, 0.5, 0.0]


def _edge_grid() -> tuple[torch.Tensor, torch.Tensor]:
    """Leaf tensors (24,): the edge widths paired with the edge locations, and widths exactly 0 and exactly 1
    at every edge location."""
    w = torch.tensor(EDGE_W + [0.0] * len(EDGE_L) + [1.0] * len(EDGE_L))
    loc = torch.tensor(EDGE_L * 3)
    return w.requires_grad_(True), loc.requires_grad_(True)


def _dmask_dwidth_at_zero(loc: torch.Tensor, n: int, sigma: float | None) -> torch.Tensor:
    """Closed form (float64) of dm/dw at w = 0: irfft of exp(i pi k/n - 2 pi i k l - k^2/(2 sigma^2)) / sinc(k/n)."""
    k = torch.arange(n // 2 + 1, dtype=torch.float64)
    gauss = torch.ones_like(k) if sigma is None else torch.exp(-k * k / (2 * sigma * sigma))
    amp = gauss / torch.sinc(k / n)
    phase = math.pi * k / n - 2 * math.pi * k * loc.double().unsqueeze(-1)
    return torch.fft.irfft(torch.complex(amp * torch.cos(phase), amp * torch.sin(phase)), n=n, dim=-1, norm="forward")


# --------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("sigma", SIGMAS, ids=[f"sigma={s}" for s in SIGMAS])
@pytest.mark.parametrize("n", NS)
def test_masks_and_gradients_finite_at_the_edges(n, sigma):
    probe = torch.rand(n, generator=torch.Generator().manual_seed(n))
    for ste in (True, False) if n <= 1000 else (True,):  # layers always round (ste); the raw path on small n
        w, loc = _edge_grid()
        m = gaudi_mask(w, loc, n, sigma, ste=ste)
        assert m.shape == (w.numel(), n) and m.dtype == torch.float32
        assert torch.isfinite(m).all(), f"non-finite mask n={n} sigma={sigma} ste={ste}"
        # mass: sum_j m[j] = n * M[0] = n * w exactly (w on the grid with STE), for every sigma
        mass = (torch.round(w.detach() * n) if ste else w.detach() * n)
        torch.testing.assert_close(m.sum(-1), mass, rtol=1e-4, atol=2e-3 * max(1.0, n / 1000))
        # a blurred or exact boxcar stays in [0, 1]; the unrounded Dirichlet kernel rings (Gibbs) but stays bounded
        if ste and (sigma is None or sigma <= 10):
            lo, hi = float(m.detach().min()), float(m.detach().max())
            assert -1e-2 <= lo and hi <= 1 + 1e-2, (lo, hi)  # spectrum cut at Nyquist: tiny ringing
        assert m.abs().max() <= 1.5
        (m * probe).sum().backward()
        assert torch.isfinite(w.grad).all() and torch.isfinite(loc.grad).all()
        # at width 0 the width gradient is the closed form of dm/dw, finite and nonzero (a pruned component can regrow)
        zero = w.detach() == 0
        loc0 = loc.detach()[zero].double()
        loc0 = torch.round(loc0 * n) / n if ste else loc0  # the forward pass sits at the rounded location
        expected = (_dmask_dwidth_at_zero(loc0, n, sigma) * probe.double()).sum(-1)
        assert (expected.abs() > 1e-3).all()
        # float32 phases k * l (up to n/2 cycles) limit the accuracy to ~1e-3 relative at n = 8192
        torch.testing.assert_close(w.grad[zero].double(), expected, rtol=5e-3, atol=1e-3 * max(1.0, n / 1000))


@pytest.mark.parametrize("n", NS)
def test_pure_dirichlet_on_the_grid_is_the_exact_boxcar_in_float32(n):
    gen = torch.Generator().manual_seed(n)
    widths = torch.cat([torch.tensor([0, 1, n, max(n - 1, 0)]), torch.randint(0, n + 1, (12,), generator=gen)])
    locs = torch.cat([torch.tensor([n - 1, 0, n - 1, 1 % n]), torch.randint(0, n, (12,), generator=gen)])
    m = gaudi_mask(widths.float() / n, locs.float() / n, n, None)
    # float32 phase error grows ~ k * ulp(1): about 2.5e-4 at n = 8192
    torch.testing.assert_close(m, boxcar_mask(widths, locs, n), rtol=0, atol=4e-8 * n + 1e-5)


def test_masks_are_float32_under_autocast_and_from_16_bit_inputs():
    w, loc = torch.rand(6, generator=torch.Generator().manual_seed(0)), torch.rand(6)
    ref = gaudi_mask(w, loc, 1000, 10.0)
    for dt in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dt):
            m = gaudi_mask(w, loc, 1000, 10.0)
        assert m.dtype == torch.float32 and torch.equal(m, ref)
    # bfloat16 fractions are rounded on the grid in float32: 0.30078125 * 1000 = 300.78 -> an exact boxcar of 301
    w16 = torch.tensor([0.3, 0.517, 0.999]).bfloat16()
    l16 = torch.tensor([0.123, 0.77, 0.5]).bfloat16()
    m16 = gaudi_mask(w16, l16, 1000, None)
    ints = torch.round(w16.float() * 1000).long(), torch.round(l16.float() * 1000).long()
    assert m16.dtype == torch.float32
    torch.testing.assert_close(m16, boxcar_mask(*ints, 1000), rtol=0, atol=1e-4)


@pytest.mark.parametrize("sigma", SIGMAS, ids=[f"sigma={s}" for s in SIGMAS])
def test_layer_width_gradient_at_zero_width_is_finite_and_nonzero(sigma):
    """A component pruned on the input side still gets a width gradient (its output side is alive)."""
    torch.manual_seed(0)
    layer = GBLRLinear(64, 96, num_components=6, sigma=sigma, width_init=0.5, location_init="random")
    with torch.no_grad():
        layer.widths[0, :3] = 0.0  # input side of components 0-2 pruned
        layer.widths[1, 4] = 0.0  # output side of component 4 pruned
    x, t = torch.randn(16, 64), torch.randn(16, 96)
    (layer(x) - t).pow(2).mean().backward()
    g = layer.widths.grad
    assert torch.isfinite(g).all() and torch.isfinite(layer.locations.grad).all()
    assert (g[0, :3].abs() > 1e-7).all() and g[1, 4].abs() > 1e-7, g


# -------------------------------------------------------------------------------------- GBLR layers
def _run(layer: GBLRLinear, x: torch.Tensor, t: torch.Tensor, dtype: torch.dtype | None):
    layer.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        y = layer(xx)
        loss = (y.float() - t).pow(2).mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in layer.named_parameters() if p.grad is not None}
    grads["input"] = xx.grad
    return y.detach(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# tolerance on the relative norm error against float32: ~5x the unit roundoff (bf16 2^-8, fp16 2^-11)
AUTOCAST = [(None, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)]


@pytest.mark.parametrize("dtype,tol", AUTOCAST, ids=["float32", "autocast-bf16", "autocast-fp16"])
@pytest.mark.parametrize("state", ["train-sigma1", "train-sigma100", "train-dirichlet", "frozen"])
@pytest.mark.parametrize("mode", ["lowrank", "dense"])
def test_gblr_forward_backward_under_autocast(dtype, tol, state, mode):
    torch.manual_seed(0)
    sigma = {"train-sigma1": 1.0, "train-sigma100": 100.0}.get(state)
    layer = GBLRLinear(64, 96, sigma=sigma, width_init=0.4, location_init="random", forward_mode=mode)
    with torch.no_grad():
        layer.widths[:, :5] = torch.tensor([0.0, 1.0, 1e-6, 1 - 1e-6, 0.5])  # edge widths (before freezing)
        layer.locations[:, :5] = torch.tensor([1.0, 1 - 1e-7, 0.0, 0.999, 1e-7])
    if state == "frozen":
        layer.freeze_structure()
    x, t = torch.randn(32, 64), torch.randn(32, 96)
    y32, g32 = _run(layer, x, t, None)
    y, g = _run(layer, x, t, dtype)
    assert y.dtype == (dtype or torch.float32)
    assert torch.isfinite(y.float()).all() and all(torch.isfinite(v).all() for v in g.values())
    expected = {"weight_in", "weight_out", "bias", "input"} | (set() if state == "frozen" else {"widths", "locations"})
    assert set(g) == expected
    assert layer.masks()[0].dtype == torch.float32  # masks and structure gradients stay float32
    assert _rel(y, y32) < tol, _rel(y, y32)
    for name in g:
        assert g[name].dtype == g32[name].dtype
        assert _rel(g[name], g32[name]) < 1.5 * tol, (name, _rel(g[name], g32[name]))


def test_16_bit_module_conversion_keeps_the_structure_in_float32():
    """``.to(bfloat16)`` / ``.half()`` (and Lightning ``bf16-true``) must not round widths off the grid."""
    for dt in (torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        layer = GBLRLinear(1000, 64, sigma=10.0, width_init=0.3, location_init="random")
        widths, locations, structure = layer.widths.detach().clone(), layer.locations.detach().clone(), layer.structure()
        layer.to(dt)
        assert layer.weight_in.dtype == dt and layer.bias.dtype == dt
        assert layer.widths.dtype == layer.locations.dtype == layer.sigma.dtype == torch.float32
        assert torch.equal(layer.widths, widths) and torch.equal(layer.locations, locations)
        assert layer.structure() == structure and float(layer.sigma) == 10.0
        y = layer(torch.randn(8, 1000, dtype=dt))
        assert y.dtype == dt and torch.isfinite(y).all()
        y.float().pow(2).mean().backward()
        assert layer.widths.grad.dtype == torch.float32 and torch.isfinite(layer.widths.grad).all()
        # a proximal shrink of lambda * lr = 1e-4 survives (in bfloat16 it would round away near 0.3)
        before = layer.widths.detach().clone()
        proximal_step(nn.Sequential(layer), lam=0.02, lr=5e-3, target=0.0)
        torch.testing.assert_close(layer.widths.detach(), (before - 1e-4).clamp(0, 1))
    assert GBLRLinear(8, 8).double().widths.dtype == torch.float64  # float64 conversion is kept


# ------------------------------------------------------------------------------------------ Lightning
@pytest.mark.parametrize("precision,weight_dtype", [("bf16-mixed", torch.float32), ("bf16-true", torch.bfloat16)])
def test_gsm_module_trains_under_bf16_on_cpu(tmp_path, precision, weight_dtype):
    torch.manual_seed(0)
    train, val = digits_loaders(n_train=256, batch_size=64)
    model = GSMModule(nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 10)), num_classes=10, budget=0.4,
                      phase1_epochs=1, prox_lambda=2.0, structure_lr=0.02, sigma0=1.0, sigma1=100.0, optimizer=adamw())
    widths0 = [m.widths.detach().clone() for _, m in model.gblr_layers]
    rec = LossRecorder()
    trainer = pl.Trainer(accelerator="cpu", precision=precision, max_epochs=2, limit_train_batches=3,
                         limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, callbacks=[rec])
    trainer.fit(model, train, val)
    losses = [loss for _, loss in rec.losses]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses), losses
    assert model.real_optimizer_steps == 6
    assert model.phase == 2  # the phase switch ran under autocast too
    for (name, m), w0 in zip(model.gblr_layers, widths0):
        assert m.widths.dtype == torch.float32 and torch.isfinite(m.widths).all(), name
        assert m.weight_in.dtype == weight_dtype and torch.isfinite(m.weight_in).all(), name
        assert m.num_components < w0.shape[1] or not torch.equal(m.widths, w0), name  # structure was learned
    assert math.isfinite(float(trainer.callback_metrics["val/loss"]))
