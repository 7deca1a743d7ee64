"""Evaluation data sources: the original ``test.json`` + image folder, the ImageRewardDB test split
(parquet metadata + image archives on the Hub), and the generator-benchmark prompts and generations.

>>> items = load_test_json("data/test.json", img_prefix="data/test_images")   # doctest: +SKIP
>>> dataset_stats(items)                                                      # doctest: +SKIP
{'prompts': 466, 'images': 2720, 'pairs': 7230, 'strict_pairs': 6399, 'human_ties': 831}
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import DownloadError, InvalidInputError

__all__ = ["PreferenceItem", "load_test_json", "parse_test_items", "dataset_stats", "load_imagerewarddb",
           "load_benchmark_prompts", "find_generations", "IMAGE_EXTENSIONS", "IMAGEREWARDDB_REPO"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
IMAGEREWARDDB_REPO = "THUDM/ImageRewardDB"


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
    """Validate a ``test.json``-style list (``id, prompt, generations, ranking``) into items."""
    if not isinstance(raw, list):
        raise InvalidInputError(f"{source}: expected a JSON list of objects, got {type(raw).__name__}")
    items = []
    for index, entry in enumerate(raw):
        where = f"{source}: item #{index}"
        if not isinstance(entry, dict):
            raise InvalidInputError(f"{where}: expected an object with id, prompt, generations, ranking")
        missing = [key for key in ("prompt", "generations", "ranking") if key not in entry]
        if missing:
            raise InvalidInputError(f"{where} (id {entry.get('id')!r}): missing field(s) {missing}")
        generations, ranking = entry["generations"], entry["ranking"]
        if not isinstance(entry["prompt"], str):
            raise InvalidInputError(f"{where}: prompt must be a string")
        if not isinstance(generations, list) or not all(isinstance(g, str) for g in generations) or not generations:
            raise InvalidInputError(f"{where}: generations must be a non-empty list of image paths")
        if not isinstance(ranking, list) or len(ranking) != len(generations):
            raise InvalidInputError(f"{where}: ranking must be a list with one rank per generation "
                                    f"({len(generations)}), got {ranking!r}")
        if not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in ranking):
            raise InvalidInputError(f"{where}: ranking values must be numbers (lower = better), got {ranking!r}")
        images = [os.path.join(img_prefix, g) if img_prefix is not None else g for g in generations]
        items.append(PreferenceItem(id=str(entry.get("id", index)), prompt=entry["prompt"],
                                    generations=list(generations), ranking=list(ranking), images=images))
    return items


def load_test_json(path: str | os.PathLike, *, img_prefix: str | os.PathLike | None = None) -> list[PreferenceItem]:
    """Read the original ``test.json`` format; image paths are ``img_prefix/<generation>``."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"test set {str(path)!r} does not exist")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidInputError(f"test set {str(path)!r} is not valid JSON: {err}") from err
    return parse_test_items(raw, img_prefix=img_prefix, source=str(path))


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
def _imagerewarddb_files(root: Path, split: str, download: bool) -> tuple[Path, list[Path]]:
    """The split's parquet file and image archives, downloading them into ``root`` when allowed."""
    metadata_name = f"metadata-{split}.parquet"
    archives_prefix = f"images/{split}/"
    local_archives = sorted((root / archives_prefix).glob("*.zip")) if (root / archives_prefix).is_dir() else []
    if (root / metadata_name).is_file() and (local_archives or not download):
        return root / metadata_name, local_archives
    if not download:
        raise DownloadError(f"ImageRewardDB {split} split not found in {root} (downloads disabled): "
                            f"expected {metadata_name} and {archives_prefix}*.zip")
    try:
        from huggingface_hub import hf_hub_download, list_repo_files

        names = list_repo_files(IMAGEREWARDDB_REPO, repo_type="dataset")
        wanted = [metadata_name] + sorted(n for n in names if n.startswith(archives_prefix) and n.endswith(".zip"))
        for name in wanted:
            hf_hub_download(IMAGEREWARDDB_REPO, name, repo_type="dataset", local_dir=str(root))
    except Exception as err:
        raise DownloadError(f"could not download the ImageRewardDB {split} split from "
                            f"https://huggingface.co/datasets/{IMAGEREWARDDB_REPO} into {root}: "
                            f"{type(err).__name__}: {err}") from err
    return root / metadata_name, sorted((root / archives_prefix).glob("*.zip"))


