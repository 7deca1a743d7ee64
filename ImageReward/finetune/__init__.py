"""Reward fine-tuning of diffusion models: ReFL (reward feedback learning, DRaFT-K) and online RL (Flow-GRPO for
SD3 / SD3.5 and FLUX.1, DDPO-style for Stable Diffusion 1.x and SDXL), full fine-tune or LoRA. (Formerly
``ImageReward.refl``, which still imports.)

Importing this package is cheap; diffusers, accelerate and peft are imported when a trainer runs.

>>> from ImageReward.finetune import ReFLConfig, ReFLTrainer
>>> trainer = ReFLTrainer(ReFLConfig(train_data="data/example_prompts.json"))   # doctest: +SKIP
>>> trainer.train()                                                             # doctest: +SKIP
"""

from .config import ReFLConfig, ReFLConfigError, build_parser, parse_args, parse_reward_spec
from .data import BatchOrder, PromptDataError, load_prompts
from .families import FAMILIES, ModelFamily, get_family
from .grpo import RewardUnavailableError, RewardValueError, group_advantages, grpo_loss
from .logprob import ddim_step_with_logprob, sde_step_with_logprob
from .losses import pretrain_loss, refl_loss
from .rewards import WeightedReward, load_reward
from .trainer import ReFLTrainer

__all__ = ["ReFLConfig", "ReFLConfigError", "ReFLTrainer", "build_parser", "parse_args", "parse_reward_spec",
           "BatchOrder", "PromptDataError", "load_prompts", "FAMILIES", "ModelFamily", "get_family",
           "refl_loss", "pretrain_loss", "WeightedReward", "load_reward", "sde_step_with_logprob",
           "ddim_step_with_logprob", "group_advantages", "grpo_loss", "RewardValueError", "RewardUnavailableError"]
