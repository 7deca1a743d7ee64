"""What a training state holds on disk: the trainable parameters only (frozen ones are rebuilt from the run's
initial checkpoint), checked against a fingerprint of the frozen weights, and a free-space check before any
large write.

A state folder ``states/checkpoint-<step>/`` holds ``trainable.safetensors`` (``ImageReward.trainable_state``), accelerate's
``optimizer.bin`` and ``random_states_<rank>.pkl``, and ``progress.json`` (written last: marks it complete).
``best/`` holds ``trainable.safetensors`` and ``best.json``. With ``fix_rate`` 0.7 at ImageReward size this is
141M of 477M parameters: 0.56 GB of weights per state instead of 1.79 GB.

>>> from ImageReward.models.blip import BLIPConfig
>>> from ImageReward.rm_training.model import build_model
>>> model = build_model(BLIPConfig.tiny(), fix_rate=0.5)
>>> len(frozen_fingerprint(model))
64
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..disk import ensure_free_space, format_bytes, free_bytes, replace_dir
from ..trainable_state import (TRAINABLE_NAME, frozen_fingerprint, load_trainable, save_trainable,
                               trainable_bytes, trainable_state)

__all__ = ["TRAINABLE_NAME", "PROGRESS_NAME", "frozen_fingerprint", "trainable_state", "save_trainable",
           "load_trainable", "trainable_bytes", "free_bytes", "ensure_free_space", "find_latest_state", "replace_dir",
           "format_bytes"]

logger = logging.getLogger(__name__)

PROGRESS_NAME = "progress.json"


def find_latest_state(states_dir: Path) -> Path | None:
    """The ``checkpoint-<step>`` folder with the highest step that holds a complete progress file."""
    if not states_dir.is_dir():
        return None
    found = [(int(p.name.split("-")[-1]), p) for p in states_dir.glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit() and (p / PROGRESS_NAME).is_file()]
    return max(found)[1] if found else None
