"""``imagereward score`` and ``imagereward rank``: score images for one prompt, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that loads a scorer."""
    parser.add_argument("--model", default="ImageReward-v1.0",
                        help="a registered name (ImageReward-v1.0, CLIP, BLIP, Aesthetic, ...), a weighted mix "
                             "NAME[:WEIGHT],... (e.g. ImageReward-v1.0:1,Aesthetic:0.1), a local checkpoint "
                             "file/folder, or a Hub id OWNER/NAME (first match wins, in that order)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--download-root", default=None, help="where checkpoints are cached (default ~/.cache/ImageReward)")
    parser.add_argument("--batch-size", type=int, default=8)


def load_scorer(args: argparse.Namespace):
    """The scorer named by ``--model``, through the one resolver (:func:`ImageReward.load_scorer`)."""
    import torch

    import ImageReward as RM

    dtype = getattr(torch, args.dtype)
    return RM.load_scorer(args.model, device=args.device, download_root=args.download_root, dtype=dtype)


def register(subparsers: argparse._SubParsersAction) -> None:
    for name, help_text in (("score", "score images for a prompt"), ("rank", "rank images for a prompt, best first")):
        parser = subparsers.add_parser(name, help=help_text)
        parser.add_argument("--prompt", required=True)
        parser.add_argument("images", nargs="+", help="image files")
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
        add_model_arguments(parser)
        parser.set_defaults(func=_run, sort=(name == "rank"))


def _run(args: argparse.Namespace) -> int:
    model = load_scorer(args)
    ranking, rewards = model.inference_rank(args.prompt, args.images, batch_size=args.batch_size)
    rows = [{"image": path, "rank": rank, "score": score} for path, rank, score in zip(args.images, ranking, rewards)]
    if args.sort:
        rows.sort(key=lambda row: row["rank"])
    if args.json:
        json.dump({"prompt": args.prompt, "model": args.model, "results": rows}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    width = max(len(row["image"]) for row in rows)
    print(f"{'rank':>4}  {'score':>9}  image")
    for row in rows:
        print(f"{row['rank']:>4}  {row['score']:>9.4f}  {row['image']:<{width}}")
    return 0
