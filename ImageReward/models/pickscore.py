"""PickScore v1 (Kirstain et al. 2023, Pick-a-Pic) on ``transformers.CLIPModel``.

PickScore is a CLIP ViT-H-14 fine-tuned on Pick-a-Pic preferences, published as a transformers
``CLIPModel`` folder (``yuvalkirstain/PickScore_v1``) and used with the processor of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``. Its model card computes, per prompt,
``scores = logit_scale.exp() * cos(text, image)`` and ``probs = softmax(scores)`` over the candidate
images. :class:`PickScoreScorer` returns ``scores`` as the reward (``cosine`` gives the unscaled value,
``probs`` the model card's probabilities).

Prompts go through transformers' fast tokenizer exactly as the processor runs it: **no** ftfy and no HTML
unescaping (unlike HPSv2 and OpenAI CLIP), truncated to 77 tokens. Images go through the slow
``CLIPImageProcessor`` of transformers 4.x: ``convert("RGB")`` first (alpha dropped, not composited), PIL
bicubic resize of the short side to 224, centre crop with floored offsets, ``/255``, mean/std.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from ..checkpoint import read_state_dict
from ..clip_tokenizer import _vocab_and_merges
from ..errors import CheckpointError
from ..image_io import ImageLike
from ..preprocess import PreprocessConfig
from .clip import CLIPScorer, build_clip_model

__all__ = ["PickScoreScorer", "processor_preprocess_config", "check_processor_vocabulary"]

logger = logging.getLogger(__name__)

# The processor settings PickScore's model card loads (laion/CLIP-ViT-H-14-laion2B-s32B-b79K).
PICKSCORE_PREPROCESS = PreprocessConfig(image_size=224, crop_offset="floor", convert_rgb_first=True)


def processor_preprocess_config(path: str | os.PathLike) -> PreprocessConfig:
    """``PreprocessConfig`` from a ``preprocessor_config.json`` of transformers' ``CLIPImageProcessor``.
    Settings this pipeline does not reproduce (no resize, no crop, another resampler, a crop that differs
    from the short side) raise :class:`CheckpointError`."""
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read image processor config {str(path)!r}: {err}") from err
    size = spec.get("size", {})
    size = size.get("shortest_edge") if isinstance(size, dict) else size
    crop = spec.get("crop_size", {})
    crop = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else (crop, crop)
    expected = {"do_resize": True, "do_center_crop": True, "do_rescale": True, "do_normalize": True,
                "do_convert_rgb": True, "resample": 3}
    wrong = {key: spec.get(key, value) for key, value in expected.items() if spec.get(key, value) != value}
    if crop != (size, size):
        wrong["crop_size"] = crop
    if abs(float(spec.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
        wrong["rescale_factor"] = spec["rescale_factor"]
    if wrong or not isinstance(size, int):
        raise CheckpointError(f"{str(path)!r}: unsupported CLIPImageProcessor settings {wrong or {'size': size}} "
                              "(expected bicubic shortest-edge resize, square centre crop of the same size)")
    return PreprocessConfig(image_size=size, mean=tuple(spec["image_mean"]), std=tuple(spec["image_std"]),
                            crop_offset="floor", convert_rgb_first=True)


def check_processor_vocabulary(folder: str | os.PathLike) -> None:
    """Check that ``vocab.json`` / ``merges.txt`` in a processor folder are CLIP's BPE, the vocabulary the
    packaged tokenizer (:mod:`ImageReward.clip_tokenizer`) uses; absent files are accepted."""
    vocab, merges = _vocab_and_merges()
    folder = Path(folder)
    if (folder / "vocab.json").is_file():
        if json.loads((folder / "vocab.json").read_text(encoding="utf-8")) != vocab:
            raise CheckpointError(f"{folder / 'vocab.json'} is not CLIP's BPE vocabulary (49,408 tokens)")
    if (folder / "merges.txt").is_file():
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        found = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        if found != merges:
            raise CheckpointError(f"{folder / 'merges.txt'} is not CLIP's BPE merge list ({len(merges)} merges)")


class PickScoreScorer(CLIPScorer):
    """PickScore v1: ``logit_scale.exp() * cos(text, image)`` of a preference-tuned CLIP ViT-H-14.

    >>> import ImageReward as RM
    >>> pick = RM.load_score("PickScore")                # doctest: +SKIP
    >>> pick.probs("a cat", ["a.png", "b.png"])          # doctest: +SKIP
    [0.73, 0.27]
    """

    name = "PickScore"
    clean_prompts = False  # transformers' fast tokenizer: no ftfy, no HTML unescaping

    def __init__(self, model: Any, preprocess_config: PreprocessConfig = PICKSCORE_PREPROCESS) -> None:
        super().__init__(model)
        self._preprocess_config = preprocess_config
        # read once in float32 (as the model card's ``model.logit_scale.exp()``), so bf16 weights keep it exact
        self.logit_scale_exp = float(model.logit_scale.detach().float().exp())

    @property
    def preprocess_config(self) -> PreprocessConfig:  # type: ignore[override]
        return self._preprocess_config

    def cosine_encoded(self, prompts: Sequence[str], image_features: torch.Tensor) -> torch.Tensor:
        """Unscaled cosines ``[B]`` (float32) of one prompt per row of ``image_features``."""
        return super().score_encoded(prompts, image_features)

    def score_encoded(self, prompts: Sequence[str], image_features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale_exp * self.cosine_encoded(prompts, image_features)

    def probs(self, prompt: str, images: Sequence[ImageLike], *, batch_size: int | None = None) -> list[float]:
        """The model card's ``calc_probs(prompt, images)``: softmax of the scores over ``images``."""
        return torch.softmax(self.score_batch(prompt, images, batch_size=batch_size), dim=0).tolist()

    @classmethod
    def from_folders(cls, model_dir: str | os.PathLike, processor_dir: str | os.PathLike | None = None
                     ) -> "PickScoreScorer":
        """From a ``CLIPModel`` folder (``config.json`` + ``model.safetensors``, or ``pytorch_model.bin``,
        read with ``weights_only``) and, optionally, the processor folder (its image settings and a check
        that its vocabulary is CLIP's BPE). Keys load strictly; ``position_ids`` are ignored by name."""
        from transformers import CLIPConfig

        model_dir = Path(model_dir)
        weights = [model_dir / name for name in ("model.safetensors", "pytorch_model.bin") if (model_dir / name).is_file()]
        if not (model_dir / "config.json").is_file() or not weights:
            raise CheckpointError(f"{str(model_dir)!r} is not a PickScore folder: it needs config.json and "
                                  "model.safetensors (or pytorch_model.bin)")
        config = CLIPConfig.from_pretrained(str(model_dir))
        config._attn_implementation = "sdpa"
        model = build_clip_model(config, read_state_dict(weights[0]), source=str(weights[0]))
        preprocess = PICKSCORE_PREPROCESS
        if processor_dir is not None:
            processor_dir = Path(processor_dir)
            if (processor_dir / "preprocessor_config.json").is_file():
                preprocess = processor_preprocess_config(processor_dir / "preprocessor_config.json")
            check_processor_vocabulary(processor_dir)
        return cls(model, preprocess)
