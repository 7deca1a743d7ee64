"""Overhead of ``score-dataset`` over the bare engine: images/s of ``model.score_batch`` vs ``score_dataset``
(journaled, DataLoader workers) on the same images, plus the cost of a resume pass that has nothing to do.

    python benchmarks/bench_score_dataset.py --images 16 --size full      # ViT-L/16 ImageReward, random weights
    python benchmarks/bench_score_dataset.py --images 200 --size tiny     # the I/O path alone
    python benchmarks/bench_score_dataset.py --images 1024 --batch-size 64 --workers 8 --device cuda --dtype bf16

Weights are random (the architecture decides the speed); no network is used.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", choices=("tiny", "full"), default="full")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: the image side in bf16, as RM.load(dtype=torch.bfloat16)")
    parser.add_argument("--json", help="also write the result to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import ImageReward as RM
    from ImageReward.models.blip import BLIPConfig
    from ImageReward.scoring.runner import DistributedContext, score_dataset

    torch.manual_seed(0)
    model = RM.ImageReward(BLIPConfig.tiny() if args.size == "tiny" else BLIPConfig()).eval().to(args.device)
    if args.dtype == "bf16":
        model.set_image_dtype(torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "imgs"
        folder.mkdir()
        rng = np.random.default_rng(0)
        paths = []
        for i in range(args.images):
            path = folder / f"{i:04d}.jpg"
            Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(path, quality=90)
            paths.append(str(path))
        prompt = "a photograph of an astronaut riding a horse"
        model.score_batch(prompt, paths[:2], batch_size=2)  # warm-up
        results = {}
        start = time.perf_counter()
        model.score_batch(prompt, paths, batch_size=args.batch_size)
        results["engine score_batch"] = args.images / (time.perf_counter() - start)
        for workers in args.workers:
            out = Path(tmp) / f"scores-{workers}.jsonl"
            start = time.perf_counter()
            score_dataset(model, folder, out, prompt=prompt, batch_size=args.batch_size, num_workers=workers,
                          progress=False, context=DistributedContext())
            results[f"score_dataset workers={workers}"] = args.images / (time.perf_counter() - start)
            start = time.perf_counter()
            score_dataset(model, folder, out, prompt=prompt, progress=False, context=DistributedContext())
            results[f"resume pass, nothing left (s) workers={workers}"] = time.perf_counter() - start
    summary = {"size": args.size, "images": args.images, "batch_size": args.batch_size, "device": args.device,
               "dtype": args.dtype, "threads": torch.get_num_threads(), "images_per_s": results}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
