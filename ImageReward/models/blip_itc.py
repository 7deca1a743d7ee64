"""BLIP score: cosine of BLIP's 256-d image-text-contrastive (ITC) features (the original ``BLIPScore``).

The same BLIP as ImageReward (ViT-L/16 at 224 px, "med" BERT) with Salesforce's pretraining checkpoint
``model_large.pth``. Image feature = ``normalize(vision_proj(ViT(x)[:, 0]))``; text feature =
``normalize(text_proj(BERT(prompt, mode="text")[:, 0]))`` -- the text encoder run *without*
cross-attention, prompts tokenised as for ImageReward (35 tokens, ``[CLS]`` kept). No temperature.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..checkpoint import build_from_state_dict, load_state_dict_strict
from ..preprocess import PreprocessConfig
from ..scorer import Scorer
from ..tokenizer import tokenize
from .blip import BLIP, BLIPConfig
from .clip import unique_rows

__all__ = ["BLIPITCScorer", "BLIP_PRETRAIN_UNUSED_KEYS"]

# Parts of Salesforce's BLIP_Pretrain checkpoint that ITC scoring does not use: ignored by name.
BLIP_PRETRAIN_UNUSED_KEYS = (
    "visual_encoder_m.*", "text_encoder_m.*", "vision_proj_m.*", "text_proj_m.*", "itm_head.*",
    "text_decoder.*", "image_queue", "text_queue", "idx_queue", "ptr_queue", "queue_ptr", "temp",
)


class BLIPITCScorer(Scorer):
    """BLIP ITC cosine similarity, higher is better.

    >>> import ImageReward as RM
    >>> blip = RM.load_score("BLIP")                     # doctest: +SKIP
    >>> blip.score("a cat", "cat.png")                   # doctest: +SKIP
    0.41
    """

    name = "BLIP"
    higher_is_better = True
    is_differentiable = True
    uses_prompt = True

    def __init__(self, config: BLIPConfig | None = None, blip: BLIP | None = None) -> None:
        super().__init__()
        self.blip = blip if blip is not None else BLIP(config or BLIPConfig())
        self.config = self.blip.config

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], config: BLIPConfig | None = None, *,
                        source: str = "checkpoint") -> "BLIPITCScorer":
        """Build straight from a ``BLIP_Pretrain`` state dict (no random init first), strictly by name."""
        config = config or BLIPConfig()
        blip = build_from_state_dict(lambda: BLIP(config), state_dict, allow_missing=("text_encoder.embeddings.position_ids",),
                           allow_unexpected=BLIP_PRETRAIN_UNUSED_KEYS, source=source)
        return cls(blip=blip)

    def load_checkpoint_state(self, state_dict: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> None:
        """Strictly load a ``BLIP_Pretrain`` state dict into ``self.blip`` (unused parts ignored by name)."""
        load_state_dict_strict(self.blip, state_dict, allow_missing=("text_encoder.embeddings.position_ids",),
                               allow_unexpected=BLIP_PRETRAIN_UNUSED_KEYS, source=source)

    @property
    def preprocess_config(self) -> PreprocessConfig:  # type: ignore[override]
        return PreprocessConfig(image_size=self.config.vision.image_size)

    @property
    def input_dtype(self) -> torch.dtype:
        return self.blip.visual_encoder.patch_embed.proj.weight.dtype

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, 224, 224]`` -> normalised ITC image features ``[B, 256]`` (float32)."""
        cls_token = self.blip.visual_encoder(pixel_values)[:, 0, :]
        return F.normalize(self.blip.vision_proj(cls_token).float(), dim=-1)

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """Normalised ITC text features ``[N, 256]`` (float32), text encoder without cross-attention."""
        input_ids, attention_mask = tokenize(prompts)
        # padding is masked out (weight exp(-10000) == 0): drop the columns every prompt pads
        end = int(attention_mask.sum(dim=1).max())
        input_ids, attention_mask = input_ids[:, :end], attention_mask[:, :end]
        hidden = self.blip.text_encoder(input_ids.to(self.device), attention_mask.to(self.device), mode="text")
        return F.normalize(self.blip.text_proj(hidden[:, 0, :]).float(), dim=-1)

    def score_encoded(self, prompts: Sequence[str], image_features: torch.Tensor) -> torch.Tensor:
        distinct, rows = unique_rows(prompts)  # each distinct prompt is encoded once
        text = self.text_features(distinct)[rows.to(image_features.device)]
        return (text * image_features.float()).sum(dim=-1)
