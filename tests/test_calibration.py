"""Calibration helpers: preference probability, z-scores and percentiles against a reference set."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from ImageReward.errors import InvalidInputError
from ImageReward.scoring import (IMAGE_REWARD_STD, ReferenceStats, percentile_rank, preference_probability,
                                 zscore)


def test_preference_probability_is_the_logistic_of_the_difference():
    assert preference_probability(0.3, 0.3) == 0.5
    assert preference_probability(1.0, 0.0) == pytest.approx(1 / (1 + math.exp(-1)), abs=1e-12)
    a, b = np.array([2.0, -1.0, 0.5]), np.array([0.0, 1.0, 0.5])
    p = preference_probability(a, b)
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-(a - b))), atol=1e-12)
    np.testing.assert_allclose(p + preference_probability(b, a), 1.0, atol=1e-12)  # symmetric
    assert preference_probability(1.0, 0.0, scale=IMAGE_REWARD_STD) > preference_probability(1.0, 0.0)


def test_preference_probability_is_stable_and_keeps_types():
    extreme = preference_probability(np.array([1000.0, -1000.0]), 0.0)
    assert np.all(np.isfinite(extreme)) and extreme[0] == 1.0 and extreme[1] == 0.0
    t = preference_probability(torch.tensor([1.0, 0.0]), torch.tensor(0.0))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    torch.testing.assert_close(t, torch.sigmoid(torch.tensor([1.0, 0.0])))
    p = preference_probability(np.zeros((2, 1)), np.zeros(3))  # broadcasts
    assert p.shape == (2, 3)
    with pytest.raises(InvalidInputError):
        preference_probability([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(InvalidInputError):
        preference_probability(1.0, 0.0, scale=0)


def test_zscore_and_percentile_against_a_reference():
    rng = np.random.default_rng(0)
    reference = rng.normal(0.4, 2.0, size=5000)
    stats = ReferenceStats.from_scores(reference)
    assert stats.count == 5000
    assert stats.mean == pytest.approx(reference.mean()) and stats.std == pytest.approx(reference.std(ddof=1))
    z = zscore(np.array([stats.mean, stats.mean + 2 * stats.std]), stats)
    np.testing.assert_allclose(z, [0.0, 2.0], atol=1e-12)
    assert zscore(3.0, [1.0, 2.0, 3.0]) == pytest.approx(1.0)  # raw reference scores work too
    assert percentile_rank(stats.mean, stats) == pytest.approx(0.5, abs=0.02)
    assert percentile_rank(1e9, stats) == 1.0 and percentile_rank(-1e9, stats) == 0.0
    assert percentile_rank(2.0, [1.0, 2.0, 3.0]) == pytest.approx(0.5)  # ties count half


def test_reference_stats_round_trip_and_bad_references(tmp_path):
    stats = ReferenceStats.from_scores([0.1, None, 0.5, float("nan"), 0.9])  # None/NaN are dropped
    assert stats.count == 3
    back = ReferenceStats.from_json(stats.to_json(tmp_path / "ref.json"))
    assert back == stats
    with pytest.raises(InvalidInputError):
        ReferenceStats.from_scores([1.0])
    with pytest.raises(InvalidInputError):
        ReferenceStats.from_scores([2.0, 2.0, 2.0])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(InvalidInputError):
        ReferenceStats.from_json(tmp_path / "bad.json")
    big = ReferenceStats.from_scores(np.arange(50_000, dtype=float), max_quantiles=100)
    assert len(big.quantiles) == 100 and big.quantiles[0] == 0.0 and big.quantiles[-1] == 49_999.0


@pytest.mark.integration
def test_importing_the_package_stays_light():
    code = ("import sys, ImageReward, ImageReward.scoring; "
            "print(sorted(m for m in ('pyarrow', 'accelerate', 'huggingface_hub.hf_api') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
