"""ImageReward: text-to-image human-preference reward models.

>>> import ImageReward as RM
>>> model = RM.load("ImageReward-v1.0")                                # doctest: +SKIP
>>> ranking, rewards = model.inference_rank("a cat", ["a.png", "b.png"])  # doctest: +SKIP
>>> mix = RM.load_scorer("ImageReward-v1.0:1,Aesthetic:0.1")           # doctest: +SKIP

``load_scorer`` (``ImageReward/resolve.py``) is where any model string becomes a scorer: a registered
checkpoint, a registered scorer, a weighted mix, a local file or folder, or a Hub id, in that order.
``Scorer.score_batch`` (``ImageReward/engine.py``) is where a batch becomes scores.

Importing this package loads only torch and the scorer core: diffusers, accelerate, datasets and peft are
imported by the trainers that need them.
"""

from .errors import (
    CheckpointError,
    DependencyError,
    DownloadError,
    ImageLoadError,
    ImageRewardError,
    InvalidInputError,
    UnknownModelError,
    UnsupportedInputError,
)
from .factory import available_models, available_scores, load, load_score, register_scorer
from .models.image_reward import ImageReward
from .models.mix import WeightedReward
from .resolve import available_scorers, load_scorer, missing_files
from .scorer import Scorer

__version__ = "2.0.0.dev0"

__all__ = [
    "load",
    "load_score",
    "load_scorer",
    "available_models",
    "available_scores",
    "available_scorers",
    "missing_files",
    "register_scorer",
    "ImageReward",
    "WeightedReward",
    "Scorer",
    "ImageRewardError",
    "ImageLoadError",
    "UnsupportedInputError",
    "InvalidInputError",
    "CheckpointError",
    "DependencyError",
    "UnknownModelError",
    "DownloadError",
]
