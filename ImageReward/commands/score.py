"""``imagereward score`` and ``imagereward rank``: score images for one prompt, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys

from ..validation import arg_dtype, arg_positive_int


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that loads a scorer."""
    parser.add_argument("--model", default="ImageReward-v1.0",
                        help="a registered name (ImageReward-v1.0, CLIP, BLIP, Aesthetic, HPSv2, HPSv2.1, PickScore, ...), a weighted mix "
                             "NAME[:WEIGHT],... (e.g. ImageReward-v1.0:1,Aesthetic:0.1), a local checkpoint "
                             "file/folder, or a Hub id OWNER/NAME (first match wins, in that order)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", type=arg_dtype, default="float32",
                        help="float32 (fp32), bfloat16 (bf16) or float16 (fp16, half) for the image side")
    parser.add_argument("--download-root", default=None, help="where checkpoints are cached (default ~/.cache/ImageReward)")
    parser.add_argument("--batch-size", type=arg_positive_int, default=8)
    parser.add_argument("--no-exif-transpose", dest="exif_transpose", action="store_false",
                        help="score image files as stored, ignoring their EXIF orientation (the original's behaviour)")


def add_progress_arguments(parser: argparse.ArgumentParser) -> None:
    """``--progress`` / ``--no-progress``; neither: a progress bar when stderr is a terminal (see :func:`show_progress`)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--progress", dest="progress", action="store_true", default=None,
                       help="show progress bars (default: only when stderr is a terminal)")
    group.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def show_progress(args: argparse.Namespace) -> bool:
    """The ``--progress`` choice, else whether stderr (where tqdm draws) is a terminal."""
    choice = getattr(args, "progress", None)
    if choice is not None:
        return bool(choice)
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def check_prompt_given(spec: str, prompt: str | None, option: str = "--prompt") -> None:
    """Before loading weights: refuse a missing or empty ``prompt`` when ``spec`` names an ImageReward
    checkpoint (registered, a local file or folder, a Hub id), which always scores against a prompt. Registered
    scorers and mixes are checked once loaded (:func:`check_prompt_needed`)."""
    from ..resolve import resolve

    if resolve(spec).kind in ("checkpoint", "path", "hub"):
        _require_prompt(spec, prompt, option)


def check_prompt_needed(model, prompt: str | None, option: str = "--prompt") -> None:
    """Refuse a missing or empty ``prompt`` when the loaded ``model`` uses prompts (``uses_prompt``; a mix
    uses them when any member does)."""
    if getattr(model, "uses_prompt", True):
        _require_prompt(getattr(model, "name", "this scorer"), prompt, option)


def _require_prompt(name: str, prompt: str | None, option: str) -> None:
    from ..errors import InvalidInputError

    if prompt is None or not prompt.strip():
        raise InvalidInputError(f"{option} is {'empty' if prompt is not None else 'required'}: {name} scores images "
                                "against a prompt (only prompt-free scorers such as Aesthetic need none; for images "
                                "that carry their own prompts, use score-dataset)")


def load_scorer(args: argparse.Namespace):
    """The scorer named by ``--model``, through the one resolver (:func:`ImageReward.load_scorer`)."""
    import ImageReward as RM

    model = RM.load_scorer(args.model, device=args.device, download_root=args.download_root, dtype=args.dtype)
    for scorer in (model, *getattr(model, "scorers", ())):  # a weighted mix reads images with its parts
        scorer.exif_transpose = getattr(args, "exif_transpose", True)
    return model


def register(subparsers: argparse._SubParsersAction) -> None:
    for name, help_text in (("score", "score images for a prompt"), ("rank", "rank images for a prompt, best first")):
        parser = subparsers.add_parser(name, help=help_text)
        parser.add_argument("--prompt", default=None,
                            help="the prompt the images were generated from (not needed by prompt-free scorers "
                                 "such as Aesthetic)")
        parser.add_argument("images", nargs="+", help="image files")
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
        add_model_arguments(parser)
        add_progress_arguments(parser)
        parser.set_defaults(func=_run, sort=(name == "rank"))


def _run(args: argparse.Namespace) -> int:
    check_prompt_given(args.model, args.prompt)
    model = load_scorer(args)
    check_prompt_needed(model, args.prompt)
    ranking, rewards = model.inference_rank(args.prompt or None, args.images, batch_size=args.batch_size,
                                            progress=show_progress(args))
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
