"""The DataLoader side of reward-model training: grouped preference data (format, validator and pair
expansion live in :mod:`ImageReward.preference.groups`, shared with evaluation) -> pairs -> decoded pixels
in the workers, and the resumable sampler.

>>> sampler = ShardedEpochSampler(10, num_replicas=2, rank=1, shuffle=False)
>>> list(sampler)
[1, 3, 5, 7, 9]
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from ..errors import ImageLoadError
from ..image_io import load_image
from ..preference.groups import Pair, expand_pairs, read_groups, validate_groups, write_groups
from ..preprocess import PreprocessConfig, preprocess_pil
from ..tokenizer import tokenize

# Pair, validate_groups, read_groups, write_groups and expand_pairs are imported from the preference package
# (listed here because the trainer and train/ scripts reach them through this module).
__all__ = ["Pair", "validate_groups", "read_groups", "write_groups", "expand_pairs", "drop_missing_images",
           "PairDataset", "collate_pairs", "ShardedEpochSampler"]

logger = logging.getLogger(__name__)


def drop_missing_images(groups: list[dict[str, Any]], image_root: str | os.PathLike, *, source: str = "dataset"
                        ) -> tuple[list[dict[str, Any]], list[str]]:
    """Remove generations whose file does not exist; return ``(groups, missing paths)``. Logged, never silent."""
    root = Path(image_root)
    missing: list[str] = []
    kept = []
    for group in groups:
        gens, ranks = [], []
        for gen, rank in zip(group["generations"], group["ranking"]):
            if (root / gen).is_file():
                gens.append(gen)
                ranks.append(rank)
            else:
                missing.append(str(root / gen))
        kept.append({**group, "generations": gens, "ranking": ranks})
    if missing:
        logger.warning("%s: %d image(s) missing and skipped, e.g. %s", source, len(missing), ", ".join(missing[:5]))
    return kept, missing


class PairDataset(Dataset):
    """Pairs -> ``{input_ids, attention_mask, better, worse, valid}``; images are read and preprocessed in
    ``__getitem__`` (i.e. in DataLoader workers). An unreadable image is reported with its path and the pair
    gets ``valid = False`` (zero pixels), so batches keep their shape and the trainer gives it no weight."""

    def __init__(self, groups: Sequence[Mapping[str, Any]], pairs: Sequence[Pair], image_root: str | os.PathLike,
                 preprocess: PreprocessConfig) -> None:
        self.pairs = list(pairs)
        self.image_root = Path(image_root)
        self.preprocess = preprocess
        self.paths = [list(g["generations"]) for g in groups]
        prompts = [g["prompt"] for g in groups]
        self.input_ids, self.attention_mask = tokenize(prompts) if prompts else (torch.zeros(0, 35), torch.zeros(0, 35))

    def __len__(self) -> int:
        return len(self.pairs)

    def _pixels(self, group: int, index: int) -> torch.Tensor | None:
        path = self.image_root / self.paths[group][index]
        try:
            return preprocess_pil(load_image(path), self.preprocess)
        except (ImageLoadError, OSError, ValueError) as err:
            logger.warning("skipping pair: cannot read image %s (%s)", path, err)
            return None

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pair = self.pairs[index]
        better, worse = self._pixels(pair.group, pair.better), self._pixels(pair.group, pair.worse)
        valid = better is not None and worse is not None
        size = self.preprocess.image_size
        blank = torch.zeros(3, size, size)
        return {
            "input_ids": self.input_ids[pair.group],
            "attention_mask": self.attention_mask[pair.group],
            "better": better if valid else blank,
            "worse": worse if valid else blank,
            "valid": torch.tensor(valid),
        }


def collate_pairs(items: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a list of :class:`PairDataset` items."""
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


class ShardedEpochSampler(Sampler[int]):
    """Deterministic per-epoch order shared by all ranks (``seed + epoch``), padded to a multiple of the number
    of processes and split ``rank::world`` as ``DistributedSampler`` does; :meth:`set_start` skips the items a
    resumed run already consumed. Uses its own generator, never the global RNG (so resuming is exact)."""

    def __init__(self, num_items: int, *, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, pad: bool = True) -> None:
        self.num_items, self.num_replicas, self.rank = num_items, num_replicas, rank
        self.shuffle, self.seed, self.pad = shuffle, seed, pad
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` indices of this rank's share (resume mid-epoch)."""
        self.start = start

    def _indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_items, generator=generator).tolist()
        else:
            order = list(range(self.num_items))
        if self.pad and self.num_items and self.num_items % self.num_replicas:
            extra = self.num_replicas - self.num_items % self.num_replicas
            order += (order * (extra // len(order) + 1))[:extra]
        return order[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start :])

    def __len__(self) -> int:
        return max(0, len(self._indices()) - self.start)
