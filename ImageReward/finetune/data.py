"""Prompt and image-text data for ReFL, and a resumable batch order.

Prompt files: JSON ``[{"text": ...}, ...]`` (the original's ``refl_data.json``), JSONL, CSV (a header with the
caption column) or TXT (one prompt per line); or a Hub dataset. Everything is read and checked up front, so
a bad file fails with a :class:`PromptDataError` naming the file and the row before any model loads.

The batch order is a pure function of ``(seed, epoch, process)``: resuming at micro-step ``k`` yields exactly
the batches an uninterrupted run would have seen.

>>> prompts = load_prompts("data/example_prompts.json")   # doctest: +SKIP
>>> order = BatchOrder(len(prompts), batch_size=2, seed=0)
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import InvalidInputError

__all__ = ["PromptDataError", "load_prompts", "load_records", "load_image_text", "BatchOrder", "ImageTextExample"]

logger = logging.getLogger(__name__)


class PromptDataError(InvalidInputError):
    """A prompt or image-text file that cannot be used (missing, malformed, empty, wrong column)."""


def _records_from_file(path: Path, encoding: str | None = None) -> list[Any]:
    """Rows of a JSON / JSONL / CSV / TXT file (dicts, or strings for TXT and JSON string lists), read by the
    one text reader (UTF-8, byte-order mark accepted; ``encoding`` for another)."""
    from ..textio import read_text

    if not path.is_file():
        raise PromptDataError(f"{str(path)!r}: file not found" if not path.exists() else
                              f"{str(path)!r}: not a regular file")
    suffix = path.suffix.lower()
    try:
        text = read_text(path, encoding=encoding, what="prompt file")
    except InvalidInputError as err:
        raise PromptDataError(str(err)) from err
    try:
        if suffix == ".json":
            data = json.loads(text)
            if isinstance(data, dict):  # {"data": [...]} style
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise PromptDataError(f"{str(path)!r}: expected a JSON list of objects like "
                                          "[{\"text\": \"a prompt\"}, ...]")
                data = lists[0]
            if not isinstance(data, list):
                raise PromptDataError(f"{str(path)!r}: expected a JSON list, got {type(data).__name__}")
            return data
        if suffix == ".jsonl":
            rows = []
            for number, line in enumerate(text.split("\n"), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise PromptDataError(f"{str(path)!r} line {number}: invalid JSON ({err.msg})") from None
            return rows
        if suffix in (".csv", ".tsv"):
            try:
                return list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ","))
            except csv.Error as err:
                raise PromptDataError(f"{str(path)!r}: not a valid {suffix[1:].upper()} table ({err})") from None
        if suffix == ".txt":
            return [line.strip() for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise PromptDataError(f"{str(path)!r}: invalid JSON at line {err.lineno} ({err.msg})") from None
    raise PromptDataError(f"{str(path)!r}: unsupported extension {suffix!r}; use .json, .jsonl, .csv, .tsv or .txt")


def _records_from_hub(name: str, config_name: str | None, cache_dir: str | None) -> list[Any]:
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise PromptDataError(f"--dataset_name {name!r} needs the `datasets` package: pip install datasets") from err
    ds = datasets.load_dataset(name, config_name, cache_dir=cache_dir, split="train")
    return list(ds)


def load_records(path: str | os.PathLike | None = None, *, dataset_name: str | None = None,
                 dataset_config_name: str | None = None, cache_dir: str | None = None,
                 encoding: str | None = None) -> list[Any]:
    """Raw rows of a local file or of a Hub dataset's train split."""
    if dataset_name:
        return _records_from_hub(dataset_name, dataset_config_name, cache_dir)
    if path is None:
        raise PromptDataError("no prompt file given")
    return _records_from_file(Path(path), encoding)


def _caption(row: Any, column: str, where: str, rng: random.Random) -> str:
    value = row if isinstance(row, str) else (row.get(column) if isinstance(row, dict) else None)
    if isinstance(row, dict) and column not in row:
        raise PromptDataError(f"{where}: no {column!r} field (fields: {sorted(row)}); set --caption_column")
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = rng.choice(value)  # the original picks a random caption from a list
    if not isinstance(value, str) or not value.strip():
        raise PromptDataError(f"{where}: expected a non-empty string prompt, got {value!r}")
    return value.strip()


