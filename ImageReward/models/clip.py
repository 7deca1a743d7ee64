"""CLIP score on ``transformers.CLIPModel``: cosine of the L2-normalised text and image embeddings.

As the original ``CLIPScore`` (OpenAI ViT-L/14): no x100 or x2.5 scaling and no clamp at 0, prompts
tokenised with CLIP's BPE to 77 tokens with truncation, the text feature taken at the first
end-of-text token, the image feature at the class token after ``ln_post``. Weights come from OpenAI's
``ViT-L-14.pt`` (converted on load, see :mod:`.clip_convert`) or from the Hub's
``openai/clip-vit-large-patch14`` (already in transformers' layout).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..checkpoint import build_from_state_dict, read_state_dict
from ..clip_tokenizer import EOT_TOKEN_ID, clip_tokenize
from ..errors import CheckpointError
from ..preprocess import PreprocessConfig
from ..scorer import Scorer
from .clip_convert import _count_layers, openai_hparams, openai_to_hf, read_openai_clip

__all__ = ["VIT_L_14", "VIT_H_14", "clip_config", "tiny_clip_hparams", "build_clip_model", "load_clip_weights",
           "clip_image_embeds", "unique_rows", "CLIPScorer"]

# OpenAI's ViT-L/14, in the names of ``clip.model.build_model``.
VIT_L_14: dict[str, int] = {
    "embed_dim": 768, "image_resolution": 224, "vision_layers": 24, "vision_width": 1024,
    "vision_patch_size": 14, "context_length": 77, "vocab_size": 49408, "transformer_width": 768,
    "transformer_heads": 12, "transformer_layers": 12,
}


# open_clip's ViT-H-14 (``model_configs/ViT-H-14.json``: vision head width 80, so 16 heads; exact GELU), the
# tower of HPSv2 and PickScore. Heads and activation cannot be read off the weights, so they are named here.
VIT_H_14: dict[str, int | str] = {
    "embed_dim": 1024, "image_resolution": 224, "vision_layers": 32, "vision_width": 1280,
    "vision_patch_size": 14, "vision_heads": 16, "context_length": 77, "vocab_size": 49408,
    "transformer_width": 1024, "transformer_heads": 16, "transformer_layers": 24, "hidden_act": "gelu",
}


def tiny_clip_hparams() -> dict[str, int]:
    """A few-megabyte CLIP with ViT-L/14's structure (full BPE vocabulary, 77 tokens, 32 px), for tests."""
    return {"embed_dim": 32, "image_resolution": 32, "vision_layers": 2, "vision_width": 64,
            "vision_patch_size": 16, "context_length": 77, "vocab_size": 49408, "transformer_width": 64,
            "transformer_heads": 1, "transformer_layers": 2}


def clip_config(hparams: Mapping[str, int | str] = VIT_L_14):
    """``transformers.CLIPConfig`` for an OpenAI / open_clip CLIP (LayerNorm eps 1e-5, MLP 4x, pooling at the
    first ``<|endoftext|>`` = 49407, which is where OpenAI's ``argmax`` lands). Activation
    ``hparams["hidden_act"]`` (default OpenAI's quick-GELU) and vision heads ``hparams["vision_heads"]``
    (default OpenAI's width / 64)."""
    from transformers import CLIPConfig

    act = hparams.get("hidden_act", "quick_gelu")
    text = {"vocab_size": hparams["vocab_size"], "hidden_size": hparams["transformer_width"],
            "intermediate_size": 4 * hparams["transformer_width"], "num_hidden_layers": hparams["transformer_layers"],
            "num_attention_heads": hparams["transformer_heads"], "max_position_embeddings": hparams["context_length"],
            "hidden_act": act, "layer_norm_eps": 1e-5, "projection_dim": hparams["embed_dim"],
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0}
    vision = {"hidden_size": hparams["vision_width"], "intermediate_size": 4 * hparams["vision_width"],
              "num_hidden_layers": hparams["vision_layers"],
              "num_attention_heads": hparams.get("vision_heads", hparams["vision_width"] // 64),
              "image_size": hparams["image_resolution"], "patch_size": hparams["vision_patch_size"],
              "hidden_act": act, "layer_norm_eps": 1e-5, "projection_dim": hparams["embed_dim"]}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=hparams["embed_dim"])
    config._attn_implementation = "sdpa"
    return config


# ``position_ids`` buffers: persistent (in the state dict) in transformers < 4.31, non-persistent since. Allowed
# by name both ways: ignored when a file has them and the model does not, filled with ``arange`` when the model
# expects them and the file (OpenAI's, or one saved by a newer transformers) lacks them.
HF_IGNORED_KEYS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def build_clip_model(config, state_dict: Mapping[str, torch.Tensor] | None = None, *, source: str = "checkpoint"):
    """``transformers.CLIPModel``: random init when ``state_dict`` is None, else loaded strictly from it
    (transformers' key names) without a random init first."""
    from transformers import CLIPModel

    if state_dict is None:
        return CLIPModel(config).eval()
    return build_from_state_dict(lambda: CLIPModel(config), state_dict, allow_missing=HF_IGNORED_KEYS,
                                 allow_unexpected=HF_IGNORED_KEYS, source=source)


