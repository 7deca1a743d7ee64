"""A persistent score cache per (scorer, image, prompt), and cached scoring on top of ``score_batch``.

Scores are stored in one SQLite file (standard library; no pickles) and committed after every chunk,
so a rerun is instant and an interrupted run resumes where it stopped. An image is identified by its
absolute path, size and modification time: an image edited in place is scored again.

>>> cache = ScoreCache("out/score_cache.sqlite")                          # doctest: +SKIP
>>> cached_scores(model, ["a cat"], ["cat.png"], cache=cache, scorer_id="ImageReward-v1.0")  # doctest: +SKIP
[0.58]
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from ..errors import ImageLoadError, InvalidInputError
from ..identity import scorer_identity  # noqa: F401 - its home before it was shared with score-dataset

__all__ = ["ScoreCache", "cached_scores", "image_identity", "scorer_identity"]

logger = logging.getLogger(__name__)


def image_identity(path: str | os.PathLike) -> str:
    """``abs_path|size|mtime_ns`` of an image file (raises :class:`ImageLoadError` if it is missing)."""
    absolute = os.path.abspath(os.fspath(path))
    try:
        info = os.stat(absolute)
    except OSError as err:
        raise ImageLoadError(f"image {os.fspath(path)!r}: file does not exist") from err
    return f"{absolute}|{info.st_size}|{info.st_mtime_ns}"


class ScoreCache:
    """SQLite table ``scores(scorer, image, prompt) -> score``. Safe to reopen; ``with`` closes it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path))
        self._db.execute("CREATE TABLE IF NOT EXISTS scores (scorer TEXT NOT NULL, image TEXT NOT NULL, "
                         "prompt TEXT NOT NULL, score REAL NOT NULL, PRIMARY KEY (scorer, image, prompt))")
        self._db.commit()

    def get_many(self, scorer: str, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], float]:
        """Cached scores of ``(image_identity, prompt)`` keys (absent keys are left out)."""
        found: dict[tuple[str, str], float] = {}
        wanted = set(keys)
        images = sorted({image for image, _ in wanted})
        for start in range(0, len(images), 500):
            chunk = images[start:start + 500]
            rows = self._db.execute(
                f"SELECT image, prompt, score FROM scores WHERE scorer = ? AND image IN ({','.join('?' * len(chunk))})",
                [scorer, *chunk])
            for image, prompt, score in rows:
                if (image, prompt) in wanted:
                    found[(image, prompt)] = score
        return found

    def put_many(self, scorer: str, entries: Sequence[tuple[str, str, float]]) -> None:
        """Store ``(image_identity, prompt, score)`` rows and commit."""
        self._db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?)",
                             [(scorer, image, prompt, float(score)) for image, prompt, score in entries])
        self._db.commit()

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM scores").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "ScoreCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cached_scores(scorer, prompts: Sequence[str], images: Sequence[str | os.PathLike], *,
                  cache: ScoreCache | None = None, scorer_id: str | None = None, batch_size: int | None = None,
                  chunk_pairs: int = 256, progress: bool = False) -> list[float]:
    """Scores of ``(prompts[i], images[i])`` pairs via ``scorer.score_batch``, reading and filling
    ``cache`` (under ``scorer_id``) chunk by chunk. Without a cache this is plain ``score_batch``."""
    if len(prompts) != len(images):
        raise InvalidInputError(f"got {len(prompts)} prompts for {len(images)} images")
    if cache is not None and not scorer_id:
        raise InvalidInputError("a score cache needs a scorer_id naming the scorer and its weights")
    scores: list[float | None] = [None] * len(images)
    keys = [(image_identity(image), prompt) for image, prompt in zip(images, prompts)] if cache is not None else []
    if cache is not None:
        known = cache.get_many(scorer_id, keys)
        for index, key in enumerate(keys):
            scores[index] = known.get(key)
        logger.info("%s: %d of %d scores cached", scorer_id, len(known), len(images))
    todo = [index for index, score in enumerate(scores) if score is None]
    bar = tqdm(total=len(todo), desc=f"scoring ({getattr(scorer, 'name', 'scorer')})", unit="img",
               disable=not progress or not todo)
    for start in range(0, len(todo), chunk_pairs):
        chunk = todo[start:start + chunk_pairs]
        values = scorer.score_batch([prompts[i] for i in chunk], [images[i] for i in chunk],
                                    batch_size=batch_size).tolist()
        for index, value in zip(chunk, values):
            scores[index] = float(value)
        if cache is not None:
            cache.put_many(scorer_id, [(keys[i][0], keys[i][1], scores[i]) for i in chunk])
        bar.update(len(chunk))
    bar.close()
    return [float(s) for s in scores]
