"""A tiny CLIP in OpenAI's module layout and key names, written for the tests.

It follows the published architecture of ``clip.model.CLIP`` (ViT variant): ``nn.MultiheadAttention``
with fused ``in_proj``, quick-GELU MLP ``c_fc``/``c_proj``, pre-norm blocks, ``ln_post`` on the class
token then ``@ proj``, text pooled at ``argmax(ids)`` then ``@ text_projection``. The tests use it to make
OpenAI-format state dicts and TorchScript archives and as an independent reference for the converter.
With ``hparams["hidden_act"] == "gelu"`` and ``hparams["vision_heads"]`` it is open_clip's ``CLIP`` (the
same key names; exact GELU; vision heads of another width), the layout of HPSv2's checkpoints, without
OpenAI's three scalar buffers.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, causal: int = 0, exact_gelu: bool = False) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        gelu = nn.GELU() if exact_gelu else _QuickGELU()
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", gelu),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [L, N, D]
        mask = None
        if self.causal:
            mask = torch.full((x.shape[0], x.shape[0]), float("-inf")).triu_(1)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, causal: bool, exact_gelu: bool = False) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*[_Block(width, heads, int(causal), exact_gelu) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class _Visual(nn.Module):
    def __init__(self, resolution: int, patch: int, width: int, layers: int, out: int, heads: int,
                 exact_gelu: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn((resolution // patch) ** 2 + 1, width) * width ** -0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = _Transformer(width, layers, heads, causal=False, exact_gelu=exact_gelu)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, out) * width ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj


class OpenAICLIP(nn.Module):
    """``hparams`` as in ``clip.model.build_model`` (see ``ImageReward.models.clip.VIT_L_14``)."""

    def __init__(self, hp: dict) -> None:
        super().__init__()
        exact_gelu = hp.get("hidden_act", "quick_gelu") == "gelu"
        self.visual = _Visual(hp["image_resolution"], hp["vision_patch_size"], hp["vision_width"],
                              hp["vision_layers"], hp["embed_dim"], hp.get("vision_heads", hp["vision_width"] // 64),
                              exact_gelu)
        self.transformer = _Transformer(hp["transformer_width"], hp["transformer_layers"],
                                        hp["transformer_heads"], causal=True, exact_gelu=exact_gelu)
        self.token_embedding = nn.Embedding(hp["vocab_size"], hp["transformer_width"])
        self.positional_embedding = nn.Parameter(torch.randn(hp["context_length"], hp["transformer_width"]) * 0.01)
        self.ln_final = nn.LayerNorm(hp["transformer_width"])
        self.text_projection = nn.Parameter(torch.randn(hp["transformer_width"], hp["embed_dim"]) * hp["transformer_width"] ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))
        for name in ("input_resolution", "context_length", "vocab_size") if not exact_gelu else ():
            key = {"input_resolution": "image_resolution"}.get(name, name)
            self.register_buffer(name, torch.tensor(hp[key]))
        with torch.no_grad():  # non-trivial LayerNorm and bias values, so a mis-mapped key shows
            for pname, param in self.named_parameters():
                if param.ndim == 1 and "embedding" not in pname:
                    param.add_(torch.randn_like(param) * 0.1)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        x = (self.token_embedding(text) + self.positional_embedding).permute(1, 0, 2)
        x = self.ln_final(self.transformer(x).permute(1, 0, 2))
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(image), self.encode_text(text)


def to_fp16_like_openai(model: OpenAICLIP) -> OpenAICLIP:
    """What ``clip.model.convert_weights`` stores in fp16: conv/linear/attention weights and the projections."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.half()
        if isinstance(module, nn.MultiheadAttention):
            module.in_proj_weight.data = module.in_proj_weight.data.half()
            module.in_proj_bias.data = module.in_proj_bias.data.half()
    model.visual.proj.data = model.visual.proj.data.half()
    model.text_projection.data = model.text_projection.data.half()
    return model
