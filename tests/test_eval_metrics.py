"""Preference metrics on hand-checkable cases, the original test.py algorithm as a cross-check, bootstrap,
Spearman's rho against the paper's own Table 1, and the counts of the real test.json (read in place)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from ImageReward.errors import InvalidInputError
from ImageReward.eval.data import dataset_stats, load_test_json
from ImageReward.eval.metrics import accuracies, average_ranks, bootstrap_intervals, pair_counts, spearman_rho
from ImageReward.eval.published import TABLE1_CLIP, TABLE1_HUMAN_RANK, TABLE1_IMAGEREWARD

TEST_JSON = Path(__file__).resolve().parents[2] / "shared" / "parity" / "data" / "test.json"


def original_acc(rankings, rewards):
    """The original test.py `acc` (pooled; human ties skipped; model ties wrong), transcribed."""
    tol = true = 0
    for base, item in zip(rankings, rewards):
        for i in range(len(base)):
            for j in range(i + 1, len(base)):
                if base[i] > base[j]:
                    tol += 1
                    true += item[i] < item[j]
                elif base[i] < base[j]:
                    tol += 1
                    true += item[i] > item[j]
    return true / tol


def test_perfect_and_reversed():
    assert pair_counts([1, 2, 3], [3.0, 2.0, 1.0]).original == (3.0, 3.0)
    assert pair_counts([1, 2, 3], [1.0, 2.0, 3.0]).original == (0.0, 3.0)
    # lower score better (higher_is_better=False) flips agreement
    assert pair_counts([1, 2, 3], [1.0, 2.0, 3.0], higher_is_better=False).original == (3.0, 3.0)


def test_human_ties_are_skipped_and_ranks_need_not_be_dense():
    counts = pair_counts([1, 5, 1, 3], [0.9, 0.1, 0.8, 0.5])
    # pairs: (0,1) ok, (0,2) human tie, (0,3) ok, (1,2) ok, (1,3) ok, (2,3) ok
    assert counts.human_ties == 1 and counts.strict_pairs == 5
    assert counts.original == (5.0, 5.0)


def test_model_ties_each_metric():
    # ranks [1,2,3], rewards [0.5, 0.5, 0.1]: pair (0,1) model tie; (0,2), (1,2) correct
    counts = pair_counts([1, 2, 3], [0.5, 0.5, 0.1])
    assert counts.model_ties == 1
    assert counts.original == (2.0, 3.0)        # tie counted wrong
    assert counts.tie_half == (2.5, 3.0)        # tie counts one half
    assert counts.ties_dropped == (2.0, 2.0)    # tie left out


def test_tie_threshold_only_affects_tie_metrics():
    # rewards 0.50 vs 0.49 agree with the humans; within threshold 0.05 they are a tie
    counts = pair_counts([1, 2], [0.50, 0.49], tie_threshold=0.05)
    assert counts.original == (1.0, 1.0)
    assert counts.tie_half == (0.5, 1.0)
    assert counts.ties_dropped == (0.0, 0.0)
    assert math.isnan(accuracies([counts])["ties-dropped"])


def test_pooled_versus_per_prompt():
    a = pair_counts([1, 2], [1.0, 0.0])                 # 1 of 1
    b = pair_counts([1, 2, 3], [0.0, 1.0, 0.5])          # pairs: (0,1) wrong, (0,2) wrong, (1,2) right -> 1 of 3
    result = accuracies([a, b])
    assert result["original"] == pytest.approx(2 / 4)
    assert result["per-prompt"] == pytest.approx((1 + 1 / 3) / 2)
    # a prompt with only human ties has no pairs and is left out of the per-prompt mean
    assert accuracies([a, b, pair_counts([2, 2], [0.0, 1.0])])["per-prompt"] == pytest.approx((1 + 1 / 3) / 2)


def test_bad_input_is_typed():
    with pytest.raises(InvalidInputError, match="ranking has 2 entries but rewards has 3"):
        pair_counts([1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(InvalidInputError):
        pair_counts([1, 2], [0.1, 0.2], tie_threshold=-1)


def test_matches_original_algorithm_on_random_data():
    rng = random.Random(3)
    rankings, rewards = [], []
    for _ in range(60):
        n = rng.randint(2, 9)
        rankings.append([rng.randint(1, 5) for _ in range(n)])
        rewards.append([rng.choice([0.0, 0.25, 0.5, 1.0, rng.random()]) for _ in range(n)])  # many model ties
    counts = [pair_counts(r, s) for r, s in zip(rankings, rewards)]
    assert accuracies(counts)["original"] == pytest.approx(original_acc(rankings, rewards), abs=1e-12)


def test_bootstrap_is_deterministic_and_brackets_the_point():
    rng = random.Random(0)
    counts = [pair_counts([1, 2, 3, 4], [rng.random() for _ in range(4)]) for _ in range(40)]
    first = bootstrap_intervals(counts, n_boot=300, seed=7)
    assert first == bootstrap_intervals(counts, n_boot=300, seed=7)
    for metric in first.values():
        assert metric.low <= metric.value <= metric.high and metric.low < metric.high
    single = bootstrap_intervals(counts[:1], n_boot=50)["original"]
    assert single.low == single.value == single.high  # one prompt: every resample is that prompt
    assert math.isnan(bootstrap_intervals(counts, n_boot=0)["original"].low)


def test_spearman_reproduces_paper_table1():
    # Table 1: Spearman rho to human evaluation is 1.00 for ImageReward and 0.60 for CLIP
    assert spearman_rho(TABLE1_IMAGEREWARD, {m: -r for m, r in TABLE1_HUMAN_RANK.items()}) == pytest.approx(1.0)
    clip_ranks = dict(zip(TABLE1_CLIP, average_ranks(list(TABLE1_CLIP.values()), descending=True)))
    assert spearman_rho(clip_ranks, TABLE1_HUMAN_RANK) == pytest.approx(0.6)
    assert average_ranks([3, 1, 3]) == [2.5, 1.0, 2.5]
    assert spearman_rho([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert math.isnan(spearman_rho([1], [2]))


@pytest.mark.skipif(not TEST_JSON.is_file(), reason=f"original test.json not available at {TEST_JSON} "
                    "(it lives in ../shared/parity/data beside the repository; not shipped with the project)")
def test_real_test_json_counts():
    items = load_test_json(TEST_JSON, img_prefix="data/test_images")
    stats = dataset_stats(items)
    assert stats == {"prompts": 466, "images": 2720, "pairs": 7230, "strict_pairs": 6399, "human_ties": 831}
    counts = [pair_counts(item.ranking, [0.0] * len(item.ranking)) for item in items]
    assert sum(c.original[1] for c in counts) == 6399
    assert sum(c.human_ties for c in counts) == 831
    result = accuracies(counts)  # a constant scorer: all model ties
    assert result["original"] == 0.0 and result["tie-half"] == 0.5 and math.isnan(result["ties-dropped"])
    rng = random.Random(1)
    rewards = [[rng.random() for _ in item.ranking] for item in items]
    raw = json.loads(TEST_JSON.read_text())
    ours = accuracies([pair_counts(item.ranking, r) for item, r in zip(items, rewards)])["original"]
    assert ours == pytest.approx(original_acc([e["ranking"] for e in raw], rewards), abs=1e-12)
