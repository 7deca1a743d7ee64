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
import os
import shutil
from pathlib import Path

from ..errors import DiskSpaceError
from ..trainable_state import (TRAINABLE_NAME, frozen_fingerprint, load_trainable, save_trainable,
                               trainable_bytes, trainable_state)

__all__ = ["TRAINABLE_NAME", "PROGRESS_NAME", "frozen_fingerprint", "trainable_state", "save_trainable",
           "load_trainable", "trainable_bytes", "free_bytes", "ensure_free_space", "find_latest_state", "replace_dir",
           "format_bytes"]

logger = logging.getLogger(__name__)

PROGRESS_NAME = "progress.json"


def format_bytes(count: float) -> str:
    """``1234567890`` -> ``'1.23 GB'`` (decimal units, as ``df -H``)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1000
    return f"{count:.2f} TB"


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def ensure_free_space(path: str | os.PathLike, needed: int, what: str) -> None:
    """Raise :class:`~ImageReward.errors.DiskSpaceError` before writing ``what`` (about ``needed`` bytes) under
    ``path`` when its file system has less than ``needed`` + 5% + 64 MB free. Nothing has been written then."""
    free = free_bytes(path)
    want = int(needed * 1.05) + (64 << 20)
    if free < want:
        raise DiskSpaceError(f"not enough disk space to write {what} under {path}: needs about "
                             f"{format_bytes(want)}, {format_bytes(free)} free (free space, lower "
                             f"train.checkpoints_total_limit, or move checkpoint_base)")


def find_latest_state(states_dir: Path) -> Path | None:
    """The ``checkpoint-<step>`` folder with the highest step that holds a complete progress file."""
    if not states_dir.is_dir():
        return None
    found = [(int(p.name.split("-")[-1]), p) for p in states_dir.glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit() and (p / PROGRESS_NAME).is_file()]
    return max(found)[1] if found else None


def replace_dir(temp: Path, final: Path) -> None:
    """Move the finished folder ``temp`` to ``final``, replacing an older ``final`` (never a half-written one:
    a crash leaves either the old folder or the new one, plus at most a ``*.old`` / ``*.tmp`` leftover)."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(temp, final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
