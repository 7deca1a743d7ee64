"""Throughput of the baseline scorers (CLIP, BLIP, Aesthetic), printed as a Markdown table.

One prompt x N images (default 8) through ``score_batch``, fp32 and bf16, each configuration in its own
subprocess so that peak RSS is its own. Weights are random (timing does not depend on their values);
images are random 512x512 RGB PNGs, so preprocessing is included.

    python benchmarks/bench_baselines.py                       # full size: ViT-L/14 CLIP, BLIP ViT-L/16
    python benchmarks/bench_baselines.py --quick               # tiny models, to check the script works
    python benchmarks/bench_baselines.py --configs CLIP:fp32 Aesthetic:bf16 --images 16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_CONFIGS = ["CLIP:fp32", "CLIP:bf16", "BLIP:fp32", "BLIP:bf16", "Aesthetic:fp32", "Aesthetic:bf16"]


def build_scorer(name: str, quick: bool):
    """A baseline scorer with random weights, built on ``meta`` and filled (no slow init, no files)."""
    import torch

    from ImageReward.models._loading import _fill_position_ids
    from ImageReward.models.aesthetic import AestheticScorer
    from ImageReward.models.blip import BLIPConfig
    from ImageReward.models.blip_itc import BLIPITCScorer
    from ImageReward.models.clip import VIT_L_14, CLIPScorer, build_clip_model, clip_config, tiny_clip_hparams

    hparams = tiny_clip_hparams() if quick else VIT_L_14
    with torch.device("meta"):
        if name == "CLIP":
            scorer = CLIPScorer(build_clip_model(clip_config(hparams)))
        elif name == "BLIP":
            scorer = BLIPITCScorer(BLIPConfig.tiny() if quick else BLIPConfig())
        elif name == "Aesthetic":
            scorer = AestheticScorer.build(hparams)
        else:
            raise SystemExit(f"unknown scorer {name}")
    scorer.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param_name, param in scorer.named_parameters():
            if "norm" in param_name.lower() and param_name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    _fill_position_ids(scorer)
    return scorer.eval()


def run_one(config: str, quick: bool, image_dir: Path, n_images: int, repeats: int, device: str) -> dict:
    import torch

    from ImageReward.factory import _place

    name, dtype_name = config.split(":")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    scorer = _place(build_scorer(name, quick), device, dtype, keep_fp32=("mlp",) if name == "Aesthetic" else ())
    images = sorted(str(p) for p in image_dir.glob("*.png"))[:n_images]

    def once():
        scorer.score_batch("a photo of a cat on a sofa", images, batch_size=n_images)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    once()  # warm-up (tokenizers, kernels)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        timings.append(time.perf_counter() - start)
    best = min(timings)
    return {"config": config, "images": len(images), "seconds": best, "images_per_s": len(images) / best,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads(), "device": device}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS, help="SCORER:DTYPE (fp32, bf16, fp16)")
    parser.add_argument("--images", type=int, default=8, help="images per call (one prompt)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny models: checks the script, not the speed")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--image-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = run_one(args.worker, args.quick, Path(args.image_dir), args.images, args.repeats, args.device)
        print(json.dumps(result))
        return 0

    import numpy as np
    from PIL import Image

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        for index in range(args.images):
            Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(f"{folder}/{index:02d}.png")
        for config in args.configs:
            command = [sys.executable, __file__, "--worker", config, "--image-dir", folder, "--images",
                       str(args.images), "--repeats", str(args.repeats), "--device", args.device]
            if args.quick:
                command.append("--quick")
            result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
            if result.returncode != 0:
                print(f"{config}: failed\n{result.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(f"done {config}: {rows[-1]['images_per_s']:.2f} images/s", file=sys.stderr)

    size = "tiny models" if args.quick else "CLIP ViT-L/14, BLIP ViT-L/16, full size"
    print(f"\nBaseline scorers, 1 prompt x {args.images} images ({size}; {args.device}; "
          f"{rows[0]['threads'] if rows else '?'} threads; best of {args.repeats})\n")
    print("| scorer | dtype | seconds | images/s | peak RSS (MB) |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        name, dtype_name = row["config"].split(":")
        print(f"| {name} | {dtype_name} | {row['seconds']:.2f} | {row['images_per_s']:.2f} | {row['peak_rss_mb']:.0f} |")
    return 0 if len(rows) == len(args.configs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
