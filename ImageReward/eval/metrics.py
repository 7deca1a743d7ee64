"""Preference-accuracy metrics as pure functions of human rankings and model rewards.

Human rankings follow ``test.json``: **lower rank = better**, ties allowed (shared values). Rewards are the
model's scores (higher = better unless ``higher_is_better=False``). For every prompt and every pair
``i < j`` whose human ranks differ (a *strict* pair):

* ``original``     : counted; correct iff the model strictly agrees. Model ties count as wrong. This is
  exactly the original ``test.py`` (pooled over all pairs of all prompts): 6,399 pairs on ``test.json``.
* ``tie-half``     : a model tie (``|r_i - r_j| <= tie_threshold``) counts 0.5.
* ``ties-dropped`` : model ties are left out of numerator and denominator.
* ``per-prompt``   : the ``original`` accuracy of each prompt, averaged over prompts that have at least
  one strict pair (the paper's caption: "scores are averaged per prompt").

Human ties are never counted. :func:`bootstrap_intervals` resamples *prompts* (pairs of one prompt are
not independent) to give percentile 95% intervals.

>>> pair_counts([1, 2], [0.9, 0.1]).original
(1.0, 1.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..errors import InvalidInputError

__all__ = ["METRICS", "PairCounts", "pair_counts", "accuracies", "pooled_pair_accuracy", "bootstrap_intervals",
           "spearman_rho", "average_ranks", "MetricValue"]

METRICS: tuple[str, ...] = ("original", "tie-half", "ties-dropped", "per-prompt")


@dataclass(frozen=True)
class PairCounts:
    """Counts of one prompt: ``(correct, counted)`` per pooled metric, plus pair statistics."""

    original: tuple[float, float]
    tie_half: tuple[float, float]
    ties_dropped: tuple[float, float]
    strict_pairs: int
    human_ties: int
    model_ties: int


@dataclass(frozen=True)
class MetricValue:
    """An accuracy in [0, 1] with its bootstrap 95% interval (``nan`` when undefined)."""

    value: float
    low: float = math.nan
    high: float = math.nan

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "ci_low": self.low, "ci_high": self.high}


def pair_counts(ranking: Sequence[float], rewards: Sequence[float], *, higher_is_better: bool = True,
                tie_threshold: float = 0.0) -> PairCounts:
    """Pair statistics of one prompt. ``ranking``: human ranks (lower = better); ``rewards``: model scores.

    >>> pair_counts([1, 1, 2], [0.5, 0.7, 0.5])   # one human tie; pair (1,3) is a model tie
    PairCounts(original=(1.0, 2.0), tie_half=(1.5, 2.0), ties_dropped=(1.0, 1.0), strict_pairs=2, human_ties=1, model_ties=1)
    """
    if len(ranking) != len(rewards):
        raise InvalidInputError(f"ranking has {len(ranking)} entries but rewards has {len(rewards)}")
    if tie_threshold < 0:
        raise InvalidInputError(f"tie_threshold must be >= 0, got {tie_threshold}")
    sign = 1.0 if higher_is_better else -1.0
    correct = half = dropped_correct = dropped_count = 0.0
    strict = human_ties = model_ties = 0
    n = len(ranking)
    for i in range(n):
        for j in range(i + 1, n):
            if ranking[i] == ranking[j]:
                human_ties += 1
                continue
            strict += 1
            # positive when the model agrees with the human preference
            agreement = sign * (rewards[i] - rewards[j]) * (1.0 if ranking[i] < ranking[j] else -1.0)
            if agreement > 0:
                correct += 1
            tied = abs(rewards[i] - rewards[j]) <= tie_threshold
            if tied:
                model_ties += 1
                half += 0.5
            else:
                dropped_count += 1
                if agreement > 0:
                    half += 1
                    dropped_correct += 1
    return PairCounts(original=(correct, float(strict)), tie_half=(half, float(strict)),
                      ties_dropped=(dropped_correct, dropped_count), strict_pairs=strict,
                      human_ties=human_ties, model_ties=model_ties)


def _count_matrix(counts: Sequence[PairCounts]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-prompt (numerator, denominator) vectors for each metric."""
    def column(attr: str) -> tuple[np.ndarray, np.ndarray]:
        pairs = np.array([getattr(c, attr) for c in counts], dtype=np.float64).reshape(-1, 2)
        return pairs[:, 0], pairs[:, 1]

    correct, counted = column("original")
    has_pairs = (counted > 0).astype(np.float64)
    per_prompt = np.divide(correct, counted, out=np.zeros_like(correct), where=counted > 0)
    return {"original": (correct, counted), "tie-half": column("tie_half"),
            "ties-dropped": column("ties_dropped"), "per-prompt": (per_prompt, has_pairs)}


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)


