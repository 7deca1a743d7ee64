"""The model being trained: an :class:`~ImageReward.models.image_reward.ImageReward` initialised from BLIP's
pre-training checkpoint (``model_large.pth``) or from an ImageReward checkpoint, with ``fix_rate`` freezing.

>>> from ImageReward.models.blip import BLIPConfig
>>> model = build_model(BLIPConfig.tiny(), blip_path="", fix_rate=0.5)
>>> sorted({n.split(".")[3] for n in trainable_parameter_names(model) if n.startswith("blip.text_encoder")})
['1']
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..baselines import BLIP_LARGE
from ..checkpoint import load_state_dict_strict, read_state_dict
from ..factory import checkpoint_file
from ..models.blip import BLIP, BLIPConfig, TextConfig, VisionConfig, interpolate_pos_embed
from ..models.image_reward import ImageReward
from ..pretrained import PretrainedCfg, fetch
from ..resolve import checkpoint_path

__all__ = ["blip_config_for", "load_blip_pretrain", "build_model", "freeze_layers",
           "trainable_parameter_names", "PairRewardModel"]

logger = logging.getLogger(__name__)

# Salesforce BLIP_Pretrain keys that the reward model does not have: momentum encoders, queues, ITM head,
# decoder, temperature. Ignored BY NAME; any other extra key is an error.
BLIP_PRETRAIN_UNUSED = (
    "visual_encoder_m.*", "text_encoder_m.*", "vision_proj_m.*", "text_proj_m.*", "text_decoder.*",
    "itm_head.*", "temp", "image_queue", "text_queue", "idx_queue", "ptr_queue",
)


def blip_config_for(vit: str, image_size: int = 224, patch_size: int = 16, med_config: dict | None = None
                    ) -> BLIPConfig:
    """``BLIP.vit`` -> config: ``large`` (ViT-L, drop-path .1), ``base`` (ViT-B), ``tiny`` (tests)."""
    if vit == "tiny":
        return BLIPConfig.tiny(image_size=image_size, patch_size=patch_size)
    if vit == "large":
        vision = VisionConfig(image_size=image_size, patch_size=patch_size, width=1024, depth=24, num_heads=16,
                              drop_path_rate=0.1)
    elif vit == "base":
        vision = VisionConfig(image_size=image_size, patch_size=patch_size, width=768, depth=12, num_heads=12,
                              drop_path_rate=0.0)
    else:
        raise ValueError(f"BLIP.vit must be 'large', 'base' or 'tiny', got {vit!r}")
    return BLIPConfig(vision=vision, text=TextConfig.from_med_config(med_config, encoder_width=vision.width))


def _resolve_file(source: str, download_root: str | os.PathLike | None) -> Path:
    if source.startswith(("http://", "https://")):
        if source == BLIP_LARGE.url:  # the registry entry of model_large.pth (one downloader)
            return fetch(BLIP_LARGE, download_root)
        name = source.rstrip("/").rsplit("/", 1)[-1]
        return fetch(PretrainedCfg(name=name, filename=name, url=source), download_root)
    return Path(source)


def load_blip_pretrain(blip: BLIP, source: str, download_root: str | os.PathLike | None = None) -> None:
    """Load Salesforce BLIP ``{'model': state_dict}`` (URL or file) into ``blip``, interpolating the ViT
    position table to the model's grid. Unused pre-training keys are ignored by name; anything else that
    does not match raises :class:`~ImageReward.errors.CheckpointError`."""
    path = _resolve_file(source, download_root)
    state = read_state_dict(path, nested_key="model")
    key = "visual_encoder.pos_embed"
    if key in state:
        state[key] = interpolate_pos_embed(state[key], blip.config.vision.num_patches)
    load_state_dict_strict(blip, state, allow_missing=("text_encoder.embeddings.position_ids",),
                           allow_unexpected=BLIP_PRETRAIN_UNUSED, source=str(path))
    logger.info("initialised BLIP from %s", path)


def _load_image_reward(model: ImageReward, source: str, download_root: str | os.PathLike | None) -> None:
    """``source``: anything the resolver reads as an ImageReward checkpoint (registered name, local file or
    folder, Hub id)."""
    path = checkpoint_file(checkpoint_path(source, download_root))
    model.load_checkpoint_state(read_state_dict(path), source=str(path))
    model.mean, model.std = 0.0, 1.0  # train on raw head outputs; export recomputes the normalisation
    logger.info("initialised from ImageReward checkpoint %s", path)


def freeze_layers(model: ImageReward, fix_rate: float = 0.0, *, fix_base: bool = False) -> None:
    """Freeze by layer index: BERT embeddings + layers ``< int(n_layers * fix_rate)``; ViT cls/pos/patch
    embedding + blocks ``< int(n_blocks * fix_rate)`` (and the final norm when that is all blocks). The unused ``*_proj`` layers are always frozen and
    ``fix_base`` freezes all of BLIP. (The original's substring walk also froze the first tensor of the
    boundary layer; we do not.)"""
    for param in model.parameters():
        param.requires_grad_(True)
    blip = model.blip
    for module in (blip.vision_proj, blip.text_proj):
        module.requires_grad_(False)
    if fix_base:
        blip.requires_grad_(False)
        return
    if fix_rate <= 0:
        return
    text, vision = blip.text_encoder, blip.visual_encoder
    text_k = int(len(text.encoder.layer) * fix_rate)
    vit_k = int(len(vision.blocks) * fix_rate)
    text.embeddings.requires_grad_(False)
    for layer in text.encoder.layer[:text_k]:
        layer.requires_grad_(False)
    vision.cls_token.requires_grad_(False)
    vision.pos_embed.requires_grad_(False)
    vision.patch_embed.requires_grad_(False)
    for block in vision.blocks[:vit_k]:
        block.requires_grad_(False)
    if vit_k >= len(vision.blocks):  # fix_rate 1: the whole ViT, as the original's walk that never stops
        vision.requires_grad_(False)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that require grad, in order."""
    return [name for name, param in model.named_parameters() if param.requires_grad]


