"""Grouped preference data, pair expansion, and the DataLoader side (decoding happens in the workers).

Grouped format (the original ``data/test.json``): a JSON list of
``{"id": str, "prompt": str, "generations": [relative image paths], "ranking": [int per image]}``;
lower rank = better, ties allowed, values need not be dense.

>>> groups = [{"id": "p", "prompt": "a cat", "generations": ["a.png", "b.png", "c.png"], "ranking": [2, 1, 2]}]
>>> [(p.better, p.worse) for p in expand_pairs(groups)]
[(1, 0), (1, 2)]
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from ..errors import ImageLoadError, InvalidInputError
from ..image_io import load_image
from ..preprocess import PreprocessConfig, preprocess_pil

__all__ = ["Pair", "validate_groups", "read_groups", "write_groups", "expand_pairs", "drop_missing_images",
           "PairDataset", "collate_pairs", "ShardedEpochSampler", "pooled_pair_accuracy"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pair:
    """One non-tie comparison: indices into ``group.generations``; ``better`` has the lower rank value."""

    group: int
    better: int
    worse: int


def validate_groups(groups: Any, source: str = "groups") -> list[dict[str, Any]]:
    """Check the grouped format; raise :class:`InvalidInputError` naming the bad item and what was expected."""
    if not isinstance(groups, list):
        raise InvalidInputError(f"{source}: expected a JSON list of prompt groups, got {type(groups).__name__}")
    for index, group in enumerate(groups):
        where = f"{source}[{index}]"
        if not isinstance(group, Mapping):
            raise InvalidInputError(f"{where}: expected an object with id/prompt/generations/ranking")
        missing = [k for k in ("prompt", "generations", "ranking") if k not in group]
        if missing:
            raise InvalidInputError(f"{where} (id {group.get('id')!r}): missing key(s) {missing}")
        if not isinstance(group["prompt"], str):
            raise InvalidInputError(f"{where}: 'prompt' must be a string")
        gens, ranks = group["generations"], group["ranking"]
        if not isinstance(gens, list) or not all(isinstance(g, str) for g in gens):
            raise InvalidInputError(f"{where}: 'generations' must be a list of image paths")
        if not isinstance(ranks, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
            raise InvalidInputError(f"{where}: 'ranking' must be a list of integers (lower = better)")
        if len(gens) != len(ranks):
            raise InvalidInputError(f"{where}: {len(gens)} generations but {len(ranks)} ranking entries")
    return groups


def read_groups(path: str | os.PathLike, *, encoding: str | None = None) -> list[dict[str, Any]]:
    """Read and validate a grouped JSON file (UTF-8, BOM accepted; ``encoding`` for another)."""
    from ..textio import read_json

    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"dataset file {str(path)!r} does not exist (run train/src/make_dataset.py first)")
    return validate_groups(read_json(path, encoding=encoding, what="dataset file"), str(path))


def write_groups(groups: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write groups as JSON atomically (a partial file never appears under the final name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(path.suffix + ".part")
    temp.write_text(json.dumps(list(groups), indent=1, ensure_ascii=False))
    os.replace(temp, path)
    return path


def expand_pairs(groups: Sequence[Mapping[str, Any]]) -> list[Pair]:
    """Every pair ``i < j`` of a prompt with different ranks; ``better`` = the lower rank value. Ties skipped."""
    pairs = []
    for g, group in enumerate(groups):
        ranks = group["ranking"]
        for i in range(len(ranks)):
            for j in range(i + 1, len(ranks)):
                if ranks[i] < ranks[j]:
                    pairs.append(Pair(g, i, j))
                elif ranks[j] < ranks[i]:
                    pairs.append(Pair(g, j, i))
    return pairs


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
        from ..tokenizer import tokenize

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


def pooled_pair_accuracy(rankings: Sequence[Sequence[int]], rewards: Sequence[Sequence[float]]) -> tuple[float, int]:
    """The original ``test.py`` metric: over all non-tie pairs of every prompt, the fraction ordered strictly
    the same way by the rewards (predicted ties count as wrong), pooled over prompts. Returns ``(acc, pairs)``.

    >>> pooled_pair_accuracy([[1, 2, 3]], [[0.9, 0.5, 0.7]])
    (0.6666666666666666, 3)
    """
    correct = total = 0
    for ranks, scores in zip(rankings, rewards):
        for i in range(len(ranks)):
            for j in range(i + 1, len(ranks)):
                if ranks[i] == ranks[j]:
                    continue
                total += 1
                better, worse = (i, j) if ranks[i] < ranks[j] else (j, i)
                correct += scores[better] > scores[worse]
    return (correct / total if total else float("nan")), total