def load_imagerewarddb(split: str = "test", root: str | os.PathLike | None = None, *, download: bool = True
                       ) -> list[PreferenceItem]:
    """The ImageRewardDB ``split`` as preference items, read directly from ``metadata-<split>.parquet`` and
    the ``images/<split>/*.zip`` archives (the dataset's loading script no longer runs on current
    ``datasets``). Archives are extracted safely next to themselves once; later calls read the folders.

    Columns used: ``image_path``, ``prompt_id``, ``prompt``, ``rank`` (lower = better). Needs ``pyarrow``.
    """
    from ..pretrained import default_cache_dir
    from .download import extract_archive_to

    root = Path(root) if root is not None else default_cache_dir() / "ImageRewardDB"
    metadata, archives = _imagerewarddb_files(root, split, download)
    for archive in archives:
        folder = archive.with_suffix("")
        if not folder.is_dir():
            logger.info("extracting %s", archive)
            extract_archive_to(archive, folder)
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError("reading ImageRewardDB needs pyarrow: pip install 'image-reward[train]'") from err
    table = pq.read_table(metadata, columns=["image_path", "prompt_id", "prompt", "rank"]).to_pydict()
    by_name: dict[str, Path] = {}
    split_dir = root / "images" / split
    if split_dir.is_dir():
        for path in split_dir.rglob("*"):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                by_name.setdefault(path.name, path)
    grouped: dict[str, PreferenceItem] = {}
    for image_path, prompt_id, prompt, rank in zip(table["image_path"], table["prompt_id"], table["prompt"],
                                                   table["rank"]):
        direct = root / image_path
        resolved = direct if direct.is_file() else by_name.get(Path(image_path).name)
        if resolved is None:
            raise InvalidInputError(f"ImageRewardDB {split}: image {image_path!r} (prompt {prompt_id}) is in "
                                    f"{metadata.name} but not in any extracted archive under {split_dir}")
        item = grouped.get(str(prompt_id))
        if item is None:
            item = grouped[str(prompt_id)] = PreferenceItem(id=str(prompt_id), prompt=prompt, generations=[],
                                                            ranking=[], images=[])
        item.generations.append(image_path)
        item.images.append(str(resolved))
        item.ranking.append(int(rank))
    return list(grouped.values())


# ------------------------------------------------------------------------------------------- benchmark
def load_benchmark_prompts(path: str | os.PathLike) -> list[dict[str, str]]:
    """The benchmark prompt list: JSON ``[{"id": ..., "prompt": ...}, ...]``."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"benchmark prompts {str(path)!r} do not exist")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidInputError(f"benchmark prompts {str(path)!r} are not valid JSON: {err}") from err
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
    for entry in os.scandir(model_dir):
        stem, ext = os.path.splitext(entry.name)
        match = _GENERATION.match(stem)
        if ext.lower() in IMAGE_EXTENSIONS and match and match["id"] in wanted and entry.is_file():
            found.setdefault(match["id"], []).append((int(match["k"]), entry.path))
    missing = [pid for pid in prompt_ids if pid not in found]
    if missing:
        raise InvalidInputError(f"{model_dir}: no images <id>_<k>.png for {len(missing)} prompt(s), "
                                f"e.g. {missing[:3]}")
    result = {pid: [path for _, path in sorted(found[pid])] for pid in prompt_ids}
    counts = {len(paths) for paths in result.values()}
    if len(counts) > 1:
        logger.warning("%s: prompts have different numbers of images (%s)", model_dir, sorted(counts))
    return result
