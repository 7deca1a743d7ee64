"""The ImageReward scorer: BLIP ViT image tokens -> BERT with cross-attention -> [CLS] -> MLP head.

``reward = (head(cls) - 0.16717362830052426) / 1.0333394966054072``, the head being five Linear layers with
no activation between them (as the original, copied from LAION's "linearMSE" aesthetic predictor).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..checkpoint import build_from_state_dict, load_state_dict_strict, read_state_dict, strip_prefix
from ..preprocess import PreprocessConfig
from ..scorer import Scorer
from ..tokenizer import tokenize
from .blip import BLIP, BLIPConfig

__all__ = ["RewardHead", "ImageReward", "IMAGE_REWARD_MEAN", "IMAGE_REWARD_STD"]

IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072

# Keys a checkpoint may lack: the position-id buffer (re-created) and the ITC projections, which scoring
# never uses. Keys a checkpoint may carry: our optional stored normalisation.
_ALLOW_MISSING = ("blip.text_encoder.embeddings.position_ids", "blip.vision_proj.*", "blip.text_proj.*")
_NORM_KEYS = ("reward_mean", "reward_std")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class RewardHead(nn.Module):
    """``layers``: Linear 1024, Dropout .2, Linear 128, Dropout .2, Linear 64, Dropout .1, Linear 16, Linear 1."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )
        for name, param in self.layers.named_parameters():  # the original's init: N(0, 1/(input+1)), bias 0
            if "weight" in name:
                nn.init.normal_(param, mean=0.0, std=1.0 / (input_size + 1))
            else:
                nn.init.constant_(param, 0.0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class ImageReward(Scorer):
    """Text-to-image human-preference reward model.

    >>> import ImageReward as RM
    >>> model = RM.load("ImageReward-v1.0")                        # doctest: +SKIP
    >>> model.score("a painting of an ocean", ["1.webp", "2.webp"])  # doctest: +SKIP
    [0.58, 0.27]
    """

    name = "ImageReward"
    is_differentiable = True

    def __init__(self, config: BLIPConfig | None = None, *, mean: float = IMAGE_REWARD_MEAN,
                 std: float = IMAGE_REWARD_STD) -> None:
        super().__init__()
        self.config = config or BLIPConfig()
        self.blip = BLIP(self.config)
        self.mlp = RewardHead(self.config.text.hidden_size)
        self.mean = float(mean)
        self.std = float(std)

    @property
    def preprocess_config(self):  # type: ignore[override]
        return PreprocessConfig(image_size=self.config.vision.image_size)

    @property
    def input_dtype(self) -> torch.dtype:
        return self.blip.visual_encoder.patch_embed.proj.weight.dtype

    def set_image_dtype(self, dtype: torch.dtype) -> "ImageReward":
        """Run the image side in ``dtype`` (bf16/fp16): the ViT and the cross-attention key/value projections
        of the image tokens, i.e. ~95% of the FLOPs per image. The text encoder, head and normalisation stay
        float32: a bf16 post-norm BERT moved parity-set rewards by up to 2.4e-2, this split by 7.0e-3."""
        self.blip.visual_encoder.to(dtype)
        for layer in self.blip.text_encoder.encoder.layer:
            layer.crossattention.self.key.to(dtype)
            layer.crossattention.self.value.to(dtype)
        return self

    # ---------------------------------------------------------------- the model, in three steps
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, 224, 224]`` -> ViT tokens ``[B, 197, 1024]``."""
        return self.blip.visual_encoder(pixel_values)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      image_embeds: torch.Tensor) -> torch.Tensor:
        """The [CLS] output of the cross-attending text encoder, ``[B, 768]``."""
        hidden = self.blip.text_encoder(input_ids, attention_mask, image_embeds, mode="multimodal")
        return hidden[:, 0, :]

    def reward_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """[CLS] features -> normalised rewards ``[B]`` (head in its own dtype, float32 by default)."""
        raw = self.mlp(features.to(self.mlp.layers[0].weight.dtype))
        return ((raw - self.mean) / self.std).squeeze(-1)

    def score_encoded(self, prompts: Sequence[str], image_features: torch.Tensor) -> torch.Tensor:
        index = torch.arange(image_features.shape[0], device=image_features.device)
        return self.score_pairs(prompts, image_features, index)

    def score_pairs(self, prompts: Sequence[str], image_features: torch.Tensor, image_index: torch.Tensor
                    ) -> torch.Tensor:
        """Fast path: pairs of the same image are grouped and attend to it together, so its cross-attention
        keys/values are computed once (or, for few text tokens per image, skipped: attention through the K/V
        weights, see ``BertSelfAttention.attend_through_weights``); trailing padding shared by the whole batch is
        dropped (the [CLS] output does not depend on it: pad keys get -10000, whose softmax weight is exactly 0);
        the last layer computes the [CLS] row only."""
        device = image_features.device
        order = torch.sort(image_index, stable=True).indices  # group the pairs of each image together
        distinct, pairs_per_image = torch.unique_consecutive(image_index[order], return_counts=True)
        input_ids, attention_mask = tokenize(prompts)
        length = max(int(attention_mask.sum(dim=1).max()), 1)
        input_ids, attention_mask = input_ids[:, :length][order].to(device), attention_mask[:, :length][order].to(device)
        if bool((pairs_per_image == pairs_per_image[0]).all()):  # every image has as many pairs: no copies
            hidden = self.blip.text_encoder(input_ids, attention_mask, image_features[distinct], mode="multimodal",
                                            cls_only=True)
        else:  # uneven: keys/values once per image, then one copy per pair
            row_image = torch.repeat_interleave(torch.arange(len(distinct), device=device), pairs_per_image)
            key_values = self.blip.text_encoder.cross_attention_key_values(image_features[distinct])
            hidden = self.blip.text_encoder(input_ids, attention_mask, mode="multimodal", cls_only=True,
                                            cross_key_values=[(k[row_image], v[row_image]) for k, v in key_values])
        rewards = torch.empty(len(prompts), dtype=torch.float32, device=device)
        rewards[order] = self.reward_from_features(hidden[:, 0, :].float()).float()
        return rewards

    def score_gard(self, prompt_ids: torch.Tensor, prompt_attention_mask: torch.Tensor,
                   image: torch.Tensor) -> torch.Tensor:
        """The original's ReFL entry point (name kept, typo and all): pre-tokenised prompts ``[B, 35]`` and
        an already preprocessed image ``[B, 3, 224, 224]`` -> rewards ``[B, 1]``, differentiable."""
        image_embeds = self.encode_images(image.to(self.input_dtype))
        cls = self.text_features(prompt_ids.to(image.device), prompt_attention_mask.to(image.device), image_embeds)
        return self.reward_from_features(cls).unsqueeze(-1).to(image_embeds.dtype)

    # ---------------------------------------------------------------- checkpoints
    def load_checkpoint_state(self, state_dict: dict[str, torch.Tensor], *, source: str = "checkpoint") -> None:
        """Strictly load an ImageReward state dict (original key names; a ``module.`` prefix is stripped).
        Optional 0-d ``reward_mean``/``reward_std`` entries set the normalisation."""
        state_dict = strip_prefix(state_dict, "module.")
        if "reward_mean" in state_dict:
            self.mean = float(state_dict["reward_mean"])
        if "reward_std" in state_dict:
            self.std = float(state_dict["reward_std"])
        weights = {k: v for k, v in state_dict.items() if k not in _NORM_KEYS}
        load_state_dict_strict(self, weights, allow_missing=_ALLOW_MISSING, source=source)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], config: BLIPConfig | None = None, *,
                        source: str = "checkpoint") -> "ImageReward":
        """Build directly from a checkpoint without paying for random initialisation (meta device, tensors
        adopted, strict by name). The unused ITC projections, if absent, get BLIP's init."""
        state_dict = strip_prefix(state_dict, "module.")
        norm = {k: float(state_dict[k]) for k in _NORM_KEYS if k in state_dict}
        weights = {k: v for k, v in state_dict.items() if k not in _NORM_KEYS}

        def defaults(key: str, meta: torch.Tensor) -> torch.Tensor:
            value = torch.empty(meta.shape)
            return nn.init.normal_(value, std=0.02) if key.endswith(".weight") else nn.init.zeros_(value)

        model = build_from_state_dict(lambda: cls(config), weights, allow_missing=_ALLOW_MISSING,
                                      defaults=defaults, source=source)
        model.mean = norm.get("reward_mean", model.mean)
        model.std = norm.get("reward_std", model.std)
        return model

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Plain state dict (original key names) plus the normalisation as 0-d tensors."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        state["reward_mean"] = torch.tensor(self.mean, dtype=torch.float64)
        state["reward_std"] = torch.tensor(self.std, dtype=torch.float64)
        return state

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors``; ``RM.load(directory)`` reads them back strictly."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"architecture": "ImageReward", "format_version": 1, "blip": self.config.to_dict(),
                  "mean": self.mean, "std": self.std}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        save_file(self.checkpoint_state(), str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "ImageReward":
        """Build from a folder written by :meth:`save_pretrained`."""
        directory = Path(directory)
        config: dict[str, Any] = json.loads((directory / CONFIG_NAME).read_text())
        model = cls.from_state_dict(read_state_dict(directory / WEIGHTS_NAME), BLIPConfig.from_dict(config["blip"]),
                                    source=str(directory / WEIGHTS_NAME))
        model.mean, model.std = float(config["mean"]), float(config["std"])
        return model
