"""Figures published in the ImageReward paper, printed beside ours."""

from __future__ import annotations

__all__ = ["TABLE3_PREFERENCE_ACCURACY", "TABLE1_IMAGEREWARD", "TABLE1_CLIP", "TABLE1_HUMAN_RANK"]

# Table 3: preference accuracy (%) on 466 prompts / 6,399 comparisons. HPSv2, HPSv2.1 and PickScore are not in
# the ImageReward paper: their figures on the same ImageReward test set are HPSv2's (github.com/tgxs002/HPSv2
# README, "preference prediction accuracy", one decimal).
TABLE3_PREFERENCE_ACCURACY: dict[str, float] = {
    "ImageReward-v1.0": 65.14, "BLIP": 57.76, "Aesthetic": 57.35, "CLIP": 54.82,
    "HPSv2": 65.7, "HPSv2.1": 66.8, "PickScore": 62.9,
}

# Table 1 ("real user prompts"), keyed by the benchmark's model folder names.
TABLE1_IMAGEREWARD: dict[str, float] = {
    "openjourney": 0.2614, "sd2-1": 0.2458, "dalle2": 0.2114, "sd1-4": 0.1344, "vd": -0.2470, "cogview2": -1.2376,
}
TABLE1_CLIP: dict[str, float] = {
    "openjourney": 0.2726, "sd2-1": 0.2683, "dalle2": 0.2684, "sd1-4": 0.2763, "vd": 0.2606, "cogview2": 0.2044,
}
TABLE1_HUMAN_RANK: dict[str, int] = {
    "openjourney": 1, "sd2-1": 2, "dalle2": 3, "sd1-4": 4, "vd": 5, "cogview2": 6,
}
PUBLISHED_BENCHMARK: dict[str, dict[str, float]] = {"ImageReward-v1.0": TABLE1_IMAGEREWARD, "CLIP": TABLE1_CLIP}
