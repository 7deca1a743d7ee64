"""Rewards for ReFL: any scorer of this library, or a weighted mix of them, behind the Scorer interface.

>>> reward = load_reward("ImageReward-v1.0:1.0,Aesthetic:0.1", device="cuda")   # doctest: +SKIP
>>> total, parts = reward.score_grad_parts(pixels_0_1, prompts)                  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import torch
from torch import nn

from ..errors import UnknownModelError
from ..scorer import Scorer
from ..validation import check_pixels
from .config import ReFLConfigError, parse_reward_spec

__all__ = ["WeightedReward", "load_reward", "load_scorer"]

logger = logging.getLogger(__name__)


class WeightedReward(Scorer):
    """``sum_i w_i * s_i`` of several scorers; a scorer whose lower is better enters with ``-w_i``, so the
    mix is always higher-is-better. ``score_grad``/``score_batch`` as any scorer; frozen and in eval mode."""

    name = "weighted"
    higher_is_better = True

    def __init__(self, scorers: Sequence[Scorer], weights: Sequence[float], names: Sequence[str] | None = None
                 ) -> None:
        super().__init__()
        if not scorers or len(scorers) != len(weights):
            raise ReFLConfigError("WeightedReward needs one weight per scorer")
        self.scorers = nn.ModuleList(scorers)
        self.names = list(names or [getattr(s, "name", f"scorer{i}") for i, s in enumerate(scorers)])
        self.weights = [float(w) * (1.0 if s.higher_is_better else -1.0) for s, w in zip(scorers, weights)]
        self.is_differentiable = all(s.is_differentiable for s in scorers)
        self.uses_prompt = any(s.uses_prompt for s in scorers)
        self.name = "+".join(f"{w:g}*{n}" for n, w in zip(self.names, weights))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "WeightedReward":
        """Scorers stay in eval mode (dropout off) whatever the caller asks."""
        return super().train(False)

    def score_grad_parts(self, pixels: torch.Tensor, prompts: str | Sequence[str], *,
                         value_range: tuple[float, float] = (0.0, 1.0)
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Differentiable total ``[B]`` and each scorer's own (unweighted) rewards ``[B]``. ``pixels`` as
        :meth:`Scorer.score_grad` (checked once here: finite, floating, within ``value_range``)."""
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

    def score_batch(self, prompts, images, *, batch_size=None, progress=False) -> torch.Tensor:  # type: ignore[override]
        return sum(w * s.score_batch(prompts, images, batch_size=batch_size, progress=progress)
                   for s, w in zip(self.scorers, self.weights))


def load_scorer(name: str, *, device: str | torch.device | None = None, download_root: str | None = None,
                dtype: torch.dtype | None = None) -> Scorer:
    """One scorer by name: an ImageReward registry name or saved folder/file, or a ``load_score`` name."""
    from .. import factory

    if name in factory.available_models() or os.path.exists(name):
        return factory.load(name, device=device, download_root=download_root, dtype=dtype)
    if name in factory.available_scores():
        return factory.load_score(name, device=device, download_root=download_root, dtype=dtype)
    raise UnknownModelError(f"reward {name!r}: not an ImageReward model {factory.available_models()}, "
                            f"a scorer {factory.available_scores()}, nor an existing path")


def load_reward(spec: str, *, device: str | torch.device | None = None, download_root: str | None = None,
                dtype: torch.dtype | None = None, differentiable: bool = True) -> WeightedReward:
    """Parse ``"NAME[:WEIGHT],..."`` and load each scorer (frozen, eval mode) into a :class:`WeightedReward`."""
    parts = parse_reward_spec(spec)
    scorers = [load_scorer(name, device=device, download_root=download_root, dtype=dtype) for name, _ in parts]
    if differentiable:
        for (name, _), scorer in zip(parts, scorers):
            if not scorer.is_differentiable:
                raise ReFLConfigError(f"--reward {name!r} is not differentiable and cannot be trained on; "
                                      "use it as --monitor_reward")
    return WeightedReward(scorers, [w for _, w in parts], [name for name, _ in parts])


def as_reward(reward: Scorer | str, **kwargs) -> WeightedReward:
    """A :class:`WeightedReward` from a spec string, a scorer, or an existing mix (returned as is)."""
    if isinstance(reward, WeightedReward):
        return reward
    if isinstance(reward, Scorer):
        return WeightedReward([reward], [1.0], [getattr(reward, "name", "reward")])
    return load_reward(reward, **kwargs)
