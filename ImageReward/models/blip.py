"""A compact BLIP: the ViT image encoder and the BERT ("MED") text encoder with cross-attention.

Module and parameter names mirror Salesforce BLIP / the original ImageReward code, so checkpoints load
strictly by name. Attention runs through ``torch.nn.functional.scaled_dot_product_attention``. All sizes
come from the config dataclasses, so tests can build tiny models.

Numerics that matter (``shared/spec/scoring.md`` section 10): the ViT is pre-norm with LayerNorm eps 1e-6,
exact GELU and a fused qkv with bias; BERT is post-norm with eps 1e-12, no token-type embeddings,
bidirectional self-attention with an additive -10000 pad mask, and cross-attention to all image tokens in
every layer.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .kernels import inference_shortcuts_allowed, linear

__all__ = [
    "VisionConfig",
    "TextConfig",
    "BLIPConfig",
    "VisionTransformer",
    "BertModel",
    "BLIP",
]


# --------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class VisionConfig:
    """BLIP ViT sizes. The default is ViT-L/16 at 224 px, as in ImageReward."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6
    drop_path_rate: float = 0.1  # BLIP's "large" always uses 0.1 (inactive in eval)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TextConfig:
    """BERT ("MED") sizes, as in BLIP's ``med_config.json``; ``encoder_width`` is the image width."""

    vocab_size: int = 30524
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0
    encoder_width: int = 1024
    add_cross_attention: bool = True

    @classmethod
    def from_med_config(cls, med_config: Mapping[str, Any] | None = None, *, encoder_width: int = 1024) -> "TextConfig":
        """Build from a ``med_config.json`` mapping (the packaged one when ``None``); ``encoder_width`` wins,
        as in BLIP, which overrides it with the vision width."""
        if med_config is None:
            med_config = json.loads((resources.files("ImageReward") / "assets" / "med_config.json").read_text())
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in med_config.items() if k in known}
        values["encoder_width"] = encoder_width
        return cls(**values)


@dataclass(frozen=True)
class BLIPConfig:
    """A BLIP image-text encoder: ViT + BERT with cross-attention + two 256-d ITC projections."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256

    def __post_init__(self) -> None:
        for part in (self.vision, self.text):  # a hand-edited config.json / med_config fails here, not in torch
            for item in fields(part):
                value = getattr(part, item.name)
                if item.type in ("int", int) and (isinstance(value, bool) or not isinstance(value, int)
                                                  or value < (0 if item.name == "pad_token_id" else 1)):
                    raise ValueError(f"{type(part).__name__}.{item.name} must be a positive integer, got {value!r}")
                if item.type in ("float", float) and (isinstance(value, bool) or not isinstance(value, (int, float))
                                                      or not 0 <= value < float("inf")):
                    raise ValueError(f"{type(part).__name__}.{item.name} must be a finite number >= 0, got {value!r}")
        if self.text.hidden_size % self.text.num_attention_heads or self.vision.width % self.vision.num_heads:
            raise ValueError("hidden sizes must be divisible by their numbers of attention heads")
        if self.text.encoder_width != self.vision.width:
            raise ValueError(
                f"text.encoder_width ({self.text.encoder_width}) must equal vision.width ({self.vision.width})"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BLIPConfig":
        return cls(vision=VisionConfig(**data["vision"]), text=TextConfig(**data["text"]), embed_dim=data["embed_dim"])

    @classmethod
    def tiny(cls, *, image_size: int = 32, patch_size: int = 16) -> "BLIPConfig":
        """A few-kilobyte model with the same structure, for tests."""
        vision = VisionConfig(image_size=image_size, patch_size=patch_size, width=32, depth=2, num_heads=2)
        text = TextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          max_position_embeddings=64, encoder_width=32)
        return cls(vision=vision, text=text, embed_dim=16)


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


# ---------------------------------------------------------------------------------------------- vision
class DropPath(nn.Module):
    """Stochastic depth per sample (training only)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class PatchEmbed(nn.Module):
    def __init__(self, *, patch_size: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)  # [B, num_patches, width]


class Attention(nn.Module):
    """ViT self-attention with one fused ``qkv`` projection laid out as [q | k | v]."""

    def __init__(self, *, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, width * 3, bias=True)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(t, self.num_heads) for t in linear(x, self.qkv).chunk(3, dim=-1))
        return linear(_merge_heads(F.scaled_dot_product_attention(q, k, v)), self.proj)


