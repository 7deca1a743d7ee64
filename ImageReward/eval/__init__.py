"""Evaluation beside the scorers: preference accuracy (the paper's Table 3) and the generator benchmark
(Table 1), with a persistent score cache and Markdown/HTML reports. Works with any
:class:`~ImageReward.scorer.Scorer`.

>>> from ImageReward.eval import load_test_json, evaluate_preference          # doctest: +SKIP
>>> result = evaluate_preference(model, load_test_json("data/test.json", img_prefix="data/test_images"))  # doctest: +SKIP
>>> result.metrics["original"].value                                           # doctest: +SKIP
0.6514

``pyarrow`` (ImageRewardDB) is imported only when that source is read.
"""

from .benchmark import BenchmarkResult, evaluate_benchmark, write_benchmark_outputs
from .cache import ScoreCache, cached_scores
from .data import PreferenceItem, dataset_stats, find_generations, load_benchmark_prompts, load_imagerewarddb, load_test_json
from ..preference.archives import extract_archive_to, safe_extract_zip
from .metrics import (METRICS, MetricValue, PairCounts, accuracies, bootstrap_intervals, pair_counts,
                      pooled_pair_accuracy, spearman_rho)
from .preference import PreferenceResult, evaluate_preference, write_predictions
from .report import benchmark_table, preference_table, write_preference_report

__all__ = [
    "METRICS", "MetricValue", "PairCounts", "pair_counts", "accuracies", "pooled_pair_accuracy",
    "bootstrap_intervals", "spearman_rho",
    "PreferenceItem", "load_test_json", "dataset_stats", "load_imagerewarddb", "load_benchmark_prompts",
    "find_generations", "safe_extract_zip", "extract_archive_to", "ScoreCache", "cached_scores",
    "PreferenceResult", "evaluate_preference", "write_predictions", "BenchmarkResult", "evaluate_benchmark",
    "write_benchmark_outputs", "preference_table", "benchmark_table", "write_preference_report",
]
