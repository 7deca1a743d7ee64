"""After training: per-image rewards of grouped data, the original test accuracy, the mean/std normalisation
from a reference set, and the export as an ImageReward checkpoint that ``RM.load`` reads strictly (a folder,
an ``ImageReward.pt`` or both).

>>> export_dir, pt_path = export_model(model, "checkpoint/run", mean=0.17, std=1.03)  # doctest: +SKIP
>>> RM.load(str(export_dir))                                                         # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..engine import score_pixels
from ..errors import ImageLoadError, InvalidInputError
from ..eval.metrics import pooled_pair_accuracy
from ..image_io import load_image
from ..models.image_reward import ImageReward
from ..preprocess import PreprocessConfig, preprocess_pil
from ..disk import disk_errors
from .states import ensure_free_space, replace_dir

__all__ = ["group_rewards", "test_accuracy", "reference_stats", "export_model"]

logger = logging.getLogger(__name__)


class _ImageDataset(Dataset):
    """Every generation of every group: ``(group, index, pixels, ok)``, decoded in DataLoader workers."""

    def __init__(self, groups: Sequence[Mapping[str, Any]], image_root: str | os.PathLike,
                 preprocess: PreprocessConfig) -> None:
        self.items = [(g, i) for g, group in enumerate(groups) for i in range(len(group["generations"]))]
        self.paths = [[Path(image_root) / p for p in group["generations"]] for group in groups]
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        g, i = self.items[index]
        try:
            pixels, ok = preprocess_pil(load_image(self.paths[g][i]), self.preprocess), True
        except (ImageLoadError, OSError, ValueError) as err:
            logger.warning("skipping unreadable image %s (%s)", self.paths[g][i], err)
            size = self.preprocess.image_size
            pixels, ok = torch.zeros(3, size, size), False
        return g, i, pixels, ok


def group_rewards(model: ImageReward, groups: Sequence[Mapping[str, Any]], image_root: str | os.PathLike, *,
                  batch_size: int = 16, num_workers: int = 0) -> list[list[float]]:
    """Rewards (with the model's current mean/std) of every generation, per group; ``nan`` = unreadable.
    Images are decoded in DataLoader workers and scored by the one batch engine (``engine.score_pixels``)."""
    was_training = model.training
    model.eval()
    dataset = _ImageDataset(groups, image_root, model.preprocess_config)
    out = [[math.nan] * len(group["generations"]) for group in groups]
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    try:
        for g, i, pixels, ok in loader:
            keep = [k for k, good in enumerate(ok.tolist()) if good]
            if not keep:
                continue
            prompts = [groups[int(g[k])]["prompt"] for k in keep]
            rewards = score_pixels(model, prompts, pixels[keep], list(range(len(keep))))
            for k, reward in zip(keep, rewards.tolist()):
                out[int(g[k])][int(i[k])] = reward
    finally:
        model.train(was_training)
    return out


def test_accuracy(model: ImageReward, groups: Sequence[Mapping[str, Any]], image_root: str | os.PathLike, *,
                  batch_size: int = 16, num_workers: int = 0) -> tuple[float, int]:
    """The original ``test.py`` accuracy (non-tie pairs pooled over prompts, predicted ties wrong), computed
    with the evaluation package's :func:`~ImageReward.eval.metrics.pooled_pair_accuracy`. Returns ``(acc, pairs)``.
    Unreadable images are left out of their prompt's pairs."""
    rewards = group_rewards(model, groups, image_root, batch_size=batch_size, num_workers=num_workers)
    keep = [[k for k, score in enumerate(scores) if not math.isnan(score)] for scores in rewards]
    return pooled_pair_accuracy([[group["ranking"][k] for k in kk] for group, kk in zip(groups, keep)],
                                [[scores[k] for k in kk] for scores, kk in zip(rewards, keep)])


def reference_stats(model: ImageReward, groups: Sequence[Mapping[str, Any]], image_root: str | os.PathLike, *,
                    batch_size: int = 16, num_workers: int = 0) -> tuple[float, float]:
    """Mean and (population) standard deviation of the raw head outputs over a reference set of generations:
    the normalisation stored with the export so rewards come out roughly N(0, 1)."""
    mean, std = model.mean, model.std
    model.mean, model.std = 0.0, 1.0
    try:
        rewards = group_rewards(model, groups, image_root, batch_size=batch_size, num_workers=num_workers)
    finally:
        model.mean, model.std = mean, std
    values = torch.tensor([r for rs in rewards for r in rs if not math.isnan(r)], dtype=torch.float64)
    if values.numel() < 2:
        logger.warning("reference set has %d readable image(s): keeping mean 0, std 1", values.numel())
        return 0.0, 1.0
    std_value = float(values.std(unbiased=False))
    return float(values.mean()), (std_value if std_value > 0 else 1.0)


def export_model(model: ImageReward, directory: str | os.PathLike, *, mean: float, std: float,
                 formats: str = "folder", folder_name: str = "ImageReward", pt_name: str = "ImageReward.pt"
                 ) -> tuple[Path | None, Path | None]:
    """Write the model with normalisation ``mean``/``std``, both forms loadable by ``RM.load``:
    ``formats`` ``"folder"`` -> ``directory/ImageReward/`` (config.json + model.safetensors), ``"pt"`` ->
    ``directory/ImageReward.pt`` (plain keys, no ``module.`` prefix, 0-d ``reward_mean``/``reward_std``; the
    original's format), ``"both"``. Returns ``(folder or None, pt or None)``. Each is written beside its place
    and renamed when complete; :class:`~ImageReward.errors.DiskSpaceError` is raised before writing when the
    disk lacks room."""
    if formats not in ("folder", "pt", "both"):
        raise InvalidInputError(f"export formats must be 'folder', 'pt' or 'both', got {formats!r}")
    directory = Path(directory)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    ensure_free_space(directory, size * (2 if formats == "both" else 1), f"the export {folder_name}")
    folder = pt_path = None
    old = model.mean, model.std
    model.mean, model.std = float(mean), float(std)
    temp = None
    try:
        with disk_errors(f"the export {folder_name}", directory,
                         hint="free space, then export with --export-from <run>/best"):
            if formats in ("folder", "both"):
                folder = directory / folder_name
                temp = folder.with_name(folder.name + ".tmp")
                model.save_pretrained(temp)
                replace_dir(temp, folder)
            if formats in ("pt", "both"):
                pt_path = directory / pt_name
                temp = pt_path.with_suffix(".pt.part")
                torch.save(model.checkpoint_state(), temp)
                os.replace(temp, pt_path)
            temp = None
    finally:
        model.mean, model.std = old
        if temp is not None and temp.exists():  # a failed write: drop the partial copy, keep the old export
            shutil.rmtree(temp, ignore_errors=True) if temp.is_dir() else temp.unlink()
    logger.info("exported %s (mean %.6f, std %.6f)", " and ".join(str(p) for p in (folder, pt_path) if p), mean, std)
    return folder, pt_path
