"""What an ImageReward score means, and helpers to turn scores into probabilities and z-scores.

An ImageReward score is the reward head's output standardised with the mean and standard deviation the
authors measured on ImageRewardDB: ``score = (head - 0.1672) / 1.0333``. So ``0`` is roughly an average
generated image for its prompt in that data, ``+1`` about one standard deviation better. Scores compare
*images for the same prompt* best; across prompts they mix prompt difficulty with image quality, which is
what :func:`zscore` against a reference set of your own corrects for.

The model was trained with a Bradley-Terry (pairwise logistic) loss, so a difference of scores is a
preference log-odds: :func:`preference_probability` gives ``P(a preferred over b) = sigmoid(r_a - r_b)``.
The head was trained on the *unstandardised* output, so the model's own training-time probability is
``sigmoid(1.0333 * (r_a - r_b))``: pass ``scale=IMAGE_REWARD_STD`` for it (a 3% sharper curve). How well
these probabilities are calibrated against real people is an empirical question: the paper reports about
65% pairwise agreement with annotators on the ImageRewardDB test set, so read them as the model's belief.

>>> round(preference_probability(1.0, 0.0), 4)
0.7311
>>> ref = ReferenceStats.from_scores([0.0, 1.0, 2.0])
>>> zscore([1.0, 3.0], ref).tolist()
[0.0, 2.0]
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np

from ..errors import InvalidInputError

__all__ = ["preference_probability", "ReferenceStats", "zscore", "percentile_rank", "IMAGE_REWARD_STD"]

IMAGE_REWARD_STD = 1.0333394966054072  # the standardisation std of ImageReward-v1.0 (see models/image_reward.py)

ArrayLike = Union[float, Sequence[float], np.ndarray, "torch.Tensor"]  # noqa: F821


def _as_array(values: ArrayLike, what: str) -> np.ndarray:
    if type(values).__module__.startswith("torch"):
        values = values.detach().cpu().double().numpy()  # type: ignore[union-attr]
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InvalidInputError(f"{what} must be numbers, got {type(values).__name__}") from err
    return array


def _like_input(result: np.ndarray, *inputs: ArrayLike):
    """A Python float for scalar inputs, a torch tensor if any input was one, else a numpy array."""
    for value in inputs:
        if type(value).__module__.startswith("torch"):
            import torch

            return torch.from_numpy(np.ascontiguousarray(result)).to(value.dtype if value.is_floating_point()
                                                                       else torch.float32)
    if result.ndim == 0:
        return float(result)
    return result


def preference_probability(r_a: ArrayLike, r_b: ArrayLike, *, scale: float = 1.0):
    """``P(image a is preferred over image b) = sigmoid(scale * (r_a - r_b))``, for the same prompt.

    Broadcasts like numpy; returns a float for scalars, a numpy array or a torch tensor to match the input.
    ``scale=IMAGE_REWARD_STD`` reproduces the ImageReward head's training-time Bradley-Terry probability.

    >>> round(preference_probability(0.5, 0.5), 2)
    0.5
    >>> preference_probability([2.0, 0.0], [0.0, 2.0]).round(3)
    array([0.881, 0.119])
    """
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise InvalidInputError(f"scale must be a positive finite number, got {scale!r}")
    a, b = _as_array(r_a, "r_a"), _as_array(r_b, "r_b")
    try:
        diff = scale * (a - b)
    except ValueError as err:
        raise InvalidInputError(f"r_a {a.shape} and r_b {b.shape} do not broadcast") from err
    # numerically stable logistic: never overflows for large |diff|
    prob = np.where(diff >= 0, 1.0 / (1.0 + np.exp(-np.abs(diff))), np.exp(-np.abs(diff)) / (1.0 + np.exp(-np.abs(diff))))
    return _like_input(prob, r_a, r_b)


@dataclass(frozen=True)
class ReferenceStats:
    """Summary of a reference set of scores (e.g. your baseline generator on your prompts).

    Keeps the mean, the standard deviation and a sorted sample (up to 10 000 values) for percentiles.

    >>> ReferenceStats.from_scores([1.0, 2.0, 3.0]).mean
    2.0
    """

    mean: float
    std: float
    count: int
    quantiles: tuple[float, ...] = ()

    @classmethod
    def from_scores(cls, scores: Iterable[float] | ArrayLike, *, max_quantiles: int = 10_000) -> "ReferenceStats":
        """Mean, sample standard deviation (ddof=1) and sorted quantiles of ``scores`` (NaN/None dropped)."""
        from ..validation import check_int

        check_int("max_quantiles", max_quantiles, minimum=2)
        values = _as_array([s for s in scores if s is not None] if not isinstance(scores, np.ndarray)
                           and not type(scores).__module__.startswith("torch") else scores, "scores").ravel()
        values = values[np.isfinite(values)]
        if values.size < 2:
            raise InvalidInputError(f"a reference set needs at least 2 finite scores, got {values.size}")
        std = float(values.std(ddof=1))
        if std == 0.0:
            raise InvalidInputError("the reference scores are all equal: their standard deviation is 0")
        ordered = np.sort(values)
        if ordered.size > max_quantiles:
            ordered = np.quantile(ordered, np.linspace(0.0, 1.0, max_quantiles))
        return cls(mean=float(values.mean()), std=std, count=int(values.size), quantiles=tuple(float(q) for q in ordered))

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the statistics as JSON (``ReferenceStats.from_json`` reads them back)."""
        path = Path(path)
        path.write_text(json.dumps(asdict(self)))
        return path

    @classmethod
    def from_json(cls, path: str | os.PathLike, *, encoding: str | None = None) -> "ReferenceStats":
        from ..textio import read_json

        data = read_json(path, encoding=encoding, what="reference statistics")
        try:
            return cls(mean=float(data["mean"]), std=float(data["std"]), count=int(data["count"]),
                       quantiles=tuple(float(q) for q in data.get("quantiles", ())))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise InvalidInputError(f"{os.fspath(path)!r} is not a ReferenceStats JSON file ({err})") from err


def _reference(reference: ReferenceStats | Iterable[float] | ArrayLike) -> ReferenceStats:
    return reference if isinstance(reference, ReferenceStats) else ReferenceStats.from_scores(reference)


def zscore(scores: ArrayLike, reference: ReferenceStats | Iterable[float] | ArrayLike):
    """``(scores - mean_ref) / std_ref``: how many reference standard deviations above the reference mean.

    ``reference`` is a :class:`ReferenceStats` or the reference scores themselves.

    >>> zscore(2.0, [0.0, 2.0])
    0.7071067811865475
    """
    ref = _reference(reference)
    return _like_input((_as_array(scores, "scores") - ref.mean) / ref.std, scores)


def percentile_rank(scores: ArrayLike, reference: ReferenceStats | Iterable[float] | ArrayLike):
    """Fraction (0..1) of the reference set scoring below each score (ties count half).

    >>> percentile_rank(1.5, [0.0, 1.0, 2.0, 3.0])
    0.5
    """
    ref = _reference(reference)
    if not ref.quantiles:
        raise InvalidInputError("this ReferenceStats has no quantiles: build it with ReferenceStats.from_scores")
    table = np.asarray(ref.quantiles)
    values = _as_array(scores, "scores")
    below = np.searchsorted(table, values, side="left")
    not_above = np.searchsorted(table, values, side="right")
    return _like_input((below + not_above) / (2.0 * table.size), scores)