def load_clip_weights(path: str | os.PathLike, *, vision_only: bool = False) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """Read CLIP weights from OpenAI's format (``.pt`` TorchScript archive or state dict) or transformers'
    (``.safetensors``/``.bin`` with ``vision_model.*`` keys). Returns ``(hparams, state dict in
    transformers' names)``; ``vision_only`` keeps the image tower and its projection."""
    path = os.fspath(path)
    if path.endswith(".safetensors") or path.endswith(".bin"):
        state = read_state_dict(path)
        hparams = _hf_hparams(state, path)
    else:
        openai = read_openai_clip(path)
        hparams = openai_hparams(openai)
        state = openai_to_hf(openai, vision_only=vision_only)
    if vision_only:
        state = {k: v for k, v in state.items() if k.startswith(("vision_model.", "visual_projection."))}
    return hparams, state


def _hf_hparams(state: Mapping[str, torch.Tensor], source: str) -> dict[str, int]:
    try:
        patch = state["vision_model.embeddings.patch_embedding.weight"]
        positions = state["vision_model.embeddings.position_embedding.weight"].shape[0]
        width = state["text_model.final_layer_norm.weight"].shape[0]
        return {
            "embed_dim": state["visual_projection.weight"].shape[0],
            "image_resolution": patch.shape[-1] * round((positions - 1) ** 0.5),
            "vision_layers": _count_layers(state, "vision_model.encoder.layers."),
            "vision_width": patch.shape[0], "vision_patch_size": patch.shape[-1],
            "context_length": state["text_model.embeddings.position_embedding.weight"].shape[0],
            "vocab_size": state["text_model.embeddings.token_embedding.weight"].shape[0],
            "transformer_width": width, "transformer_heads": width // 64,
            "transformer_layers": _count_layers(state, "text_model.encoder.layers."),
        }
    except KeyError as err:
        raise CheckpointError(f"{source} is not a transformers CLIPModel checkpoint (no {err.args[0]!r})") from err


def clip_image_embeds(vision_model: torch.nn.Module, visual_projection: torch.nn.Module,
                      pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised CLIP image embeddings ``[B, E]`` in float32 (class token -> ``ln_post`` -> ``proj``)."""
    pooled = vision_model(pixel_values=pixel_values).pooler_output
    return F.normalize(visual_projection(pooled).float(), dim=-1)


def unique_rows(prompts: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """Distinct prompts (first-seen order) and, per input row, the index of its prompt among them."""
    index: dict[str, int] = {}
    rows = [index.setdefault(prompt, len(index)) for prompt in prompts]
    return list(index), torch.tensor(rows, dtype=torch.long)


class CLIPScorer(Scorer):
    """CLIP score: ``cos(text, image)`` of OpenAI CLIP ViT-L/14 embeddings (the original's ``CLIPScore``).

    >>> import ImageReward as RM
    >>> clip = RM.load_score("CLIP")                     # doctest: +SKIP
    >>> clip.score("a cat", "cat.png")                   # doctest: +SKIP
    0.27
    """

    name = "CLIP"
    higher_is_better = True
    is_differentiable = True
    uses_prompt = True
    clean_prompts = True  # ftfy + HTML unescaping before BPE, as OpenAI's and open_clip's tokenizers do

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    @property
    def preprocess_config(self) -> PreprocessConfig:  # type: ignore[override]
        return PreprocessConfig(image_size=self.model.config.vision_config.image_size)

    @property
    def input_dtype(self) -> torch.dtype:
        return self.model.vision_model.embeddings.patch_embedding.weight.dtype

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, 224, 224]`` -> normalised image embeddings ``[B, E]`` (float32; E = 768 for ViT-L/14)."""
        return clip_image_embeds(self.model.vision_model, self.model.visual_projection, pixel_values)

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """Normalised text embeddings ``[N, E]`` (float32)."""
        input_ids = clip_tokenize(prompts, self.model.config.text_config.max_position_embeddings,
                                  clean=self.clean_prompts)
        # The feature is read at the first EOT and attention is causal, so the padding after the longest
        # prompt's EOT cannot change it: drop it (same numbers, far less work than 77 positions).
        end = int((input_ids == EOT_TOKEN_ID).int().argmax(dim=1).max()) + 1
        pooled = self.model.text_model(input_ids=input_ids[:, :end].to(self.device)).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)

    def score_encoded(self, prompts: Sequence[str], image_features: torch.Tensor) -> torch.Tensor:
        distinct, rows = unique_rows(prompts)  # each distinct prompt is encoded once
        text = self.text_features(distinct)[rows.to(image_features.device)]
        return (text * image_features.float()).sum(dim=-1)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> "CLIPScorer":
        """From OpenAI's ``ViT-L-14.pt`` or a transformers ``model.safetensors`` (fp32 on CPU)."""
        hparams, state = load_clip_weights(path)
        return cls(build_clip_model(clip_config(hparams), state, source=os.fspath(path)))
