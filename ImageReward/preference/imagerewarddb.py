"""ImageRewardDB (``THUDM/ImageRewardDB``) read directly from its parquet metadata and image archives, and
converted to the grouped preference format ``{id, prompt, generations, ranking}`` (:mod:`.groups`), for both
evaluation (``eval-preference --imagerewarddb-split``) and reward-model training (``make_dataset``).

The dataset's loading script no longer runs on ``datasets`` >= 4, so we fetch ``metadata-<split>.parquet``
and ``images/<split>/<split>_<k>.zip`` with ``huggingface_hub`` (cached; honours ``HF_HUB_OFFLINE``), extract
each archive once (safely, into ``images/<split>/<split>_<k>/``) and group the rows by ``prompt_id``. The train
scales are nested: ``1k`` = the first archives (in numeric order) covering 1,000 prompts, ``8k`` = all.

>>> groups = convert_split(prepare_split("train", "data/ImageRewardDB", scale="1k"), "data/ImageRewardDB")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import DownloadError, ImageLoadError, InvalidInputError
from ..image_io import load_image
from ..pretrained import hub_unreachable
from .archives import extract_archive_to
from .groups import expand_pairs, read_groups, write_groups

__all__ = ["IMAGEREWARDDB_REPO", "SPLITS", "SCALES", "read_metadata", "archive_part", "select_parts",
           "prepare_split", "convert_split", "make_dataset", "hub_fetcher", "local_fetcher"]

logger = logging.getLogger(__name__)

IMAGEREWARDDB_REPO = "THUDM/ImageRewardDB"
SPLITS = {"train": "train", "valid": "validation", "validation": "validation", "test": "test"}
SCALES = {"1k": 1000, "2k": 2000, "4k": 4000, "8k": 8000}
_COLUMNS = ("image_path", "prompt_id", "prompt", "rank")

Fetcher = Callable[[str], Path]


def hub_fetcher(repo_id: str = IMAGEREWARDDB_REPO, root: str | os.PathLike = ".", revision: str | None = None
                ) -> Fetcher:
    """``repo path -> local file`` through ``huggingface_hub`` into ``root`` (kept; re-runs do not re-download)."""
    def fetch(name: str) -> Path:
        local = Path(root) / name
        if local.is_file():
            return local
        from huggingface_hub import hf_hub_download

        unreachable = hub_unreachable()
        if unreachable:
            raise DownloadError(f"could not get {name} from https://huggingface.co/datasets/{repo_id} into {root}: "
                                f"{unreachable}", reason=unreachable)
        try:
            return Path(hf_hub_download(repo_id, name, repo_type="dataset", revision=revision, local_dir=str(root)))
        except Exception as err:
            raise DownloadError(f"could not get {name} from https://huggingface.co/datasets/{repo_id} into {root}: "
                                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    return fetch


def local_fetcher(mirror: str | os.PathLike) -> Fetcher:
    """``repo path -> file`` inside an already downloaded copy of the dataset repository."""
    def fetch(name: str) -> Path:
        path = Path(mirror) / name
        if not path.is_file():
            raise InvalidInputError(f"{path} does not exist (expected a copy of {IMAGEREWARDDB_REPO} in {mirror})")
        return path
    return fetch


def read_metadata(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of ``metadata-<split>.parquet`` (or a per-archive ``<part>.json``) with the columns we use."""
    path = Path(path)
    if path.suffix == ".json":
        from ..textio import read_json

        rows = read_json(path, what="ImageRewardDB metadata")
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ImportError("reading ImageRewardDB needs pyarrow: pip install pyarrow (or, in this project's "
                              "checkout, pip install -e '.[train]')") from err
        table = pq.read_table(path)
        missing = [c for c in _COLUMNS if c not in table.column_names]
        if missing:
            raise InvalidInputError(f"{path}: missing column(s) {missing}; has {table.column_names}")
        rows = table.select(list(_COLUMNS)).to_pylist()
    for index, row in enumerate(rows):
        if not all(key in row for key in _COLUMNS):
            raise InvalidInputError(f"{path}: row #{index} lacks one of {_COLUMNS}")
    return rows


def archive_part(image_path: str) -> str:
    """``images/train/train_3/x.webp`` -> ``train_3`` (the archive that holds the image)."""
    parts = Path(image_path).parts
    if len(parts) < 4 or parts[0] != "images":
        raise InvalidInputError(f"unexpected ImageRewardDB image_path {image_path!r} (expected images/<split>/<part>/<file>)")
    return parts[2]


def _part_number(part: str) -> int:
    match = re.search(r"(\d+)$", part)
    return int(match.group(1)) if match else 0