def load_prompts(path: str | os.PathLike | None = None, *, caption_column: str = "text",
                 dataset_name: str | None = None, dataset_config_name: str | None = None,
                 cache_dir: str | None = None, max_samples: int | None = None, seed: int | None = None,
                 encoding: str | None = None) -> list[str]:
    """All prompts of a file or Hub dataset (``max_samples``: the first N after a seeded shuffle).
    ``encoding``: the file's text encoding when not UTF-8 (a byte-order mark is always honoured)."""
    from ..validation import check_optional_int

    check_optional_int("max_samples", max_samples)
    rows = load_records(path, dataset_name=dataset_name, dataset_config_name=dataset_config_name, cache_dir=cache_dir,
                        encoding=encoding)
    source = dataset_name or str(path)
    rng = random.Random(seed or 0)
    prompts = [_caption(row, caption_column, f"{source!r} row {i}", rng) for i, row in enumerate(rows)]
    if not prompts:
        raise PromptDataError(f"{source!r}: no prompts")
    if max_samples is not None:
        rng.shuffle(prompts)
        prompts = prompts[:max_samples]
    return prompts


@dataclass(frozen=True)
class ImageTextExample:
    """One pre-training pair: an image file and its caption."""

    image: str
    text: str


def load_image_text(path: str | os.PathLike, *, caption_column: str = "text", image_column: str = "image",
                    image_base_dir: str = "", encoding: str | None = None) -> list[ImageTextExample]:
    """Image-text pairs for the pre-training loss; every image path must exist (checked here, up front)."""
    rows = _records_from_file(Path(path), encoding)
    rng = random.Random(0)
    examples = []
    for i, row in enumerate(rows):
        where = f"{str(path)!r} row {i}"
        if not isinstance(row, dict) or image_column not in row:
            raise PromptDataError(f"{where}: expected an object with {image_column!r} and {caption_column!r}")
        image = os.path.join(image_base_dir, str(row[image_column]))
        if not os.path.isfile(image):
            raise PromptDataError(f"{where}: image {image!r} not found (is --image_base_dir right?)")
        examples.append(ImageTextExample(image=image, text=_caption(row, caption_column, where, rng)))
    if not examples:
        raise PromptDataError(f"{str(path)!r}: no image-text pairs")
    return examples


class BatchOrder:
    """Deterministic, resumable batches of indices for one process.

    Epoch ``e`` is a permutation drawn from ``seed + e``; process ``p`` of ``n`` takes every ``n``-th batch.
    Micro-step ``k`` of this process maps to one batch, so resuming at ``k`` reproduces the data exactly.
    A short final batch is dropped (the original's latents assumed full batches).
    """

    def __init__(self, size: int, batch_size: int, seed: int = 0, *, process_index: int = 0,
                 num_processes: int = 1) -> None:
        from ..validation import check_int, check_non_negative_int, check_positive_int

        check_non_negative_int("size", size)
        check_positive_int("batch_size", batch_size)
        check_positive_int("num_processes", num_processes)
        check_int("process_index", process_index, minimum=0, maximum=num_processes - 1)
        per_epoch = size // (batch_size * num_processes)
        if per_epoch < 1:
            raise PromptDataError(f"{size} prompts are fewer than one batch of {batch_size} x {num_processes} "
                                  "processes: lower --train_batch_size or add prompts")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.process_index, self.num_processes = process_index, num_processes
        self.batches_per_epoch = per_epoch

    def batch(self, micro_step: int) -> list[int]:
        """Indices of this process's batch number ``micro_step`` (0-based, counting across epochs)."""
        epoch, position = divmod(micro_step, self.batches_per_epoch)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        start = (position * self.num_processes + self.process_index) * self.batch_size
        return order[start : start + self.batch_size]

    def take(self, items: Sequence[Any], micro_step: int) -> list[Any]:
        """The items of batch ``micro_step``."""
        return [items[i] for i in self.batch(micro_step)]
