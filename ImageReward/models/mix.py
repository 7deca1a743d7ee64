"""A weighted mix of scorers is itself a scorer: ``sum_i w_i * s_i``.

Any model name accepts the mix syntax ``NAME[:WEIGHT],...`` (``"ImageReward-v1.0:1,Aesthetic:0.1"``; a
missing weight is 1), resolved by :func:`ImageReward.load_scorer`; ReFL trains on it (``--reward``), the CLI,
``score-dataset``, eval and the plugins score with it.

>>> mix = WeightedReward([image_reward, aesthetic], [1.0, 0.1], ["ImageReward-v1.0", "Aesthetic"])  # doctest: +SKIP
>>> mix.score("a cat", "cat.png")   # 1.0 * image_reward + 0.1 * aesthetic                         # doctest: +SKIP

A component whose lower is better enters with ``-w_i``, so the mix is always higher-is-better. The mix goes
through the one batch engine like any scorer: each image is prepared once per distinct preprocessing of the
components (``preprocess_configs``; once in all when they preprocess alike) and encoded once per component
(``encode_images`` returns one feature tensor per component).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..engine import move_pixels
from ..errors import InvalidInputError, UnsupportedInputError
from ..image_io import ImageLike
from ..preprocess import PreprocessConfig
from ..scorer import Scorer
from ..validation import check_pixels

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
    def preprocess_configs(self) -> tuple[PreprocessConfig, ...]:
        """The distinct preprocessings of the components, in order of first use: the batch engine prepares
        each image once per entry (once in all for the built-in scorers, which all preprocess alike)."""
        return tuple(dict.fromkeys(s.preprocess_config for s in self.scorers))

    @property
    def preprocess_config(self) -> PreprocessConfig:  # type: ignore[override]
        """The components' common preprocessing; :class:`UnsupportedInputError` when they differ (use
        :attr:`preprocess_configs`)."""
        configs = self.preprocess_configs
        if len(configs) > 1:
            raise UnsupportedInputError(f"the scorers of the mix {self.name!r} preprocess images differently; "
                                        "read preprocess_configs")
        return configs[0]

    @property
    def input_dtype(self) -> torch.dtype:
        """The components' common input dtype, else float32 (each component then casts the pixels itself, so
        a bf16 component never rounds the pixels of a float32 one)."""
        dtypes = {s.input_dtype for s in self.scorers}
        return dtypes.pop() if len(dtypes) == 1 else torch.float32

    def preprocess(self, image: ImageLike, *, index: int | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """``[3, S, S]`` pixels when the components preprocess alike, else one tensor per entry of
        :attr:`preprocess_configs` (each made by a component that uses it)."""
        configs = self.preprocess_configs
        makers = [next(s for s in self.scorers if s.preprocess_config == c) for c in configs]
        if len(makers) == 1:
            return makers[0].preprocess(image, index=index)
        return tuple(maker.preprocess(image, index=index) for maker in makers)

    def _pixels_of(self, pixel_values: torch.Tensor | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        if not isinstance(pixel_values, tuple):
            return [pixel_values] * len(self.scorers)
        configs = self.preprocess_configs
        return [pixel_values[configs.index(s.preprocess_config)] for s in self.scorers]

    def encode_images(self, pixel_values: torch.Tensor | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:  # type: ignore[override]
        """Normalised ``[B, 3, S, S]`` pixels (or one such tensor per entry of :attr:`preprocess_configs`)
        -> one feature tensor ``[B, ...]`` per component."""
        return [s.encode_images(move_pixels(p, s.device, s.input_dtype))
                for s, p in zip(self.scorers, self._pixels_of(pixel_values))]

    def score_encoded(self, prompts: Sequence[str], image_features: list[torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        return self._weighted(s.score_encoded(prompts, f) for s, f in zip(self.scorers, image_features))

    def score_pairs(self, prompts: Sequence[str], image_features: list[torch.Tensor],  # type: ignore[override]
                    image_index: torch.Tensor) -> torch.Tensor:
        return self._weighted(s.score_pairs(prompts, f, image_index.to(s.device))
                              for s, f in zip(self.scorers, image_features))

    def _weighted(self, scores) -> torch.Tensor:
        return sum(w * s.float().cpu() for w, s in zip(self.weights, scores))

    # ------------------------------------------------------------------ differentiable (ReFL)
    def score_grad_parts(self, pixels: torch.Tensor, prompts: str | Sequence[str], *,
                         value_range: tuple[float, float] = (0.0, 1.0)
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Differentiable total ``[B]`` and each scorer's own (unweighted) rewards ``[B]``, from ``[B, 3, H, W]``
        pixels in ``[0, 1]`` (checked once here as :meth:`Scorer.score_grad` does: floating, finite, within
        ``value_range``; ``(-1, 1)`` accepts a raw VAE decode)."""
        check_pixels(pixels, value_range=value_range)
        if tuple(value_range) == (-1.0, 1.0):
            pixels = (pixels + 1) / 2
        parts = {name: scorer.score_grad(pixels, prompts).float().to(pixels.device)
                 for name, scorer in zip(self.names, self.scorers)}
        total = sum(w * parts[n] for n, w in zip(self.names, self.weights))
        return total, parts

    def score_grad(self, pixels: torch.Tensor, prompts: str | Sequence[str], *,
                   value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
        return self.score_grad_parts(pixels, prompts, value_range=value_range)[0]
