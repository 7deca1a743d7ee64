"""Dataset scoring and calibration, built on the :class:`~ImageReward.scorer.Scorer` engine.

* :mod:`.calibration`: what a score means; ``preference_probability``, ``zscore``, ``percentile_rank``.
* :mod:`.datasets`: readers for a folder, a JSONL/CSV/Parquet table or a Hugging Face Hub dataset.
* :mod:`.shards`: readers for WebDataset tar shards and img2dataset output folders.
* :mod:`.writers`: resumable JSONL journals, merging, Parquet output.
* :mod:`.runner`: ``score_dataset(scorer, input, output)``, sharded under ``accelerate launch``.
* :mod:`.ray_engine`: ``score_dataset_ray(model, shards, output_folder)`` on a Ray cluster (Ray loaded on use).
* :mod:`.gallery`: the HTML gallery of the best and worst images per prompt.

>>> from ImageReward.scoring import preference_probability
>>> round(preference_probability(1.0, 0.0), 3)
0.731

Importing this package loads numpy only; pyarrow, accelerate and huggingface_hub load when used.
"""

from __future__ import annotations

from typing import Any

from .calibration import IMAGE_REWARD_STD, ReferenceStats, percentile_rank, preference_probability, zscore

__all__ = [
    "preference_probability", "zscore", "percentile_rank", "ReferenceStats", "IMAGE_REWARD_STD",
    "score_dataset", "score_dataset_ray", "read_records", "write_gallery",
]

_LAZY = {"score_dataset": ".runner", "score_dataset_ray": ".ray_engine", "read_records": ".datasets",
         "write_gallery": ".gallery"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