def accuracies(counts: Sequence[PairCounts]) -> dict[str, float]:
    """The four metrics (``METRICS``) from per-prompt counts; ``nan`` when nothing is counted.

    >>> accuracies([pair_counts([1, 2], [1.0, 0.0]), pair_counts([1, 2, 3], [0.0, 1.0, 2.0])])["per-prompt"]
    0.5
    """
    matrix = _count_matrix(counts)
    return {name: float(_ratio(num.sum(), den.sum())) for name, (num, den) in matrix.items()}


def pooled_pair_accuracy(rankings: Sequence[Sequence[float]], rewards: Sequence[Sequence[float]]
                         ) -> tuple[float, int]:
    """The ``original`` metric and its number of pairs, from per-prompt rankings and rewards: over all non-tie
    pairs of every prompt, the fraction the rewards order strictly the same way (model ties count as wrong),
    pooled over prompts. Returns ``(accuracy, pairs)``; ``nan`` accuracy without pairs.

    >>> pooled_pair_accuracy([[1, 2, 3]], [[0.9, 0.5, 0.7]])
    (0.6666666666666666, 3)
    """
    counts = [pair_counts(ranking, scores) for ranking, scores in zip(rankings, rewards)]
    return accuracies(counts)["original"], int(sum(c.original[1] for c in counts))


def bootstrap_intervals(counts: Sequence[PairCounts], *, n_boot: int = 1000, seed: int = 0,
                        level: float = 0.95) -> dict[str, MetricValue]:
    """Each metric with a percentile bootstrap interval, resampling prompts with replacement.

    ``n_boot=0`` gives the point values with ``nan`` intervals. Deterministic for a given ``seed``.
    """
    point = accuracies(counts)
    if n_boot <= 0 or not counts:
        return {name: MetricValue(value) for name, value in point.items()}
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(len(counts), np.full(len(counts), 1.0 / len(counts)), size=n_boot).astype(np.float64)
    tail = (1.0 - level) / 2.0 * 100.0
    result = {}
    for name, (num, den) in _count_matrix(counts).items():
        samples = _ratio(weights @ num, weights @ den)
        samples = samples[~np.isnan(samples)]
        if samples.size == 0:
            result[name] = MetricValue(point[name])
            continue
        low, high = np.percentile(samples, [tail, 100.0 - tail])
        result[name] = MetricValue(point[name], float(low), float(high))
    return result


def average_ranks(values: Sequence[float], *, descending: bool = False) -> list[float]:
    """1-based ranks with ties sharing their average rank (as Spearman's rho needs).

    >>> average_ranks([10, 20, 20, 30])
    [1.0, 2.5, 2.5, 4.0]
    """
    array = np.asarray(values, dtype=np.float64)
    if descending:
        array = -array
    order = np.argsort(array, kind="stable")
    ranks = np.empty(len(array), dtype=np.float64)
    position = 0
    while position < len(order):
        end = position
        while end + 1 < len(order) and array[order[end + 1]] == array[order[position]]:
            end += 1
        ranks[order[position:end + 1]] = (position + end) / 2.0 + 1.0
        position = end + 1
    return ranks.tolist()


def spearman_rho(x: Sequence[float] | Mapping[str, float], y: Sequence[float] | Mapping[str, float]) -> float:
    """Spearman's rank correlation (Pearson correlation of average ranks). Mappings are matched by key.

    >>> spearman_rho([1, 2, 3], [30, 20, 10])
    -1.0
    """
    if isinstance(x, Mapping) and isinstance(y, Mapping):
        keys = [k for k in x if k in y]
        x, y = [x[k] for k in keys], [y[k] for k in keys]
    if len(x) != len(y):
        raise InvalidInputError(f"spearman_rho needs equal lengths, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return math.nan
    rx, ry = np.asarray(average_ranks(x)), np.asarray(average_ranks(y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float((rx ** 2).sum() * (ry ** 2).sum()))
    return float((rx * ry).sum() / denominator) if denominator > 0 else math.nan
