"""Evaluation data sources: the original ``test.json`` + image folder, the ImageRewardDB test split
(parquet metadata + image archives on the Hub), and the generator-benchmark prompts and generations.

>>> items = load_test_json("data/test.json", img_prefix="data/test_images")   # doctest: +SKIP
>>> dataset_stats(items)                                                      # doctest: +SKIP
{'prompts': 466, 'images': 2720, 'pairs': 7230, 'strict_pairs': 6399, 'human_ties': 831}
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import InvalidInputError
from ..image_io import list_images
from ..preference.groups import read_json, validate_groups
from ..preference.imagerewarddb import convert_split, hub_fetcher, local_fetcher, prepare_split
from ..pretrained import default_cache_dir

__all__ = ["PreferenceItem", "load_test_json", "parse_test_items", "dataset_stats", "load_imagerewarddb",
           "load_benchmark_prompts", "find_generations"]

logger = logging.getLogger(__name__)


@dataclass
class PreferenceItem:
    """One prompt with its images and human ranking (lower = better; ties share a value)."""

    id: str
    prompt: str
    generations: list[str]
    ranking: list[int]
    images: list[str] = field(default_factory=list)  # resolved paths (img_prefix joined)

    def __post_init__(self) -> None:
        if not self.images:
            self.images = list(self.generations)


def parse_test_items(raw: Any, *, img_prefix: str | os.PathLike | None = None, source: str = "test set"
                     ) -> list[PreferenceItem]:
    """Validate a ``test.json``-style list (``id, prompt, generations, ranking``; the one validator,
    :func:`ImageReward.preference.groups.validate_groups`) into items; image paths are ``img_prefix/<generation>``."""
    items = []
    for index, entry in enumerate(validate_groups(raw, source)):
        generations = list(entry["generations"])
        images = [os.path.join(img_prefix, g) if img_prefix is not None else g for g in generations]
        items.append(PreferenceItem(id=str(entry.get("id", index)), prompt=entry["prompt"],
                                    generations=generations, ranking=list(entry["ranking"]), images=images))
    return items


def load_test_json(path: str | os.PathLike, *, img_prefix: str | os.PathLike | None = None,
                   encoding: str | None = None) -> list[PreferenceItem]:
    """Read the original ``test.json`` format; image paths are ``img_prefix/<generation>``. ``encoding``:
    the file's text encoding when not UTF-8 (see :func:`ImageReward.textio.read_text`)."""
    return parse_test_items(read_json(path, "test set", encoding), img_prefix=img_prefix, source=str(path))


def dataset_stats(items: Sequence[PreferenceItem]) -> dict[str, int]:
    """Counts of a preference set: prompts, images, all pairs, strict (counted) pairs and human ties."""
    pairs = strict = 0
    for item in items:
        n = len(item.ranking)
        pairs += n * (n - 1) // 2
        strict += sum(1 for i in range(n) for j in range(i + 1, n) if item.ranking[i] != item.ranking[j])
    return {"prompts": len(items), "images": sum(len(item.images) for item in items), "pairs": pairs,
            "strict_pairs": strict, "human_ties": pairs - strict}


# ----------------------------------------------------------------------------------------- ImageRewardDB
def load_imagerewarddb(split: str = "test", root: str | os.PathLike | None = None, *, download: bool = True,
                       verify: bool = True) -> list[PreferenceItem]:
    """The ImageRewardDB ``split`` as preference items, read directly from ``metadata-<split>.parquet`` and
    the ``images/<split>/*.zip`` archives through the one ImageRewardDB reader
    (:mod:`ImageReward.preference.imagerewarddb`; the dataset's loading script no longer runs on current
    ``datasets``). ``root`` defaults to ``~/.cache/ImageReward/ImageRewardDB``; with ``download=False`` the
    files must already be there. Missing/corrupt images are skipped with a warning (``verify``).
    Needs ``pyarrow``.
    """
    root = Path(root) if root is not None else default_cache_dir() / "ImageRewardDB"
    fetch = hub_fetcher(root=root) if download else local_fetcher(root)
    rows = prepare_split(split, root, fetch=fetch)
    base = root / "images"
    groups = convert_split(rows, root, image_base=base, verify=verify)
    return [PreferenceItem(id=g["id"], prompt=g["prompt"], generations=list(g["generations"]),
                           ranking=list(g["ranking"]), images=[str(base / gen) for gen in g["generations"]])
            for g in groups]


# ------------------------------------------------------------------------------------------- benchmark
def load_benchmark_prompts(path: str | os.PathLike, *, encoding: str | None = None) -> list[dict[str, str]]:
    """The benchmark prompt list: JSON ``[{"id": ..., "prompt": ...}, ...]``."""
    raw = read_json(path, "benchmark prompts", encoding)
    if not isinstance(raw, list) or not all(isinstance(e, dict) and "id" in e and isinstance(e.get("prompt"), str)
                                            for e in raw):
        raise InvalidInputError(f"{path}: expected a JSON list of {{'id', 'prompt'}} objects")
    return [{"id": str(e["id"]), "prompt": e["prompt"]} for e in raw]


_GENERATION = re.compile(r"^(?P<id>.+)_(?P<k>\d+)$")


def find_generations(model_dir: str | os.PathLike, prompt_ids: Iterable[str]) -> dict[str, list[str]]:
    """``<model_dir>/<id>_<k>.<ext>`` files grouped by prompt id, sorted by ``k``.

    Raises :class:`InvalidInputError` naming the folder and the first prompt ids that have no image.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InvalidInputError(f"generation folder {str(model_dir)!r} does not exist")
    wanted = set(prompt_ids)
    found: dict[str, list[tuple[int, str]]] = {}
    for path in list_images(model_dir, recursive=False):  # hidden files (._1_0.png, ...) skipped
        match = _GENERATION.match(path.stem)
        if match and match["id"] in wanted:
            found.setdefault(match["id"], []).append((int(match["k"]), str(path)))
    missing = [pid for pid in prompt_ids if pid not in found]
    if missing:
        raise InvalidInputError(f"{model_dir}: no images <id>_<k>.png for {len(missing)} prompt(s), "
                                f"e.g. {missing[:3]}")
    result = {pid: [path for _, path in sorted(found[pid])] for pid in prompt_ids}
    counts = {len(paths) for paths in result.values()}
    if len(counts) > 1:
        logger.warning("%s: prompts have different numbers of images (%s)", model_dir, sorted(counts))
    return result
