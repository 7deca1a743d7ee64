"""Preference-accuracy protocol (the paper's Table 3): score every prompt's images with a scorer and
compare with the human ranking.

>>> items = load_test_json("data/test.json", img_prefix="data/test_images")       # doctest: +SKIP
>>> result = evaluate_preference(RM.load("ImageReward-v1.0"), items)              # doctest: +SKIP
>>> round(100 * result.metrics["original"].value, 2)                              # doctest: +SKIP
65.14
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..disk import atomic_write_text
from ..errors import InvalidInputError
from ..scorer import rank_descending
from .cache import ScoreCache, cached_scores
from .data import PreferenceItem
from .metrics import MetricValue, PairCounts, bootstrap_intervals, pair_counts

__all__ = ["PreferenceResult", "evaluate_preference", "write_predictions"]

logger = logging.getLogger(__name__)


@dataclass
class PreferenceResult:
    """One scorer on one preference set: per-prompt predictions, per-prompt pair counts, the metrics."""

    name: str
    records: list[dict[str, Any]]  # the original's {id, prompt, ranking, rewards}
    counts: list[PairCounts]
    metrics: dict[str, MetricValue]
    higher_is_better: bool = True
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready metrics and pair statistics."""
        return {"name": self.name, "metrics": {k: v.as_dict() for k, v in self.metrics.items()},
                "strict_pairs": sum(c.strict_pairs for c in self.counts),
                "human_ties": sum(c.human_ties for c in self.counts),
                "model_ties": sum(c.model_ties for c in self.counts), **self.settings}


def evaluate_preference(scorer, items: Sequence[PreferenceItem], *, name: str | None = None,
                        cache: ScoreCache | None = None, scorer_id: str | None = None,
                        batch_size: int | None = None, tie_threshold: float = 0.0, n_boot: int = 1000,
                        seed: int = 0, progress: bool = False) -> PreferenceResult:
    """Score each item's images for its prompt with any :class:`~ImageReward.scorer.Scorer` and compute
    the four preference metrics (see :mod:`ImageReward.eval.metrics`) with bootstrap 95% intervals.

    ``records`` hold what the original ``test.py`` wrote: ``{id, prompt, ranking, rewards}`` where
    ``ranking`` is the model's 1-based rank of each image (as ``inference_rank``).
    """
    from ..validation import check_float, check_non_negative_int, check_optional_int

    check_optional_int("batch_size", batch_size)
    check_float("tie_threshold", tie_threshold, minimum=0.0)
    check_non_negative_int("n_boot", n_boot)
    check_non_negative_int("seed", seed)
    if not items:
        raise InvalidInputError("the preference set is empty")
    prompts = [item.prompt for item in items for _ in item.images]
    images = [image for item in items for image in item.images]
    flat = cached_scores(scorer, prompts, images, cache=cache, scorer_id=scorer_id, batch_size=batch_size,
                         progress=progress)
    higher = bool(getattr(scorer, "higher_is_better", True))
    records, counts, position = [], [], 0
    for item in items:
        rewards = flat[position:position + len(item.images)]
        position += len(item.images)
        tensor = torch.tensor(rewards, dtype=torch.float64)
        ranking = rank_descending(tensor if higher else -tensor)
        records.append({"id": item.id, "prompt": item.prompt, "ranking": ranking, "rewards": rewards})
        counts.append(pair_counts(item.ranking, rewards, higher_is_better=higher, tie_threshold=tie_threshold))
    metrics = bootstrap_intervals(counts, n_boot=n_boot, seed=seed)
    label = name or getattr(scorer, "name", "scorer")
    return PreferenceResult(name=label, records=records, counts=counts, metrics=metrics, higher_is_better=higher,
                            settings={"tie_threshold": tie_threshold, "n_boot": n_boot, "seed": seed})


def write_predictions(result: PreferenceResult, path: str | os.PathLike) -> Path:
    """Write ``records`` as the original did (a JSON list, indent 4, UTF-8, ``ensure_ascii=False``)."""
    # a lone surrogate (an undecodable file name) as its JSON escape
    return atomic_write_text(path, json.dumps(result.records, indent=4, ensure_ascii=False), errors="backslashreplace")
