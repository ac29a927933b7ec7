"""FlopCounterMode sees the true (analytic) FLOPs of frozen GBLR layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from gsm_lightning.core.layer import GBLRLinear
from gsm_lightning.infer.flop_count import (
    count_flops,
    expected_flops,
    flop_breakdown,
    frozen_forward,
    gblr_flop_counting,
    gblr_linear,
    is_flop_counting,
    side_macs,
)


def frozen(n_in: int, n_out: int, width: float = 0.3, **kwargs) -> GBLRLinear:
    layer = GBLRLinear(n_in, n_out, width_init=width, location_init="random", **kwargs)
    with torch.no_grad():  # distinct widths per component, some inactive
        layer.widths.mul_(torch.rand_like(layer.widths) * 1.5)
    return layer.freeze_structure()


def plain_count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_side_macs_sum_to_flops():
    layer = frozen(40, 56, rank_per_component=2)
    macs_in, macs_out = side_macs(layer)
    w = layer.int_widths()
    assert macs_in + macs_out == layer.flops()
    assert macs_in == 2 * int(w[0].sum()) and macs_out == 2 * int(w[1].sum())  # frozen: every kept component active


def test_forward_count_equals_analytic_and_values_match():
    layer = frozen(64, 48)
    x = torch.randn(5, 7, 64)
    tokens = 35
    v, u = layer.masked_factors()
    dense_count = plain_count(lambda: F.linear(F.linear(x, v), u.t(), layer.bias))  # what the layer computes
    ref = layer(x)
    with gblr_flop_counting(layer) as swapped, FlopCounterMode(display=False) as counter:
        out = layer(x)
    assert swapped == [layer]
    assert counter.get_total_flops() == 2 * tokens * layer.flops() == expected_flops(layer, tokens)
    assert dense_count != counter.get_total_flops()  # the default count is the dense masked product
    torch.testing.assert_close(out, ref)
    assert "forward" not in layer.__dict__  # restored


def test_backward_counts_and_gradients():
    layer = frozen(64, 48)
    macs_in, macs_out = side_macs(layer)
    x = torch.randn(3, 64, requires_grad=True)
    g = torch.randn(3, 48)
    params = (x, layer.weight_in, layer.weight_out, layer.bias)

    (layer(x) * g).sum().backward()
    ref = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    with FlopCounterMode(display=False) as counter:
        (frozen_forward(layer, x) * g).sum().backward()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r)
    # forward 2T(S_in+S_out); backward dh, dx, dV, dU = 2T(S_out + S_in + S_in + S_out)
    assert counter.get_total_flops() == 6 * 3 * layer.flops() == expected_flops(layer, 3, backward=True)

    x_nograd = torch.randn(3, 64)
    with FlopCounterMode(display=False) as counter:
        frozen_forward(layer, x_nograd).sum().backward()
    # no dx: forward + dh + dV + dU
    assert counter.get_total_flops() == 2 * 3 * (layer.flops() + macs_out + macs_in + macs_out)


def test_model_with_several_layers():
    torch.manual_seed(1)
    a, b = frozen(32, 64, rank_per_component=2), frozen(64, 24)
    learning = GBLRLinear(24, 16, width_init=0.5)  # not frozen: counted as the dense masked products it computes
    head = nn.Linear(16, 10)
    model = nn.Sequential(a, nn.GELU(), b, nn.ReLU(), learning, head)
    x = torch.randn(2, 9, 32)
    t = 18
    h = b(torch.relu(a(x)))  # input of the learning layer, to count it alone
    learning_count = plain_count(lambda: learning(torch.relu(h)))
    total = count_flops(model, x)
    assert total == 2 * t * (a.flops() + b.flops()) + learning_count + 2 * t * 16 * 10

    br = flop_breakdown(model, x)
    assert br["flops"] == total
    assert br["layers"]["0"]["tokens"] == t and br["layers"]["0"]["counted"] == 2 * t * a.flops()
    assert br["layers"]["4"]["counted"] == learning_count and not br["layers"]["4"]["frozen"]
    assert br["analytic_flops"] == 2 * t * (a.flops() + b.flops() + learning.flops() + 160)
    assert br["dense_flops"] == 2 * t * (32 * 64 + 64 * 24 + 24 * 16 + 160)
    assert br["ratio"] == pytest.approx(br["analytic_flops"] / br["dense_flops"])


def test_lightning_measure_flops_and_model_summary():
    from lightning.fabric.utilities.throughput import measure_flops
    from lightning.pytorch import LightningModule
    from lightning.pytorch.utilities.model_summary import ModelSummary

    class Net(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(frozen(32, 48), nn.GELU(), nn.Linear(48, 10))
            self.example_input_array = torch.randn(6, 32)

        def forward(self, x):
            return self.net(x)

    model = Net()
    x = model.example_input_array
    want = 2 * 6 * (model.net[0].flops() + 48 * 10)
    with gblr_flop_counting(model):
        assert measure_flops(model, lambda: model(x)) == want
        # backward: head dx and dW; GBLR layer (input needs no grad): dh, dV, dU
        macs_in, macs_out = side_macs(model.net[0])
        assert measure_flops(model, lambda: model(x), lambda y: y.sum()) == want + 2 * 6 * (
            2 * 48 * 10 + macs_out + macs_in + macs_out)
        assert ModelSummary(model).total_flops == want


def test_frozen_layer_forward_routes_through_the_counted_operator():
    """The real eager forward of a frozen layer (no context manager, no patch): while a FlopCounterMode is active it
    computes through ``gsm_lightning::gblr_linear`` (installed by ``set_frozen_route`` on import), so
    ``measure_flops`` and ``ModelSummary`` charge the true cost; the values are those of the uncounted forward."""
    from lightning.fabric.utilities.throughput import measure_flops

    from gsm_lightning.core.layer import set_frozen_route

    model = nn.Sequential(frozen(32, 48), nn.GELU(), nn.Linear(48, 10))
    x = torch.randn(6, 32)
    want = 2 * 6 * (model[0].flops() + 48 * 10)
    assert "forward" not in model[0].__dict__ and GBLRLinear.forward.__module__ == "gsm_lightning.core.layer"
    with torch.no_grad():
        ref = model(x)
        with FlopCounterMode(display=False) as counter:
            out = model(x)
    assert counter.get_total_flops() == want
    ops = {str(op) for op in counter.get_flop_counts()["Global"]}
    assert "gsm_lightning.gblr_linear" in ops, ops
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert measure_flops(model, lambda: model(x)) == want
    # the route is what makes the difference: without it the counter sees the dense masked products
    previous = set_frozen_route(None)
    try:
        assert plain_count(lambda: model(x)) != want
    finally:
        set_frozen_route(previous)
    assert plain_count(lambda: model(x)) == want
    # a layer that still learns its structure is never routed (it really computes the masked dense products)
    learning = GBLRLinear(32, 48, width_init=0.3)
    with FlopCounterMode(display=False) as counter:
        learning(x)
    assert "gsm_lightning.gblr_linear" not in {str(op) for op in counter.get_flop_counts()["Global"]}


def test_forward_restored_after_error_and_nested_swaps():
    layer = frozen(16, 16)
    with pytest.raises(RuntimeError, match="boom"), gblr_flop_counting(layer):
        raise RuntimeError("boom")
    assert "forward" not in layer.__dict__
    with gblr_flop_counting(layer) as outer:
        with gblr_flop_counting(layer) as inner:
            assert outer == [layer] and inner == []
        assert "forward" in layer.__dict__
    assert "forward" not in layer.__dict__


def test_is_flop_counting():
    assert not is_flop_counting()
    with FlopCounterMode(display=False):
        assert is_flop_counting()
    assert not is_flop_counting()


def test_errors():
    with pytest.raises(ValueError, match="frozen"):
        frozen_forward(GBLRLinear(8, 8), torch.randn(2, 8))
    layer = frozen(8, 8)
    with pytest.raises(ValueError, match="last dimension"):
        frozen_forward(layer, torch.randn(2, 7))
    v, u = layer.masked_factors()
    with pytest.raises(ValueError, match="same first dimension"):
        gblr_linear(torch.randn(2, 8), v, u[:-1], None, 1, 1)
    with pytest.raises(ValueError, match=">= 0"):
        gblr_linear(torch.randn(2, 8), v, u, None, -1, 1)
    with pytest.raises(ValueError, match="requires grad"):
        count_flops(nn.Identity(), torch.randn(2, 8), backward=True)


def test_opcheck():
    layer = frozen(12, 20)
    v, u = (t.detach().requires_grad_() for t in layer.masked_factors())
    x = torch.randn(3, 12, requires_grad=True)
    result = torch.library.opcheck(torch.ops.gsm_lightning.gblr_linear.default, (x, v, u, None, *side_macs(layer)))
    assert all(r == "SUCCESS" for r in result.values())


def test_autocast():
    layer = frozen(32, 48)
    model = nn.Sequential(nn.Linear(16, 32), layer)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x)
        with gblr_flop_counting(model):
            out = model(x)
        assert count_flops(model, x) == 2 * 4 * (16 * 32 + layer.flops())
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
