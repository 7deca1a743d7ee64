"""Helpers of the online-RL trainer tests: a non-differentiable toy reward and the tiny GRPO configuration."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ImageReward.finetune import ReFLConfig
from ImageReward.scorer import Scorer


class Brightness(Scorer):
    """Mean pixel value of the (CLIP-normalised) image: a reward a tiny model learns in a few updates. Not
    differentiable (as OCR, GenEval or a served reward): ReFL refuses it, GRPO takes it."""

    name = "brightness"
    is_differentiable = False
    uses_prompt = False

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()), requires_grad=False)  # device / dtype of the scorer
        self.calls = 0

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values.float().mean(dim=(1, 2, 3))

    def score_encoded(self, prompts, image_features: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return image_features.float()


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("\n".join(json.dumps({"text": p}) for p in prompts))
    return path


def grpo_config(base: Path, family: str, prompts: Path, out: Path, **overrides) -> ReFLConfig:
    """32 px, 6 steps, groups of 4, two sample batches of 4 images per update, one optimizer step per batch."""
    values = dict(algorithm="grpo", pretrained_model_name_or_path=str(base), model_family=family,
                  train_data=str(prompts), output_dir=str(out), resolution=32, train_batch_size=4,
                  gradient_accumulation_steps=1, sample_batches_per_update=2, group_size=4, num_inference_steps=6,
                  max_train_steps=2, learning_rate=3e-3, checkpointing_steps=1000, validation_steps=1000, seed=0,
                  report_to="none", lora_rank=4, clip_range=0.2)
    if family in ("sd3", "flux"):
        values["max_sequence_length"] = 32
    values.update(overrides)
    return ReFLConfig(**values)