class Mlp(nn.Module):
    def __init__(self, *, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()  # exact (erf); fused into fc1 by `linear(..., gelu=True)`
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(linear(x, self.fc1, gelu=True), self.fc2)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, config: VisionConfig, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.attn = Attention(width=config.width, num_heads=config.num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = Mlp(width=config.width, hidden=int(config.width * config.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """BLIP's ViT: patch embedding, [CLS], absolute positions, blocks, final LayerNorm; returns all tokens."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.patch_embed = PatchEmbed(patch_size=config.patch_size, width=config.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.width))
        step = config.drop_path_rate / max(config.depth - 1, 1)
        rates = [step * i for i in range(config.depth)]  # linspace(0, rate, depth), as timm
        self.blocks = nn.ModuleList(Block(config, rate) for rate in rates)
        self.norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` normalised pixels -> ``[B, 1 + num_patches, width]``."""
        size = self.config.image_size
        if pixel_values.shape[-2:] != (size, size):
            raise ValueError(f"expected {size}x{size} pixels, got {tuple(pixel_values.shape[-2:])}")
        x = self.patch_embed(pixel_values)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed[:, : x.shape[1]]
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)


# ------------------------------------------------------------------------------------------------ text
class BertEmbeddings(nn.Module):
    """Word + absolute position embeddings -> LayerNorm -> dropout (no token-type embeddings)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)), persistent=True)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_ids[:, : input_ids.shape[1]]
        return self.dropout(self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions)))


class BertSelfAttention(nn.Module):
    """Multi-head attention; keys/values come from ``context`` (width ``kv_width``) when given."""

    def __init__(self, config: TextConfig, *, kv_width: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.dropout_p = config.attention_probs_dropout_prob
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)

    def key_value(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Head-split keys and values of ``source`` (cacheable per image for cross-attention), computed in the
        key/value weights' dtype and returned in the query's (they may differ in reduced-precision mode)."""
        source = source.to(self.key.weight.dtype)
        out_dtype = self.query.weight.dtype
        return (_split_heads(linear(source, self.key).to(out_dtype), self.num_heads),
                _split_heads(linear(source, self.value).to(out_dtype), self.num_heads))

    def attention_through_weights_is_cheaper(self, queries: int, keys: int) -> bool:
        """Whether :meth:`attend_through_weights` costs fewer FLOPs than projecting ``keys`` context tokens to
        keys and values: ``queries * heads * (head_dim + keys) < keys * hidden`` (about 48 queries for 197 image
        tokens), true for one prompt per image."""
        heads, hidden = self.num_heads, self.query.out_features
        return queries * heads * (hidden // heads + keys) < keys * hidden

    def attend_through_weights(self, q: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Attention to ``context`` without projecting it. Per head, ``q . (W_k x + b_k) = (W_k^T q) . x + q . b_k``,
        and the last term is the same for every key so softmax drops it; the attention weights sum to 1, so
        ``sum_t p_t (W_v x_t + b_v) = W_v (sum_t p_t x_t) + b_v``. Exact (up to rounding), in the key/value
        weights' dtype with a float32 softmax. ``q``: ``[B, heads, L, head_dim]``, ``context``: ``[B, T, width]``."""
        dtype = self.key.weight.dtype
        batch, heads, length, head_dim = q.shape
        tokens = context.to(dtype)
        q_in_context = torch.einsum("bhld,hde->bhle", q.to(dtype), self.key.weight.view(heads, head_dim, -1))
        scores = torch.bmm(q_in_context.reshape(batch, heads * length, -1), tokens.transpose(1, 2))
        weights = (scores.float() * head_dim ** -0.5).softmax(dim=-1).to(dtype)
        mixed = torch.bmm(weights, tokens).view(batch, heads, length, -1)
        out = torch.einsum("bhle,hde->bhld", mixed, self.value.weight.view(heads, head_dim, -1)).to(q.dtype)
        return out + self.value.bias.view(heads, 1, head_dim).to(q.dtype)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor | None = None,
                additive_mask: torch.Tensor | None = None,
                key_value: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        q = _split_heads(linear(hidden, self.query), self.num_heads)
        if (key_value is None and context is not None and additive_mask is None and inference_shortcuts_allowed()
                and self.attention_through_weights_is_cheaper(hidden.shape[1], context.shape[1])):
            return _merge_heads(self.attend_through_weights(q, context))
        k, v = key_value if key_value is not None else self.key_value(hidden if context is None else context)
        dropout = self.dropout_p if self.training else 0.0
        return _merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask, dropout_p=dropout))


class BertSelfOutput(nn.Module):
    """Post-norm residual: ``LayerNorm(residual + dropout(dense(x)))``."""

    def __init__(self, config: TextConfig, *, in_features: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(linear(x, self.dense)))


class BertAttention(nn.Module):
    def __init__(self, config: TextConfig, *, kv_width: int) -> None:
        super().__init__()
        self.self = BertSelfAttention(config, kv_width=kv_width)
        self.output = BertSelfOutput(config, in_features=config.hidden_size)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor | None = None,
                additive_mask: torch.Tensor | None = None,
                key_value: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        return self.output(self.self(hidden, context, additive_mask, key_value), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.dense, gelu=True)


class BertLayer(nn.Module):
    """Self-attention, then (multimodal mode) cross-attention to the image tokens, then the FFN."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config, kv_width=config.hidden_size)
        if config.add_cross_attention:
            self.crossattention = BertAttention(config, kv_width=config.encoder_width)
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config, in_features=config.intermediate_size)

    def forward(self, hidden: torch.Tensor, self_mask: torch.Tensor | None, image_embeds: torch.Tensor | None,
                cross_key_value: tuple[torch.Tensor, torch.Tensor] | None = None, *,
                cls_only: bool = False) -> torch.Tensor:
        """``cls_only`` computes the output of the first position only (its self-attention still reads every
        token): enough for a last layer whose [CLS] is all that is used."""
        if cls_only:
            hidden = self.attention(hidden[:, :1], hidden, self_mask)
        else:
            hidden = self.attention(hidden, None, self_mask)
        if image_embeds is not None or cross_key_value is not None:
            images = (image_embeds if cross_key_value is None else cross_key_value[0]).shape[0]
            if images == hidden.shape[0]:
                hidden = self.crossattention(hidden, image_embeds, None, cross_key_value)
            else:
                hidden = self._cross_attend_grouped(hidden, images, image_embeds, cross_key_value)
        return self.output(self.intermediate(hidden), hidden)

    def _cross_attend_grouped(self, hidden: torch.Tensor, images: int, image_embeds: torch.Tensor | None,
                              key_value: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Cross-attention when ``B`` text rows share ``n`` images, rows ``[i*B/n, (i+1)*B/n)`` reading image
        ``i``. Queries attend independently and the rest of the block is row-wise, so the rows of one image are
        laid side by side as one longer sequence: each image's keys and values are computed (or skipped) once,
        and never copied per row."""
        batch, length, width = hidden.shape
        if batch % images:
            raise ValueError(f"{batch} text rows cannot be split evenly over {images} images")
        folded = hidden.reshape(images, (batch // images) * length, width)
        return self.crossattention(folded, image_embeds, None, key_value).reshape(batch, length, width)


class BertEncoder(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertModel(nn.Module):
    """BLIP's text encoder. ``mode="multimodal"`` cross-attends to ``image_embeds``; ``mode="text"`` does not."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
        if isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)

    def cross_attention_key_values(self, image_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the cross-attention keys and values of ``image_embeds``. They depend on the image only,
        so they can be computed once per image and reused for every prompt scored against it."""
        return [layer.crossattention.self.key_value(image_embeds) for layer in self.encoder.layer]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_embeds: torch.Tensor | None = None, *, mode: str = "multimodal",
                cross_key_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                cls_only: bool = False) -> torch.Tensor:
        """Returns ``last_hidden_state`` ``[B, L, hidden]`` (``[B, 1, hidden]``, the [CLS] row, with ``cls_only``).
        In multimodal mode pass ``image_embeds``, or their precomputed ``cross_key_values`` (one ``(k, v)`` per
        layer), for ``B`` images or for ``n`` images, ``n`` dividing the batch: consecutive groups of ``B/n`` rows
        then share one image."""
        if mode not in ("multimodal", "text"):
            raise ValueError(f"mode must be 'multimodal' or 'text', got {mode!r}")
        if mode == "multimodal" and image_embeds is None and cross_key_values is None:
            raise ValueError("mode='multimodal' needs image_embeds or cross_key_values")
        hidden = self.embeddings(input_ids)
        # The original's own mask: (1 - mask) * -10000 in the model dtype, broadcast over heads and queries.
        self_mask = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * -10000.0
        context = image_embeds if mode == "multimodal" and cross_key_values is None else None  # cast where used
        last = len(self.encoder.layer) - 1
        for index, layer in enumerate(self.encoder.layer):
            cached = cross_key_values[index] if mode == "multimodal" and cross_key_values is not None else None
            only_cls = cls_only and index == last
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden = checkpoint(layer, hidden, self_mask, context, cached, cls_only=only_cls, use_reentrant=False)
            else:
                hidden = layer(hidden, self_mask, context, cached, cls_only=only_cls)
        return hidden


# ------------------------------------------------------------------------------------------------ BLIP
class BLIP(nn.Module):
    """``visual_encoder`` + ``text_encoder`` + ``vision_proj``/``text_proj`` (BLIP's ``BLIP_Pretrain`` subset)."""

    def __init__(self, config: BLIPConfig = BLIPConfig()) -> None:
        super().__init__()
        self.config = config
        self.visual_encoder = VisionTransformer(config.vision)
        self.text_encoder = BertModel(config.text)
        self.vision_proj = nn.Linear(config.vision.width, config.embed_dim)
        self.text_proj = nn.Linear(config.text.hidden_size, config.embed_dim)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute encoder activations in backward to save memory (training)."""
        self.visual_encoder.gradient_checkpointing = enabled
        self.text_encoder.gradient_checkpointing = enabled


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Resize a ``[1, 1 + n, C]`` ViT position table to ``1 + num_patches`` tokens (bicubic on the grid),
    as BLIP's ``interpolate_pos_embed`` does when a checkpoint was trained at another resolution."""
    old_tokens = pos_embed.shape[1] - 1
    if old_tokens == num_patches:
        return pos_embed
    old_side, new_side = int(math.sqrt(old_tokens)), int(math.sqrt(num_patches))
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    grid = grid.reshape(1, old_side, old_side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new_side, new_side), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    return torch.cat([cls, grid], dim=1)
