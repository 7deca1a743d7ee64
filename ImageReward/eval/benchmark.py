"""Generator benchmark (the paper's Table 1): mean reward of each generation model's images.

For each prompt the mean of its images' rewards is taken; a model's score is the mean of those per-prompt
means (as the original ``test-benchmark.py``). Models are ranked by score and compared with a human
ranking by Spearman's rho.

>>> prompts = load_benchmark_prompts("benchmark/benchmark-prompts.json")                # doctest: +SKIP
>>> result = evaluate_benchmark(model, prompts, "benchmark/generations", ["sd1-4", "vd"])  # doctest: +SKIP
>>> result.scores                                                                        # doctest: +SKIP
{'sd1-4': 0.1344, 'vd': -0.247}
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..disk import atomic_write_text
from ..errors import InvalidInputError
from .cache import ScoreCache, cached_scores
from .data import find_generations
from .metrics import average_ranks, spearman_rho

__all__ = ["BenchmarkResult", "evaluate_benchmark", "write_benchmark_outputs"]


@dataclass
class BenchmarkResult:
    """One scorer over several generation models."""

    name: str
    scores: dict[str, float]                      # model -> mean of per-prompt means
    items: dict[str, list[dict[str, Any]]]        # model -> [{id, prompt, mean_score, rewards}]
    higher_is_better: bool = True

    def ranks(self) -> dict[str, float]:
        """1-based rank of each model (1 = best; ties share the average rank)."""
        models = list(self.scores)
        ranks = average_ranks([self.scores[m] for m in models], descending=self.higher_is_better)
        return dict(zip(models, ranks))

    def spearman(self, human_rank: Mapping[str, float]) -> float:
        """Spearman's rho between our ranks and ``human_rank`` (1 = best) over the models in both."""
        common = [m for m in self.scores if m in human_rank]
        if len(common) < 2:
            return math.nan
        ours = self.ranks()
        return spearman_rho([ours[m] for m in common], [float(human_rank[m]) for m in common])


def evaluate_benchmark(scorer, prompts: Sequence[Mapping[str, str]], img_dir: str | os.PathLike,
                       models: Sequence[str], *, name: str | None = None, cache: ScoreCache | None = None,
                       scorer_id: str | None = None, batch_size: int | None = None,
                       progress: bool = False) -> BenchmarkResult:
    """Score ``img_dir/<model>/<id>_<k>.png`` for every prompt and model with any scorer."""
    from ..validation import check_optional_int

    check_optional_int("batch_size", batch_size)
    if not prompts:
        raise InvalidInputError("the benchmark prompt list is empty")
    if not models:
        raise InvalidInputError("no generation models to evaluate")
    ids = [p["id"] for p in prompts]
    scores, items = {}, {}
    for model in models:
        generations = find_generations(Path(img_dir) / model, ids)
        pair_prompts = [p["prompt"] for p in prompts for _ in generations[p["id"]]]
        pair_images = [path for p in prompts for path in generations[p["id"]]]
        flat = cached_scores(scorer, pair_prompts, pair_images, cache=cache, scorer_id=scorer_id,
                             batch_size=batch_size, progress=progress)
        position, rows = 0, []
        for prompt in prompts:
            count = len(generations[prompt["id"]])
            rewards = flat[position:position + count]
            position += count
            rows.append({"id": prompt["id"], "prompt": prompt["prompt"], "mean_score": float(np.mean(rewards)),
                         "rewards": rewards})
        items[model] = rows
        scores[model] = float(np.mean([row["mean_score"] for row in rows]))
    return BenchmarkResult(name=name or getattr(scorer, "name", "scorer"), scores=scores, items=items,
                           higher_is_better=bool(getattr(scorer, "higher_is_better", True)))


def _dump(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=4, ensure_ascii=False), errors="backslashreplace")


def write_benchmark_outputs(result: BenchmarkResult, result_dir: str | os.PathLike) -> list[Path]:
    """The original's files: ``<dir>/<scorer>/<scorer>-benchmark-<model>-result.json`` per model and
    ``<dir>/<scorer>-benchmark-results.json`` (``{model: score}``)."""
    result_dir = Path(result_dir)
    written = []
    for model, rows in result.items.items():
        path = result_dir / result.name / f"{result.name}-benchmark-{model}-result.json"
        _dump(path, rows)
        written.append(path)
    path = result_dir / f"{result.name}-benchmark-results.json"
    _dump(path, result.scores)
    written.append(path)
    return written
