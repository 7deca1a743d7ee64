"""HPSv2 / HPSv2.1 (Human Preference Score v2, Wu et al. 2023) on ``transformers.CLIPModel``.

HPSv2 is open_clip's ViT-H-14 fine-tuned on human preferences; the score is the **raw cosine** of the
L2-normalised image and text embeddings (``logit_scale`` is in the checkpoint but unused), exactly as
``hpsv2.score``: ``diagonal(image_features @ text_features.T)``. v2.0 and v2.1 differ only in their
weights.

The checkpoints (``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``) hold open_clip's state dict under
``'state_dict'``. open_clip's key names are OpenAI's, so :func:`.clip_convert.openai_to_hf` converts them;
the architecture (16 vision heads of width 80, exact GELU) is open_clip's ``ViT-H-14`` config, which the
weights' shapes are checked against. Prompts are tokenised as open_clip does (ftfy, HTML unescaping, 77
tokens, the same ids as OpenAI's ``clip.tokenize``). Images go through open_clip's ``ResizeMaxSize``
pipeline (``light_augmentation=True``): long side to 224 by an antialiased tensor bicubic resize, zero
padding to a square, then mean/std (see :mod:`ImageReward.preprocess`).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..checkpoint import strip_prefix
from ..errors import CheckpointError
from ..preprocess import PreprocessConfig
from .clip import VIT_H_14, CLIPScorer, build_clip_model, clip_config
from .clip_convert import openai_hparams, openai_to_hf

__all__ = ["HPSv2Scorer", "tiny_hps_hparams"]


def tiny_hps_hparams() -> dict[str, Any]:
    """A few-megabyte open_clip-layout CLIP with ViT-H-14's structure (exact GELU, vision head width 32,
    full BPE vocabulary, 77 tokens, 32 px), for tests."""
    return {"embed_dim": 32, "image_resolution": 32, "vision_layers": 2, "vision_width": 64,
            "vision_patch_size": 16, "vision_heads": 2, "context_length": 77, "vocab_size": 49408,
            "transformer_width": 64, "transformer_heads": 1, "transformer_layers": 2, "hidden_act": "gelu"}


class HPSv2Scorer(CLIPScorer):
    """HPSv2 / HPSv2.1: cosine of open_clip ViT-H-14 embeddings fine-tuned on human preferences.

    >>> import ImageReward as RM
    >>> hps = RM.load_score("HPSv2.1")                   # doctest: +SKIP
    >>> hps.score("a cat", "cat.png")                    # doctest: +SKIP
    0.27
    """

    name = "HPSv2"

    def __init__(self, model: Any, *, name: str = "HPSv2") -> None:
        super().__init__(model)
        self.name = name

    @property
    def preprocess_config(self) -> PreprocessConfig:  # type: ignore[override]
        return PreprocessConfig(image_size=self.model.config.vision_config.image_size, geometry="longest_edge_pad")

    @classmethod
    def from_open_clip_state_dict(cls, state: Mapping[str, torch.Tensor], *, hparams: Mapping[str, Any] = VIT_H_14,
                                  name: str = "HPSv2", source: str = "checkpoint") -> "HPSv2Scorer":
        """Strictly from an open_clip ``CLIP`` state dict (the ``'state_dict'`` of HPSv2's files); every key
        is used and every shape must match ``hparams`` (default open_clip's ViT-H-14), else
        :class:`CheckpointError`. Tensors keep their dtype; cast with ``factory.place_model``."""
        state = strip_prefix(state, "module.")
        if "visual.conv1.weight" not in state or "token_embedding.weight" not in state:
            raise CheckpointError(f"{source} is not an open_clip CLIP state dict (no visual.conv1.weight / "
                                  "token_embedding.weight)")
        try:
            found = openai_hparams(state)
        except KeyError as err:
            raise CheckpointError(f"{source}: open_clip CLIP state dict lacks {err.args[0]!r}") from err
        wrong = {key: (value, hparams[key]) for key, value in found.items() if hparams.get(key) != value}
        if wrong:
            shown = ", ".join(f"{key} {got} (expected {want})" for key, (got, want) in wrong.items())
            raise CheckpointError(f"{source} is not an open_clip ViT-H-14 (HPSv2) checkpoint: {shown}")
        config = clip_config(hparams)
        return cls(build_clip_model(config, openai_to_hf(state), source=source), name=name)
