"""``imagereward score-dataset INPUT -o OUT``: score a whole dataset, resumably, optionally sharded.

    imagereward score-dataset generations/ --prompt "a red bicycle" -o scores.jsonl --html scores.html
    imagereward score-dataset pairs.csv -o scores.parquet --num-workers 4 --batch-size 32
    accelerate launch --num_processes 8 -m ImageReward.cli score-dataset hf://datasets/OWNER/NAME -o s.parquet
    imagereward score-dataset 'laion/{00000..00999}.tar' -o scores/ --engine ray --address auto
"""

from __future__ import annotations

import argparse
import json
import sys

from ..validation import arg_non_negative_int, arg_positive_float, arg_positive_int
from .score import add_model_arguments, add_progress_arguments, load_scorer, show_progress


def _arg_non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "score-dataset", help="score a folder, a JSONL/CSV/Parquet table or a Hub dataset into JSONL/Parquet",
        description="Score every (prompt, image) of INPUT into OUT. Rerunning with the same OUT resumes; "
                    "under `accelerate launch` each process scores a shard and the main process merges.")
    parser.add_argument("input", help="a folder of images, a .jsonl/.json/.csv/.tsv/.parquet table of "
                                      "(prompt, image path or URL), hf://datasets/OWNER/NAME[@REV][/DIR], or "
                                      "WebDataset tar shards (a .tar, a glob, shard-{00000..00099}.tar, or a "
                                      "folder of .tar files such as img2dataset's output)")
    parser.add_argument("-o", "--output", required=True,
                        help="OUT.jsonl or OUT.parquet; with --engine ray a folder (one Parquet file per shard)")
    parser.add_argument("--prompt", default=None,
                        help="score every image against this prompt (overrides sidecars and prompt columns)")
    parser.add_argument("--prompt-column", default=None, help="default: prompt, caption or text")
    parser.add_argument("--image-column", default=None, help="default: image, image_path, file_name, url, ...")
    parser.add_argument("--id-column", default=None, help="stable row key for resuming (default: id, else row number)")
    parser.add_argument("--split", default=None, help="Hub dataset split, e.g. train (default: every Parquet file)")
    parser.add_argument("--revision", default=None, help="Hub dataset revision")
    parser.add_argument("--num-workers", type=arg_non_negative_int, default=2, help="DataLoader workers decoding images (0: none)")
    parser.add_argument("--timeout", type=arg_positive_float, default=10.0, help="seconds per image URL download attempt")
    parser.add_argument("--limit", type=arg_positive_int, default=None, help="only the first N rows of INPUT")
    parser.add_argument("--overwrite", action="store_true", help="start over instead of resuming into OUT")
    parser.add_argument("--html", nargs="?", const="", default=None, metavar="PATH",
                        help="also write an HTML gallery of the best/worst images per prompt (default: OUT.html)")
    parser.add_argument("--html-per-prompt", type=arg_positive_int, default=4, help="best and worst images shown per prompt")
    parser.add_argument("--encoding", default=None,
                        help="text encoding of INPUT and its prompt sidecars, e.g. gbk (default: UTF-8, with or "
                             "without a byte-order mark; UTF-16 with a mark)")
    ray = parser.add_argument_group("Ray engine (--engine ray; pip install -e '.[ray]' in this project's checkout)")
    ray.add_argument("--engine", choices=("default", "ray"), default="default",
                     help="default: this process (or each `accelerate launch` process); ray: a Ray Data pipeline "
                          "over tar shards (decode tasks -> scorer actor pool -> one Parquet file per shard)")
    ray.add_argument("--address", default=None,
                     help="the Ray cluster: auto, ray://HOST:10001 (default: $RAY_ADDRESS, else a local Ray)")
    ray.add_argument("--ray-actors", type=arg_positive_int, default=None,
                     help="scorer actors (default: one per GPU, else one per --ray-actor-cpus CPUs)")
    ray.add_argument("--ray-actor-cpus", type=_arg_non_negative_float, default=1.0, help="CPUs each scorer actor reserves")
    ray.add_argument("--ray-actor-gpus", type=_arg_non_negative_float, default=None,
                     help="GPUs each scorer actor reserves (default: 1 when the cluster has GPUs, else 0)")
    ray.add_argument("--ray-decode-cpus", type=_arg_non_negative_float, default=1.0,
                     help="CPUs each decode task (one shard) reserves")
    add_model_arguments(parser)
    add_progress_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.engine == "ray":
        return _run_ray(args)
    from ..scoring.runner import distributed_context, score_dataset
    from ..scoring.writers import output_format

    from ..scoring.writers import check_output_path
    from ..textio import check_encoding

    check_output_path(args.output, "--output")  # fail on a bad OUT before loading a model
    output_format(args.output)
    check_encoding(args.encoding, "--encoding")
    context = distributed_context()
    if context.device is not None and args.device is None:
        args.device = str(context.device)
    model = load_scorer(args)
    from ..identity import scorer_identity

    html = None if args.html is None else (args.html or f"{args.output.rsplit('.', 1)[0]}.html")
    summary = score_dataset(
        model, args.input, args.output, prompt=args.prompt, prompt_column=args.prompt_column,
        image_column=args.image_column, id_column=args.id_column, split=args.split, revision=args.revision,
        batch_size=args.batch_size, num_workers=args.num_workers, timeout=args.timeout, overwrite=args.overwrite,
        limit=args.limit, html=html, html_per_prompt=args.html_per_prompt, model_name=args.model,
        progress=show_progress(args), context=context, encoding=args.encoding,
        scorer_id=scorer_identity(args.model, args.dtype),
    )
    if not context.is_main:
        return 0
    json.dump(summary, sys.stdout)
    sys.stdout.write("\n")
    total, failed = summary.get("total_rows", 0), summary.get("total_errors", 0)
    # score_dataset has logged a warning with the count of failed rows (on stderr); a run that scored nothing fails
    if total and failed == total:
        example = (summary.get("error_examples") or ["?"])[0]
        print(f"imagereward score-dataset: error: every row failed ({failed} of {total}; e.g. {example}); "
              f"nothing was scored into {args.output}", file=sys.stderr)
        return 1
    return 0


def _run_ray(args: argparse.Namespace) -> int:
    """``--engine ray``: Ray is imported here only; the scorer is loaded by each actor (and once by the driver)."""
    from ..errors import InvalidInputError
    from ..scoring.ray_engine import score_dataset_ray

    unsupported = [flag for flag, value in (("--limit", args.limit), ("--html", args.html), ("--split", args.split),
                                            ("--revision", args.revision), ("--prompt-column", args.prompt_column),
                                            ("--image-column", args.image_column), ("--id-column", args.id_column))
                   if value is not None]
    if unsupported:
        raise InvalidInputError(f"{', '.join(unsupported)}: not available with --engine ray")
    try:
        import ray  # noqa: F401
    except ImportError as err:
        raise InvalidInputError("--engine ray needs Ray: pip install 'ray[data]' (in this project's checkout, "
                                "pip install -e '.[ray]')") from err
    summary = score_dataset_ray(
        args.model, args.input, args.output, prompt=args.prompt, address=args.address, device=args.device,
        dtype=args.dtype, download_root=args.download_root, exif_transpose=args.exif_transpose,
        batch_size=args.batch_size, actors=args.ray_actors, actor_cpus=args.ray_actor_cpus,
        actor_gpus=args.ray_actor_gpus, decode_cpus=args.ray_decode_cpus, timeout=args.timeout,
        overwrite=args.overwrite, progress=show_progress(args))
    json.dump(summary, sys.stdout)
    sys.stdout.write("\n")
    return 0
