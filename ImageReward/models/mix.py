"""A weighted mix of scorers is itself a scorer: ``sum_i w_i * s_i``.

Any model name accepts the mix syntax ``NAME[:WEIGHT],...`` (``"ImageReward-v1.0:1,Aesthetic:0.1"``; a
missing weight is 1), resolved by :func:`ImageReward.load_scorer`; ReFL trains on it (``--reward``), the CLI,
``score-dataset``, eval and the plugins score with it.

>>> mix = WeightedReward([image_reward, aesthetic], [1.0, 0.1], ["ImageReward-v1.0", "Aesthetic"])  # doctest: +SKIP
>>> mix.score("a cat", "cat.png")   # 1.0 * image_reward + 0.1 * aesthetic                         # doctest: +SKIP

A component whose lower is better enters with ``-w_i``, so the mix is always higher-is-better. Each image is
decoded once; when every component preprocesses the same way (true of all built-in scorers: 224 px, CLIP
mean/std) the pixels are also shared, and each component encodes them once (``encode_images`` returns one
feature tensor per component).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import InvalidInputError, UnsupportedInputError
from ..image_io import ImageLike
from ..preprocess import PreprocessConfig
from ..scorer import Scorer

__all__ = ["WeightedReward"]


class WeightedReward(Scorer):
    """``sum_i w_i * s_i`` of several scorers (frozen, always in eval mode). ``score``, ``score_batch``,
    ``score_grad`` as any scorer; :meth:`score_grad_parts` also returns each component's own rewards.

    Raises :class:`~ImageReward.errors.InvalidInputError` without one weight per scorer."""

    name = "weighted"
    higher_is_better = True

    def __init__(self, scorers: Sequence[Scorer], weights: Sequence[float], names: Sequence[str] | None = None
                 ) -> None:
        super().__init__()
        if not scorers or len(scorers) != len(weights):
            raise InvalidInputError(f"a weighted mix needs one weight per scorer, got {len(scorers)} scorer(s) "
                                    f"and {len(weights)} weight(s)")
        self.scorers = nn.ModuleList(scorers)
        self.names = list(names or [getattr(s, "name", f"scorer{i}") for i, s in enumerate(scorers)])
        self.weights = [float(w) * (1.0 if s.higher_is_better else -1.0) for s, w in zip(scorers, weights)]
        self.is_differentiable = all(s.is_differentiable for s in scorers)
        self.uses_prompt = any(s.uses_prompt for s in scorers)
        self.default_batch_size = min(s.default_batch_size for s in scorers)
        self.name = "+".join(f"{w:g}*{n}" for n, w in zip(self.names, weights))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "WeightedReward":
        """Scorers stay in eval mode (dropout off) whatever the caller asks."""
        return super().train(False)

    # ------------------------------------------------------------------ the batch-engine interface
    @property
    def shares_preprocessing(self) -> bool:
        """Whether every component wants the same pixels (then images are preprocessed once for all)."""
        return len({s.preprocess_config for s in self.scorers}) == 1

    @property
    def preprocess_config(self) -> PreprocessConfig:  # type: ignore[override]
        if not self.shares_preprocessing:
            configs = {name: s.preprocess_config for name, s in zip(self.names, self.scorers)}
            raise UnsupportedInputError(f"the scorers of the mix {self.name!r} preprocess images differently "
                                        f"({configs}); score them one by one")
        return self.scorers[0].preprocess_config

    def encode_images(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        """Normalised ``[B, 3, S, S]`` pixels -> one feature tensor ``[B, ...]`` per component."""
        return [s.encode_images(pixel_values.to(s.device, s.input_dtype)) for s in self.scorers]

    def score_encoded(self, prompts: Sequence[str], image_features: list[torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        return self._weighted(s.score_encoded(prompts, f) for s, f in zip(self.scorers, image_features))

    def score_pairs(self, prompts: Sequence[str], image_features: list[torch.Tensor],  # type: ignore[override]
                    image_index: torch.Tensor) -> torch.Tensor:
        return self._weighted(s.score_pairs(prompts, f, image_index.to(f.device))
                              for s, f in zip(self.scorers, image_features))

    def _weighted(self, scores) -> torch.Tensor:
        return sum(w * s.float().cpu() for w, s in zip(self.weights, scores))

    def score_batch(self, prompts: str | Sequence[str], images: Sequence[ImageLike], *, batch_size: int | None = None,
                    progress: bool = False) -> torch.Tensor:
        """As :meth:`Scorer.score_batch`. Components that preprocess differently are scored one after the
        other (each image then decoded once per component)."""
        if self.shares_preprocessing:
            return super().score_batch(prompts, images, batch_size=batch_size, progress=progress)
        return self._weighted(s.score_batch(prompts, images, batch_size=batch_size, progress=progress)
                              for s in self.scorers)

    # ------------------------------------------------------------------ differentiable (ReFL)
    def score_grad_parts(self, pixels: torch.Tensor, prompts: str | Sequence[str]
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Differentiable total ``[B]`` and each scorer's own (unweighted) rewards ``[B]``, from ``[B, 3, H, W]``
        pixels in ``[0, 1]``."""
        parts = {name: scorer.score_grad(pixels, prompts).float().to(pixels.device)
                 for name, scorer in zip(self.names, self.scorers)}
        total = sum(w * parts[n] for n, w in zip(self.names, self.weights))
        return total, parts

    def score_grad(self, pixels: torch.Tensor, prompts: str | Sequence[str]) -> torch.Tensor:
        return self.score_grad_parts(pixels, prompts)[0]
