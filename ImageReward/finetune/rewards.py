"""Rewards for ReFL: any model string the resolver accepts (a scorer, or a weighted mix of them), always held
as a :class:`~ImageReward.models.mix.WeightedReward` so that the trainer can log each component.

>>> reward = load_reward("ImageReward-v1.0:1.0,Aesthetic:0.1", device="cuda")   # doctest: +SKIP
>>> total, parts = reward.score_grad_parts(pixels_0_1, prompts)                  # doctest: +SKIP
"""

from __future__ import annotations

import logging

import torch

from ..models.mix import WeightedReward
from ..resolve import load_scorer, resolve
from ..scorer import Scorer
from .config import ReFLConfigError, parse_reward_spec

__all__ = ["WeightedReward", "load_reward", "as_reward"]

logger = logging.getLogger(__name__)


def load_reward(spec: str, *, device: str | torch.device | None = None, download_root: str | None = None,
                dtype: torch.dtype | None = None, differentiable: bool = True) -> WeightedReward:
    """Load ``"NAME[:WEIGHT],..."`` (or one name) through the resolver into a :class:`WeightedReward`
    (frozen, eval mode). With ``differentiable`` a scorer that cannot pass gradients raises
    :class:`~ImageReward.finetune.config.ReFLConfigError` naming it."""
    parse_reward_spec(spec)  # typed ReFL error for a malformed spec, before anything is loaded
    resolved = resolve(spec)
    scorer = load_scorer(resolved, device=device, download_root=download_root, dtype=dtype)
    reward = scorer if isinstance(scorer, WeightedReward) else WeightedReward([scorer], [1.0], [resolved.target])
    if differentiable:
        for name, part in zip(reward.names, reward.scorers):
            if not part.is_differentiable:
                raise ReFLConfigError(f"--reward {name!r} is not differentiable and cannot be trained on; "
                                      "use it as --monitor_reward")
    return reward


def as_reward(reward: Scorer | str, **kwargs) -> WeightedReward:
    """A :class:`WeightedReward` from a spec string, a scorer, or an existing mix (returned as is)."""
    if isinstance(reward, WeightedReward):
        return reward
    if isinstance(reward, Scorer):
        return WeightedReward([reward], [1.0], [getattr(reward, "name", "reward")])
    return load_reward(reward, **kwargs)
