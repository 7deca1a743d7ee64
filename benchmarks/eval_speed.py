"""Evaluation overhead: cold scoring vs a rerun from the score cache, and metric + bootstrap time on the
real test.json layout (466 prompts). Uses a tiny random ImageReward, so the scorer cost is small and the
numbers show the harness's own overhead. Prints a Markdown table.

    .venv/bin/python benchmarks/eval_speed.py [--prompts 60] [--images 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import ImageReward as RM
from ImageReward.eval import ScoreCache, bootstrap_intervals, evaluate_preference, load_test_json, pair_counts
from ImageReward.models.blip import BLIPConfig

SHARED_TEST_JSON = Path(__file__).resolve().parents[2] / "shared" / "parity" / "data" / "test.json"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=60)
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = RM.ImageReward(BLIPConfig.tiny()).eval()
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        items = []
        for p in range(args.prompts):
            generations = []
            for k in range(args.images):
                path = Path(tmp) / f"{p}_{k}.png"
                Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(path)
                generations.append(path.name)
            items.append({"id": str(p), "prompt": f"prompt {p}", "generations": generations,
                          "ranking": list(rng.permutation(args.images) + 1)})
        (Path(tmp) / "test.json").write_text(json.dumps(items, default=int))
        data = load_test_json(Path(tmp) / "test.json", img_prefix=tmp)
        n = args.prompts * args.images
        with ScoreCache(Path(tmp) / "cache.sqlite") as cache:
            for label in ("cold (scores + cache writes)", "rerun from cache"):
                start = time.perf_counter()
                evaluate_preference(model, data, cache=cache, scorer_id="tiny", n_boot=0)
                seconds = time.perf_counter() - start
                rows.append((f"{label}, {n} images 256px, tiny model", seconds, n / seconds))
    if SHARED_TEST_JSON.is_file():
        real = load_test_json(SHARED_TEST_JSON)
        r = random.Random(0)
        rewards = [[r.random() for _ in item.ranking] for item in real]
        start = time.perf_counter()
        counts = [pair_counts(item.ranking, rw) for item, rw in zip(real, rewards)]
        bootstrap_intervals(counts, n_boot=1000)
        seconds = time.perf_counter() - start
        rows.append(("4 metrics + 1000 bootstraps, real test.json (466 prompts)", seconds, float("nan")))
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU")
    print("| step | seconds | images/s |\n|---|---:|---:|")
    for label, seconds, rate in rows:
        print(f"| {label} | {seconds:.3f} | {'' if rate != rate else f'{rate:.0f}'} |")


if __name__ == "__main__":
    main()
