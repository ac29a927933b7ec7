"""torch.compile(fullgraph=True) of GBLRLinear (structure learning and frozen) and CompactGBLR: no graph break.

``fullgraph=True`` raises on any graph break (``bool(tensor)``, ``.item()``, an untraceable call), and
``torch._dynamo.explain`` must report none.  Backends ``eager``/``aot_eager`` need no C++ compiler."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn

from gsm_lightning.core.layer import GBLRLinear
from gsm_lightning.infer.inference import CompactGBLR


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Counting:
    """A dynamo backend (``eager`` or ``aot_eager``) that counts the graphs it compiles."""

    def __init__(self, backend: str = "eager") -> None:
        self.backend = torch._dynamo.lookup_backend(backend)
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.backend(gm, example_inputs)


def assert_no_graph_break(fn, *args) -> None:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()


def learning_layer(**kwargs) -> GBLRLinear:
    kwargs = {"sigma": 3.0, "width_init": 0.5, "location_init": "random", **kwargs}
    return GBLRLinear(24, 40, rank_per_component=2, num_components=8, **kwargs)


def frozen_layer(**kwargs) -> GBLRLinear:
    layer = GBLRLinear(24, 40, num_components=12, location_init="random", **kwargs)
    with torch.no_grad():
        layer.widths.copy_(torch.rand(2, 12) * 0.6 + 0.05)
    return layer.freeze_structure()


def grads(layer: GBLRLinear, x: torch.Tensor, out: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    params = [x, *(p for p in layer.parameters() if p.requires_grad)]
    return list(torch.autograd.grad(out, params, g))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("sigma", [3.0, None])
def test_structure_learning_fullgraph(backend, sigma):
    layer = learning_layer(sigma=sigma)
    assert not layer.is_frozen and layer.widths.requires_grad and layer.locations.requires_grad
    x = torch.randn(3, 5, 24, requires_grad=True)
    assert_no_graph_break(layer, x)
    counting = Counting(backend)
    compiled = torch.compile(layer, fullgraph=True, backend=counting)
    g = torch.randn(3, 5, 40)
    out, ref = compiled(x), layer(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    got, want = grads(layer, x, out, g), grads(layer, x, ref, g)
    assert len(got) == 6  # x, both factors, widths, locations, bias
    assert got[3].abs().sum() > 0 and got[4].abs().sum() > 0  # gradients reach widths and locations
    # eager masks are one closed-form autograd node, the traced ones the op graph: in float32 their structure
    # gradients differ by rounding (against float64 the eager one is off by 9e-6, the graph by 7e-5, on a scale of 8)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # a new sigma (annealing) is read as a tensor: same graph, new masks
    layer.set_sigma(7.5)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)
    assert counting.graphs == 1


def test_structure_learning_training_steps_match_eager():
    torch.manual_seed(1)
    eager = nn.Sequential(learning_layer(), nn.GELU(), GBLRLinear(40, 6, sigma=2.0, width_init=0.7))
    compiled_model = nn.Sequential(learning_layer(), nn.GELU(), GBLRLinear(40, 6, sigma=2.0, width_init=0.7))
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (eager, compiled_model)]
    x, y = torch.randn(16, 24), torch.randn(16, 6)
    for _ in range(3):
        for model, opt in zip((eager, compiled), opts):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    for a, b in zip(eager.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("forward_mode", ["lowrank", "dense", "auto"])
def test_frozen_fullgraph(forward_mode):
    layer = frozen_layer(forward_mode=forward_mode)
    assert layer.is_frozen and not layer.widths.requires_grad
    x = torch.randn(7, 24, requires_grad=True)
    assert_no_graph_break(layer, x)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)
    g = torch.randn(7, 40)
    out, ref = compiled(x), layer(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads(layer, x, out, g), grads(layer, x, ref, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_freeze_after_compile_recompiles():
    """The frozen flag is guarded: freezing a compiled layer switches the graph to the boxcar masks."""
    layer = learning_layer(sigma=None)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    x = torch.randn(4, 24)
    torch.testing.assert_close(compiled(x), layer(x))
    layer.freeze_structure()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)
    assert layer.is_frozen


def test_frozen_flag_mirror_follows_state_dict():
    src, dst = frozen_layer(), GBLRLinear(24, 40, sigma=3.0)
    dst.load_state_dict(src.state_dict())
    assert dst.is_frozen and bool(dst.frozen)
    dst.reset_parameters()
    assert not dst.is_frozen and not bool(dst.frozen)
    assert "frozen" in dst.state_dict()


def _compact_cases():
    torch.manual_seed(2)
    yield "random", CompactGBLR.from_gblr(frozen_layer())
    yield "buckets", CompactGBLR.from_gblr(frozen_layer(), tile_in=4, tile_out=4, max_buckets=8)
    yield "low_rank", CompactGBLR.from_gblr(GBLRLinear.low_rank(24, 40, rank=3).freeze_structure())
    yield "block_diag", CompactGBLR.from_gblr(
        GBLRLinear.from_block_diagonal([torch.randn(8, 8) for _ in range(3)]).freeze_structure())
    yield "blocks", CompactGBLR.from_gblr(frozen_layer(), path="blocks", merge_blocks=False)  # some windows wrap
    yield "blocks_merged", CompactGBLR.from_gblr(frozen_layer(), path="blocks", max_blocks=2)
    yield "tiles_padded_out", CompactGBLR.from_gblr(frozen_layer(), path="tiles", tile_in=24, tile_out=16)
    yield "fallback", CompactGBLR.from_gblr(frozen_layer(), path="blocks").set_dense_fallback(10)  # 18 vs 9 tokens
    # one whole block (the two-gemm fast path), its rank 3 padded to 8
    yield "whole_block_padded", CompactGBLR.from_gblr(GBLRLinear.low_rank(24, 40, rank=3).freeze_structure(),
                                                      path="blocks", rank_multiple=8)
    yield "blocks_padded", CompactGBLR.from_gblr(frozen_layer(), path="blocks", max_blocks=2, rank_multiple=8)


@pytest.mark.parametrize("case", ["random", "buckets", "low_rank", "block_diag", "blocks", "blocks_merged",
                                  "tiles_padded_out", "fallback", "whole_block_padded", "blocks_padded"])
def test_compact_fullgraph(case):
    compact = dict(_compact_cases())[case]
    x = torch.randn(2, 9, compact.in_features)
    assert_no_graph_break(compact, x)
    compiled = torch.compile(compact, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), compact(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(compiled(x[0]), compact(x[0]), rtol=1e-5, atol=1e-6)


def test_model_with_mixed_layers_fullgraph():
    model = nn.Sequential(frozen_layer(), nn.ReLU(), CompactGBLR.from_gblr(
        GBLRLinear(40, 24, num_components=10, width_init=0.4, location_init="random").freeze_structure()),
        nn.ReLU(), GBLRLinear(24, 5, sigma=4.0, width_init=0.5))
    x = torch.randn(6, 24)
    assert_no_graph_break(model, x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
