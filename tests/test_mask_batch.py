"""core.mask_batch: the masks of all layers in one call per mask length give the per-layer masks and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gsm_lightning import GBLRLinear
from gsm_lightning.core.layer import gblr_layers
from gsm_lightning.core.mask_batch import prepare_masks, release_masks


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(GBLRLinear(16, 24), nn.GELU(), GBLRLinear(24, 16), nn.GELU(), GBLRLinear(16, 24),
                        nn.GELU(), GBLRLinear(24, 5))
    with torch.no_grad():
        net[2].widths[:, :3] = 0.0  # dead components: the layer works on its live ones only
        net[4].widths[0, 1:4] = 0.4
    for i, m in enumerate(gblr_layers(net)):
        m[1].set_sigma(3.0 if i < 3 else None)  # two sigma values: separate groups
    return net


def _grads(net: nn.Module, x: torch.Tensor, prepare: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    net.zero_grad()
    if prepare:
        assert prepare_masks(net) == 4
    y = net(x)
    release_masks(net)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}


def test_prepared_masks_give_the_per_layer_outputs_and_gradients() -> None:
    net = _model()
    x = torch.randn(7, 16)
    y0, g0 = _grads(net, x, prepare=False)
    calls = []
    from gsm_lightning.core import layer as layer_module
    from gsm_lightning.core import mask_batch

    real = mask_batch.gaudi_mask
    mask_batch.gaudi_mask = lambda *a, **k: calls.append(a[2]) or real(*a, **k)
    layer_module.gaudi_mask = lambda *a, **k: calls.append(("layer", a[2])) or real(*a, **k)
    try:
        y1, g1 = _grads(net, x, prepare=True)
    finally:
        mask_batch.gaudi_mask = layer_module.gaudi_mask = real
    # one call per (length, sigma) over the 8 sides (16/24 at sigma 3, 24/5 at inf), and none in the layers' forward
    assert sorted(calls) == [5, 16, 24, 24]
    torch.testing.assert_close(y1, y0, atol=1e-6, rtol=1e-6)
    assert g1.keys() == g0.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-5, msg=name)
    assert g0["2.widths"][:, :3].abs().sum() == 0 and g1["2.widths"][:, :3].abs().sum() == 0


def test_a_structure_changed_after_preparing_is_not_served_stale_masks() -> None:
    net = _model()
    x = torch.randn(3, 16)
    prepare_masks(net)
    with torch.no_grad():
        net[0].widths.mul_(0.5)  # after prepare_masks: its masks are outdated
    y = net(x)
    release_masks(net)
    fresh = _model()
    with torch.no_grad():
        fresh[0].widths.mul_(0.5)
    torch.testing.assert_close(y, fresh(x))


def test_prepared_masks_are_used_once_and_released() -> None:
    net = _model()
    x = torch.randn(3, 16)
    prepare_masks(net)
    net[:3](x)  # the forward reaches the first two layers only
    assert [m._prepared_masks is None for _, m in gblr_layers(net)] == [True, True, False, False]
    release_masks(net)
    assert all(m._prepared_masks is None for _, m in gblr_layers(net))
    copy.deepcopy(net)  # no graph left on the layers (a non-leaf tensor would not deepcopy)
    # a second forward without preparing computes its own masks: same output as the first
    torch.testing.assert_close(net(x), _model()(x))


def test_nothing_is_prepared_without_grad_or_for_frozen_or_fixed_structure() -> None:
    net = _model()
    with torch.no_grad():
        assert prepare_masks(net) == 0
    net[0].freeze_structure()
    net[2].widths.requires_grad_(False)
    net[2].locations.requires_grad_(False)
    assert prepare_masks(net) == 2
    release_masks(net)


def test_non_finite_structure_is_named_when_preparing() -> None:
    net = _model()
    with torch.no_grad():
        net[4].widths[1, 2] = float("nan")
    net[4]._gsm_name = "blocks.2.fc"
    with pytest.raises(FloatingPointError, match=r"non-finite widths \(output side, components \[2\]\) in layer 'blocks.2.fc'"):
        prepare_masks(net)


def test_gsm_module_training_step_with_and_without_batched_masks_agree() -> None:
    from gsm_lightning.training.module import GSMModule

    from .helpers import mlp

    grads = []
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    for batched in (True, False):
        torch.manual_seed(0)
        module = GSMModule(mlp(), num_classes=10, budget=0.4)
        module.batch_masks = batched
        module.log = lambda *a, **k: None
        module.training_step((x, y), 0).backward()
        assert all(m._prepared_masks is None for _, m in gblr_layers(module.backbone))
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(n.endswith("widths") for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_check_structures_leaves_each_layer_its_own_live_index(dtype) -> None:
    """One pass over all layers gives every layer the live index its own live_components computes (dead components
    on either side, a layer with all live, another dtype), cached for the layer's next forward."""
    from gsm_lightning.core.mask_batch import check_structures

    net = _model().to(dtype)
    with torch.no_grad():
        net[0].widths[1, 4:9] = 0.01  # the output side rounds to 0, the input side does not: still live
        net[0].widths[:, 9:11] = 0.02  # both round to 0 (16 * 0.02 and 24 * 0.02 are below 0.5): dead
        net[6].widths[:, 0] = 1.0 / 48  # half a grid step on both sides: rounds to 0 (half to even), dead
    layers = [m for _, m in gblr_layers(net)]
    want = []
    for m in layers:
        m._live_cache = None
        want.append(m.live_components())
        m._live_cache = None
    check_structures(layers)
    for m, w in zip(layers, want):
        cached = m._live_cache[1]
        assert m.live_components() is cached  # served from the cache check_structures left
        assert (w is None and cached is None) or torch.equal(w, cached), (w, cached)
    live0 = set(want[0].tolist())
    assert {4, 5, 6, 7, 8} <= live0 and not {9, 10} & live0  # one side live is live; both rounding to 0 is dead
    assert 0 not in want[3].tolist() and want[2] is None  # half a step rounds to 0; a layer with all live: None
