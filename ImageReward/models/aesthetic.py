"""LAION "improved aesthetic predictor" (``sac+logos+ava1-l14-linearMSE.pth``) on CLIP ViT-L/14.

Score = ``MLP(normalize(clip_image_embedding))`` in float32, the raw output on LAION's ~1-10 scale; the
prompt is ignored. The head has the same layer layout as ImageReward's (five Linear layers, dropouts, no
activation), so :class:`~ImageReward.models.image_reward.RewardHead` is reused.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import torch
from torch import nn

from ..checkpoint import build_from_state_dict, load_state_dict_strict, read_state_dict, strip_prefix
from ..preprocess import PreprocessConfig
from ..scorer import Scorer
from .clip import HF_IGNORED_KEYS, clip_config, clip_image_embeds
from .image_reward import RewardHead

__all__ = ["AestheticScorer"]


class AestheticScorer(Scorer):
    """Aesthetic score of an image (prompt ignored), higher is better.

    >>> import ImageReward as RM
    >>> aesthetic = RM.load_score("Aesthetic")            # doctest: +SKIP
    >>> aesthetic.score("", "photo.png")                 # doctest: +SKIP
    5.8
    """

    name = "Aesthetic"
    higher_is_better = True
    is_differentiable = True
    uses_prompt = False

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module, head: RewardHead | None = None) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection
        self.mlp = head if head is not None else RewardHead(visual_projection.out_features)

    @classmethod
    def from_clip(cls, clip: nn.Module, head: RewardHead | None = None) -> "AestheticScorer":
        """Share the image tower of a loaded :class:`~ImageReward.models.clip.CLIPScorer` (no second copy)."""
        return cls(clip.model.vision_model, clip.model.visual_projection, head)

    @classmethod
    def build(cls, hparams: Mapping[str, int], vision_state: Mapping[str, torch.Tensor] | None = None, *,
              source: str = "checkpoint") -> "AestheticScorer":
        """The CLIP image tower from ``hparams`` (loaded from ``vision_state`` in transformers' names when
        given, else random) and a fresh head."""
        from transformers import CLIPVisionModelWithProjection

        config = clip_config(hparams).vision_config
        config._attn_implementation = "sdpa"
        if vision_state is None:
            tower = CLIPVisionModelWithProjection(config)
        else:
            tower = build_from_state_dict(lambda: CLIPVisionModelWithProjection(config), vision_state,
                                         allow_missing=HF_IGNORED_KEYS, allow_unexpected=HF_IGNORED_KEYS,
                                         source=source)
        return cls(tower.vision_model, tower.visual_projection)

    def load_head(self, path_or_state: str | os.PathLike | Mapping[str, torch.Tensor]) -> None:
        """Strictly load LAION's head (keys ``layers.{0,2,4,6,7}.{weight,bias}``)."""
        if isinstance(path_or_state, Mapping):
            state, source = dict(path_or_state), "aesthetic head"
        else:
            state, source = read_state_dict(path_or_state), os.fspath(path_or_state)
        load_state_dict_strict(self.mlp, strip_prefix(state, "module."), source=source)

    @property
    def preprocess_config(self) -> PreprocessConfig:  # type: ignore[override]
        return PreprocessConfig(image_size=self.vision_model.config.image_size)

    @property
    def input_dtype(self) -> torch.dtype:
        return self.vision_model.embeddings.patch_embedding.weight.dtype

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, 224, 224]`` -> normalised CLIP image embeddings ``[B, 768]`` (float32)."""
        return clip_image_embeds(self.vision_model, self.visual_projection, pixel_values)

    def score_encoded(self, prompts: Sequence[str], image_features: torch.Tensor) -> torch.Tensor:
        head_dtype = self.mlp.layers[0].weight.dtype
        return self.mlp(image_features.to(head_dtype)).squeeze(-1).float()
