"""Dense -> GBLR conversion: GBLRLinear.from_linear and gsmify on torchvision ViT, an MLP-Mixer and HF GPT-2."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gsm_lightning import GBLRLinear, gsmify, model_flops, select_linear_layers

transformers = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402


def rel_error(layer: GBLRLinear, weight: torch.Tensor) -> float:
    with torch.no_grad():
        return float((layer.to_dense() - weight).pow(2).sum() / weight.pow(2).sum())


# ------------------------------------------------------------------------------------------- from_linear
@pytest.mark.parametrize("in_f,out_f", [(16, 16), (24, 10), (10, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_full_budget_is_lossless(in_f: int, out_f: int, bias: bool) -> None:
    lin = nn.Linear(in_f, out_f, bias=bias)
    layer = GBLRLinear.from_linear(lin, budget=1.0)
    assert (layer.in_features, layer.out_features) == (in_f, out_f)
    assert (layer.bias is None) == (not bias)
    assert layer.num_components == min(in_f, out_f) and math.isinf(float(layer.sigma))
    x = torch.randn(2, 5, in_f)
    torch.testing.assert_close(layer(x), lin(x), atol=1e-5, rtol=1e-4)
    assert rel_error(layer, lin.weight) < 1e-10
    # the source layer is untouched
    assert isinstance(lin, nn.Linear) and lin.weight.requires_grad


@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_hf_conv1d(bias: bool) -> None:
    conv = Conv1D(24, 16)  # nf=out, nx=in: weight stored as (in, out)
    nn.init.normal_(conv.weight, std=0.1)
    nn.init.normal_(conv.bias, std=0.1)
    if not bias:
        conv.bias = None
    x = torch.randn(3, 7, 16)
    expected = x @ conv.weight + (conv.bias if bias else 0)
    layer = GBLRLinear.from_linear(conv, budget=1.0)
    assert (layer.in_features, layer.out_features) == (16, 24)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-4)
    if bias:
        torch.testing.assert_close(layer(x), conv(x), atol=1e-5, rtol=1e-4)


def test_from_linear_budget_fit_respects_budget_and_improves() -> None:
    lin = nn.Linear(32, 24)
    w = lin.weight.detach()
    start, fitted = GBLRLinear.from_linear(lin), GBLRLinear.from_linear(lin)
    e0 = start.fit_to(w, 0.3, steps=0)  # projection onto the budget only
    e1 = fitted.fit_to(w, 0.3, steps=100)
    for layer in (start, fitted):
        assert layer.flops_ratio() <= 0.3
        assert layer.flops() > 0
    assert 0 < e1 < e0 < 1.5, (e0, e1)
    assert e1 < 0.95 * e0, (e0, e1)
    torch.testing.assert_close(fitted.bias, lin.bias)


def test_pretrained_fit_moves_widths_and_locations() -> None:
    """The conversion fit learns the structure, not only the factors: locations move (only the fit's optimizer moves
    them) and the widths spread out, where projecting onto the budget alone cuts every width alike."""
    torch.manual_seed(0)
    lin = nn.Linear(32, 24)
    w = lin.weight.detach()
    projected, fitted = GBLRLinear.from_linear(lin), GBLRLinear.from_linear(lin)  # full widths, evenly spaced
    locations0 = fitted.int_locations().clone()
    projected.fit_to(w, 0.3, steps=0)
    fitted.fit_to(w, 0.3, steps=100)
    assert len(set(projected.int_widths()[0].tolist())) == 1  # the projection: one common width
    assert int((fitted.int_locations() != locations0).sum()) > 0
    assert len(set(fitted.int_widths()[0].tolist())) > 1, fitted.int_widths()
    assert fitted.flops_ratio() <= 0.3


def test_from_linear_is_never_worse_than_equal_cost_truncated_svd() -> None:
    for shape in ((32, 24), (24, 64)):
        lin = nn.Linear(*shape)
        w = lin.weight.detach()
        s = torch.linalg.svdvals(w)
        for budget in (0.3, 0.5):
            layer = GBLRLinear.from_linear(lin, budget=budget, fit_steps=50)
            rank = int(budget * w.numel() // sum(w.shape))
            svd_error = float(s[rank:].pow(2).sum() / s.pow(2).sum())
            assert layer.flops_ratio() <= budget
            assert rel_error(layer, w) <= svd_error + 1e-5, (shape, budget)


def test_from_linear_rejects_width_init() -> None:
    with pytest.raises(ValueError, match="width_init"):
        GBLRLinear.from_linear(nn.Linear(8, 8), budget=0.5, width_init="splr")


def test_from_linear_rejects_bad_budget() -> None:
    lin = nn.Linear(8, 8)
    for bad in (0.0, -0.2, 1.5, float("nan")):
        with pytest.raises(ValueError, match="budget"):
            GBLRLinear.from_linear(lin, budget=bad)


# ------------------------------------------------------------------------------------------------- gsmify
def small_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64,
                                                mlp_dim=128, num_classes=10)


VIT_CANDIDATES = [f"encoder.layers.encoder_layer_{i}.mlp.{j}" for i in range(2) for j in (0, 3)] + ["heads.head"]


def test_gsmify_torchvision_vit_pretrained_budget_one_keeps_outputs() -> None:
    model = small_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    # nn.MultiheadAttention reads out_proj.weight directly: not a candidate
    assert select_linear_layers(model) == VIT_CANDIDATES
    report = gsmify(model, budget=1.0)
    assert report.names == VIT_CANDIDATES and len(report) == 5
    modules = dict(model.named_modules())
    for name in VIT_CANDIDATES:
        assert isinstance(modules[name], GBLRLinear), name
        assert not modules[name].training
    for i in range(2):
        out_proj = modules[f"encoder.layers.encoder_layer_{i}.self_attention.out_proj"]
        assert type(out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert sum(isinstance(m, GBLRLinear) for m in model.modules()) == 5
    with torch.no_grad():
        after = model(x)
    assert after.shape == (2, 10)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    assert all(layer.fit_error is not None and layer.fit_error < 1e-8 for layer in report.layers)
    assert report.flops == sum(layer.flops for layer in report.layers)
    assert report.to_dict()["layers"][0]["name"] == VIT_CANDIDATES[0]
    assert "gsmify: 5 layers" in str(report)
    flops = model_flops(model)
    assert flops["dense_flops"] == 2 * (64 * 128 * 2) + 64 * 10
    assert flops["flops"] == report.flops
    assert flops["ratio"] == pytest.approx(report.flops_ratio)


def test_gsmify_vit_random_init_with_patterns() -> None:
    model = small_vit()
    report = gsmify(model, budget=0.5, include="encoder.layers.*.mlp.*", exclude=["re:.*_1\\.mlp\\.3"], init="random")
    assert report.names == VIT_CANDIDATES[:3]
    assert report.init == "random" and report.budget == 0.5
    assert isinstance(model.heads.head, nn.Linear)
    assert not isinstance(model.encoder.layers.encoder_layer_1.mlp[3], GBLRLinear)
    assert model.training
    for name in report.names:
        layer = model.get_submodule(name)
        assert isinstance(layer, GBLRLinear) and layer.training
        assert 0 <= layer.dense_flops() - layer.flops() <= 2 * layer.num_components  # splr: dense cost, never above
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert model.encoder.layers.encoder_layer_0.mlp[0].widths.grad is not None


class MixerBlock(nn.Module):
    def __init__(self, num_patches: int, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mix = nn.Sequential(nn.Linear(num_patches, 2 * num_patches), nn.GELU(), nn.Linear(2 * num_patches, num_patches))
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mix = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, dim)
        x = x + self.token_mix(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mix(self.norm2(x))


class TinyMixer(nn.Module):
    def __init__(self, num_patches: int = 16, dim: int = 24, depth: int = 2, num_classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.blocks = nn.Sequential(*[MixerBlock(num_patches, dim) for _ in range(depth)])
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(x).mean(1))


def test_gsmify_mlp_mixer() -> None:
    model = TinyMixer().eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
    mixing = [f"blocks.{b}.{kind}.{j}" for b in range(2) for kind in ("token_mix", "channel_mix") for j in (0, 2)]
    report = gsmify(model, budget=1.0, include=r"re:blocks\.\d+\.(token|channel)_mix\.\d+")
    assert report.names == mixing
    assert isinstance(model.head, nn.Linear) and not isinstance(model.head, GBLRLinear)
    token_fc1 = model.blocks[0].token_mix[0]
    assert isinstance(token_fc1, GBLRLinear) and (token_fc1.in_features, token_fc1.out_features) == (16, 32)
    with torch.no_grad():
        after = model(x)
    assert after.shape == (3, 5)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    # glob: only the channel-mixing MLPs of a fresh model
    fresh = TinyMixer()
    names = gsmify(fresh, include="blocks.*.channel_mix.*", init="random").names
    assert names == [n for n in mixing if "channel" in n]


def small_gpt2() -> nn.Module:
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


GPT2_TARGETS = [f"transformer.h.{i}.{name}" for i in range(2) for name in ("attn.c_attn", "mlp.c_fc", "mlp.c_proj")]


@pytest.mark.parametrize("include", [
    ["*c_attn", "*mlp.c_fc", "*mlp.c_proj"],
    [r"re:transformer\.h\.\d+\.(attn\.c_attn|mlp\.c_(fc|proj))"],
])
def test_gsmify_hf_gpt2(include: list[str]) -> None:
    model = small_gpt2()
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    report = gsmify(model, budget=1.0, include=include)
    assert report.names == GPT2_TARGETS
    assert all(layer.kind == "Conv1D" for layer in report.layers)
    shapes = [(layer.in_features, layer.out_features) for layer in report.layers]
    assert shapes == [(64, 192), (64, 256), (256, 64)] * 2
    for name in GPT2_TARGETS:
        assert isinstance(model.get_submodule(name), GBLRLinear)
    for i in range(2):
        assert isinstance(model.get_submodule(f"transformer.h.{i}.attn.c_proj"), Conv1D)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        after = model(ids).logits
    assert after.shape == (2, 12, 100)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_gsmify_gpt2_under_budget() -> None:
    model = small_gpt2()
    report = gsmify(model, budget=0.3, include=["*c_attn", "*mlp.c_fc", "*mlp.c_proj"], fit_steps=5)
    assert report.flops_ratio <= 0.3
    assert all(layer.flops_ratio <= 0.3 and 0 < layer.fit_error < 1 for layer in report.layers)
    logits = model(torch.randint(0, 100, (1, 8))).logits
    assert logits.shape == (1, 8, 100) and torch.isfinite(logits).all()


# ------------------------------------------------------------------------------------------------- errors
def test_gsmify_errors() -> None:
    model = TinyMixer()
    with pytest.raises(ValueError, match=r"include pattern 'blocks\.\*\.attn' matches no linear layer"):
        gsmify(model, include=["blocks.*.token_mix.*", "blocks.*.attn"])
    with pytest.raises(ValueError, match="exclude pattern 're:nothing' matches no linear layer"):
        gsmify(model, exclude="re:nothing")
    with pytest.raises(ValueError, match="leaves no layer"):
        gsmify(model, include="head", exclude="head")
    for bad in (0, 0.0, 1.5, float("nan"), -1, True, "0.5"):
        with pytest.raises(ValueError, match="budget"):
            gsmify(model, budget=bad)
    with pytest.raises(ValueError, match="unknown init 'svd'"):
        gsmify(model, init="svd")
    with pytest.raises(ValueError, match="has no linear layers"):
        gsmify(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    with pytest.raises(ValueError, match="has no linear layers"):
        gsmify(nn.MultiheadAttention(8, 2))  # out_proj is used through .weight: not convertible
    # nothing was replaced by the failed calls
    assert not any(isinstance(m, GBLRLinear) for m in model.modules())
