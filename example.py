"""Score and rank the original project's four example images, beside the published numbers.

    python example.py                                   # downloads the checkpoint (1.8 GB) and the images once
    python example.py --checkpoint ImageReward.pt --images 1.webp 2.webp 3.webp 4.webp   # fully offline

Published (README of THUDM/ImageReward): ranking [1, 2, 3, 4], rewards 0.5812, 0.2745, -1.4132, -2.0296.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import ImageReward as RM
from ImageReward.errors import DownloadError
from ImageReward.pretrained import default_cache_dir, download_url

PROMPT = "a painting of an ocean with clouds and birds, day time, low depth field effect"
IMAGE_URL = "https://raw.githubusercontent.com/THUDM/ImageReward/main/assets/images/{}.webp"
PUBLISHED = [0.5811622738838196, 0.2745276093482971, -1.4131819009780884, -2.029569625854492]


def example_images(folder: Path) -> list[Path]:
    """The four example images, downloaded once into ``folder``."""
    paths = []
    for index in range(1, 5):
        path = folder / f"{index}.webp"
        if not path.is_file():
            download_url(IMAGE_URL.format(index), path)
        paths.append(path)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="ImageReward-v1.0", help="model name or local ImageReward.pt / folder")
    parser.add_argument("--images", nargs=4, default=None, help="the four example images (1.webp .. 4.webp), local")
    parser.add_argument("--device", default=None)
    parser.add_argument("--download-root", default=None, help="checkpoint cache (default ~/.cache/ImageReward)")
    args = parser.parse_args()

    try:
        images = [Path(p) for p in args.images] if args.images else example_images(default_cache_dir() / "example_images")
        model = RM.load(args.checkpoint, device=args.device, download_root=args.download_root)
    except DownloadError as err:
        print(f"example.py: could not reach what it needs: {err}\n\nOffline? Point it at local files:\n"
              "  python example.py --checkpoint /path/to/ImageReward.pt --images 1.webp 2.webp 3.webp 4.webp\n"
              f"(images: {IMAGE_URL.format('N')}; checkpoint: https://huggingface.co/THUDM/ImageReward)", file=sys.stderr)
        return 1

    with torch.inference_mode():
        ranking, rewards = model.inference_rank(PROMPT, [str(p) for p in images])
    print(f"prompt: {PROMPT}")
    print(f"ranking = {ranking}")
    print(f"rewards = {rewards}")
    print(f"{'image':>10}  {'ours':>8}  {'published':>9}  {'diff':>8}")
    for path, ours, published in zip(images, rewards, PUBLISHED):
        print(f"{path.name:>10}  {ours:8.4f}  {published:9.4f}  {ours - published:+8.1e}")
    return 0


if __name__ == "__main__":
    from ImageReward.cli import run_command

    raise SystemExit(run_command(main, "example.py"))
