"""ImageReward: text-to-image human-preference reward models.

>>> import ImageReward as RM
>>> model = RM.load("ImageReward-v1.0")                                # doctest: +SKIP
>>> ranking, rewards = model.inference_rank("a cat", ["a.png", "b.png"])  # doctest: +SKIP

Importing this package loads only torch and the scorer core: diffusers, accelerate, datasets and peft are
imported by the trainers that need them.
"""

from .errors import (
    CheckpointError,
    DownloadError,
    ImageLoadError,
    ImageRewardError,
    InvalidInputError,
    UnknownModelError,
    UnsupportedInputError,
)
from .factory import available_models, available_scores, load, load_score
from .models.image_reward import ImageReward
from .scorer import Scorer

__version__ = "2.0.0.dev0"

__all__ = [
    "load",
    "load_score",
    "available_models",
    "available_scores",
    "ImageReward",
    "Scorer",
    "ImageRewardError",
    "ImageLoadError",
    "UnsupportedInputError",
    "InvalidInputError",
    "CheckpointError",
    "UnknownModelError",
    "DownloadError",
]