def build_model(config: BLIPConfig, *, blip_path: str = "", preload_path: str = "", fix_rate: float = 0.0,
                fix_base: bool = False, download_root: str | os.PathLike | None = None) -> ImageReward:
    """A trainable ImageReward (raw head outputs: mean 0, std 1) initialised from ``preload_path`` (an
    ImageReward checkpoint, wins) or ``blip_path`` (BLIP pre-training), else random; then frozen.
    The head keeps the original's init N(0, 1/(768+1)); seed the RNG before calling for reproducibility."""
    model = ImageReward(config, mean=0.0, std=1.0)
    if preload_path:
        _load_image_reward(model, preload_path, download_root)
    elif blip_path:
        load_blip_pretrain(model.blip, blip_path, download_root)
    else:
        logger.warning("no blip_path/preload_path: training from random initialisation")
    freeze_layers(model, fix_rate, fix_base=fix_base)
    return model


class PairRewardModel(nn.Module):
    """Training forward: one pass over ``cat([better, worse])`` -> raw rewards ``(r_better, r_worse)``.

    The head runs in float32 on the [CLS] feature, as the original's ``encode_pair``."""

    def __init__(self, model: ImageReward) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, better: torch.Tensor,
                worse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = better.shape[0]
        embeds = self.model.encode_images(torch.cat([better, worse]))
        ids, mask = torch.cat([input_ids, input_ids]), torch.cat([attention_mask, attention_mask])
        features = self.model.text_features(ids, mask, embeds).float()
        with torch.autocast(device_type=features.device.type, enabled=False):  # head in float32, as the original
            rewards = self.model.mlp(features.to(self.model.mlp.layers[0].weight.dtype)).float().squeeze(-1)
        return rewards[:batch], rewards[batch:]