def select_parts(rows: Sequence[dict[str, Any]], scale: str | None) -> list[str]:
    """The archives of a split in numeric order; for a train ``scale`` the shortest prefix covering its
    number of prompts (nested subsets: 1k within 2k within 4k within 8k)."""
    prompts_per_part: dict[str, set] = {}
    for row in rows:
        prompts_per_part.setdefault(archive_part(row["image_path"]), set()).add(row["prompt_id"])
    parts = sorted(prompts_per_part, key=lambda p: (_part_number(p), p))
    if scale is None:
        return parts
    if scale not in SCALES:
        raise InvalidInputError(f"scale must be one of {list(SCALES)}, got {scale!r}")
    chosen, seen = [], set()
    for part in parts:
        if len(seen) >= SCALES[scale]:
            break
        chosen.append(part)
        seen |= prompts_per_part[part]
    return chosen


def prepare_split(split: str, root: str | os.PathLike, *, scale: str | None = None,
                  fetch: Fetcher | None = None) -> list[dict[str, Any]]:
    """Fetch the metadata and the needed archives of ``split`` (``train``/``valid``/``test``) into ``root``
    and extract them once. Returns the metadata rows of the chosen archives. Re-runs reuse what is there."""
    if split not in SPLITS:
        raise InvalidInputError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    name = SPLITS[split]
    root = Path(root)
    fetch = fetch or hub_fetcher(root=root)
    rows = read_metadata(fetch(f"metadata-{name}.parquet"))
    parts = select_parts(rows, scale if name == "train" else None)
    for part in parts:
        folder = root / "images" / name / part
        if folder.is_dir():
            continue
        archive = fetch(f"images/{name}/{part}.zip")
        logger.info("extracting %s -> %s", archive, folder)
        extract_archive_to(archive, folder)
    wanted = set(parts)
    return [row for row in rows if archive_part(row["image_path"]) in wanted]


def convert_split(rows: Sequence[dict[str, Any]], root: str | os.PathLike, *, image_base: str | os.PathLike | None = None,
                  verify: bool = True, bad_images: list[str] | None = None) -> list[dict[str, Any]]:
    """Group rows by ``prompt_id`` (first-appearance order) into ``{id, prompt, generations, ranking}``.

    ``generations`` are relative to ``image_base`` (default ``root/images``). Missing images, and with
    ``verify`` undecodable ones, are logged with their paths, appended to ``bad_images`` and left out.
    Prompts left with fewer than two distinct ranks (no pairs) are dropped, with a count in the log.
    """
    root = Path(root)
    base = Path(image_base) if image_base is not None else root / "images"
    bad = bad_images if bad_images is not None else []
    groups: dict[str, dict[str, Any]] = {}
    for row in rows:
        path = root / row["image_path"]
        if not path.is_file():
            logger.warning("ImageRewardDB: missing image %s (prompt %s); skipped", path, row["prompt_id"])
            bad.append(str(path))
            continue
        if verify:
            try:
                load_image(path)
            except ImageLoadError as err:
                logger.warning("ImageRewardDB: corrupt image skipped: %s", err)
                bad.append(str(path))
                continue
        group = groups.setdefault(str(row["prompt_id"]), {"id": str(row["prompt_id"]), "prompt": row["prompt"],
                                                           "generations": [], "ranking": []})
        group["generations"].append(os.path.relpath(path, base).replace(os.sep, "/"))
        group["ranking"].append(int(row["rank"]))
    kept = [g for g in groups.values() if len(set(g["ranking"])) >= 2]
    if len(kept) < len(groups):
        logger.info("dropped %d prompt(s) with fewer than two distinct ranks", len(groups) - len(kept))
    if bad:
        logger.warning("%d image(s) missing or corrupt were skipped (see the list written by make_dataset)", len(bad))
    return kept


def make_dataset(root: str | os.PathLike, out: str | os.PathLike, *, scale: str = "8k",
                 splits: Sequence[str] = ("train", "valid", "test"), fetch: Fetcher | None = None,
                 image_base: str | os.PathLike | None = None, verify: bool = True) -> dict[str, dict[str, int]]:
    """ImageRewardDB -> ``out/{train,valid,test}.json`` (grouped format, paths relative to ``image_base``,
    default ``root/images``) and ``out/bad_images.txt`` (missing/corrupt images that were skipped).
    Each split file is written atomically once complete, so an interrupted run redoes only what is missing.

    >>> make_dataset(".", "dataset", scale="1k")  # doctest: +SKIP
    {'train': {'prompts': 1000, 'images': ..., 'pairs': ..., 'skipped_images': ...}, ...}
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, dict[str, int]] = {}
    for split in splits:
        target = out / f"{split}.json"
        bad: list[str] = []
        if target.is_file():
            logger.info("%s exists: kept (delete it to rebuild)", target)
            groups = read_groups(target)
        else:
            rows = prepare_split(split, root, scale=scale, fetch=fetch)
            groups = convert_split(rows, root, image_base=image_base, verify=verify, bad_images=bad)
            if bad:
                with open(out / "bad_images.txt", "a") as handle:
                    handle.write("".join(f"{split}\t{path}\n" for path in bad))
            write_groups(groups, target)
        summary[split] = {"prompts": len(groups), "images": sum(len(g["generations"]) for g in groups),
                          "pairs": len(expand_pairs(groups)), "skipped_images": len(bad)}
        logger.info("%s: %s", target, summary[split])
    return summary
