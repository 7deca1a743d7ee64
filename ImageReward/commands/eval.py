"""``imagereward eval-preference`` (the paper's Table 3) and ``imagereward eval-benchmark`` (Table 1).

Both accept the original scripts' option names (``--source_path``, ``--img_prefix``, ``--target_dir``,
``--model_type``, ``--rm_path``; ``--prompts_path``, ``--result_dir``, ``--img_dir``, ``--model``,
``--benchmark``, ``--gpu_id``) as well as dashed spellings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from pathlib import Path
from typing import Sequence

from ..validation import arg_dtype, arg_non_negative_float, arg_non_negative_int, arg_positive_int
from .score import add_progress_arguments, load_scorer, show_progress

logger = logging.getLogger(__name__)

ALL_SCORERS = ("ImageReward-v1.0", "CLIP", "BLIP", "Aesthetic", "HPSv2", "HPSv2.1", "PickScore")
_LIST_HELP = ("items are separated by ',' (or by ';' when present); a comma list in which an item has a "
              ":WEIGHT is one weighted mix, e.g. 'ImageReward-v1.0:1,Aesthetic:0.1'")


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rm-path", "--rm_path", "--download-root", dest="rm_path", default=None,
                        help="where checkpoints are downloaded/cached (created if missing; default ~/.cache/ImageReward)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--gpu-id", "--gpu_id", dest="gpu_id", type=arg_non_negative_int, default=None,
                        help="use cuda:<id> (original option)")
    parser.add_argument("--dtype", type=arg_dtype, default="float32",
                        help="float32 (fp32), bfloat16 (bf16) or float16 (fp16, half) for the image side")
    parser.add_argument("--batch-size", type=arg_positive_int, default=8)
    parser.add_argument("--encoding", default=None,
                        help="text encoding of the JSON files you bring, e.g. gbk (default: UTF-8, BOM accepted)")
    parser.add_argument("--cache", default=None, help="score cache file (default: <output dir>/score_cache.sqlite)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the score cache")
    parser.add_argument("--no-download", action="store_true", help="never download data; fail if it is missing")
    add_progress_arguments(parser)


def register(subparsers: argparse._SubParsersAction) -> None:
    pref = subparsers.add_parser("eval-preference", help="preference accuracy on a human-ranked test set (Table 3)")
    pref.add_argument("--source-path", "--source_path", dest="source_path", default="data/test.json",
                      help="test.json (id, prompt, generations, ranking); downloaded when missing")
    pref.add_argument("--img-prefix", "--img_prefix", dest="img_prefix", default="data/test_images",
                      help="folder the generations are relative to; test_images.zip is fetched when missing")
    pref.add_argument("--target-dir", "--target_dir", dest="target_dir", default="data/",
                      help="where test_<model>.json, eval_summary.json and report.html go")
    pref.add_argument("--model-type", "--model_type", dest="model_type", default="all",
                      help="all (= ImageReward-v1.0, CLIP, BLIP, Aesthetic, HPSv2, HPSv2.1, PickScore), a model name (registered, "
                           "a local checkpoint, a Hub id), or a list of them; " + _LIST_HELP)
    pref.add_argument("--imagerewarddb-split", default=None, metavar="SPLIT",
                      help="evaluate on the ImageRewardDB split (e.g. test) instead of test.json")
    pref.add_argument("--imagerewarddb-root", default=None,
                      help="local ImageRewardDB folder (default ~/.cache/ImageReward/ImageRewardDB)")
    pref.add_argument("--tie-threshold", type=arg_non_negative_float, default=0.0,
                      help="|reward difference| at or below which the model is tied (tie-half, ties-dropped)")
    pref.add_argument("--bootstrap", type=arg_non_negative_int, default=1000, help="bootstrap resamples of prompts (0: none)")
    pref.add_argument("--seed", type=arg_non_negative_int, default=0)
    pref.add_argument("--report", default=None, help="HTML report path (default <target_dir>/report.html)")
    pref.add_argument("--no-report", action="store_true")
    pref.add_argument("--report-max-prompts", type=arg_positive_int, default=None, help="show at most this many prompts")
    _common_arguments(pref)
    pref.set_defaults(func=run_preference)

    bench = subparsers.add_parser("eval-benchmark", help="mean reward of generation models (Table 1)")
    bench.add_argument("--prompts-path", "--prompts_path", dest="prompts_path",
                       default="benchmark/benchmark-prompts.json", help="[{id, prompt}] list; downloaded when missing")
    bench.add_argument("--result-dir", "--result_dir", dest="result_dir", default="benchmark/results/")
    bench.add_argument("--img-dir", "--img_dir", dest="img_dir", default="benchmark/generations",
                       help="one folder per generation model holding <id>_<k>.png")
    bench.add_argument("--model", default="default",
                       help="default (openjourney, sd2-1, dalle2, sd1-4, vd, cogview2), all (every subfolder), "
                            "or a comma list")
    bench.add_argument("--benchmark", default="ImageReward-v1.0, CLIP",
                       help="scorers: ImageReward-v1.0, CLIP, BLIP, Aesthetic, HPSv2, HPSv2.1, PickScore, checkpoint paths, ...; " + _LIST_HELP)
    bench.add_argument("--human-ranking", default=None,
                       help="JSON file {model: rank} or 'model=rank,...' (1 = best); default: the paper's "
                            "human ranking of the six published models")
    _common_arguments(bench)
    bench.set_defaults(func=run_benchmark)


# ------------------------------------------------------------------------------------------ helpers
def scorer_label(spec: str) -> str:
    """A file-name-safe label: registered names unchanged, paths by their stem, mixes and Hub ids with
    every other character replaced by ``_`` (the resolver decides which is which)."""
    from ImageReward.resolve import resolve

    resolved = resolve(spec)
    if resolved.kind in ("checkpoint", "scorer"):
        return resolved.target
    text = (Path(spec.rstrip("/\\")).stem or "checkpoint") if resolved.kind == "path" else spec
    if resolved.kind == "remote":  # a server URL: never its ?token= in a file name
        text = spec.split("?", 1)[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def scorer_labels(specs: Sequence[str]) -> list[str]:
    """:func:`scorer_label` of each spec, made unique so that no two scorers share result files: a local
    checkpoint whose label another one has (``run1/ImageReward`` and ``run2/ImageReward``, or a folder named
    like a registered scorer) takes as many of its parent folders as it needs (``run1_ImageReward``). Labels are
    compared case-insensitively (file names on Windows and macOS are). A scorer listed twice, or labels that
    stay equal, raise :class:`InvalidInputError` before any model is loaded."""
    from ImageReward.errors import InvalidInputError
    from ImageReward.resolve import resolve

    labels = [scorer_label(spec) for spec in specs]
    paths = {i: Path(resolve(spec).target).resolve() for i, spec in enumerate(specs) if resolve(spec).kind == "path"}
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        key = str(paths.get(i, spec))
        if key in seen:
            raise InvalidInputError(f"scorer {spec!r} is listed twice (as {specs[seen[key]]!r} too): its result "
                                    "files would overwrite each other; list it once")
        seen[key] = i
    depth = 1
    while True:
        folded = [label.casefold() for label in labels]
        clashing = [i for i in paths if folded.count(folded[i]) > 1]
        if not clashing:
            break
        depth += 1
        for i in clashing:
            parts = paths[i].parts[-depth:]
            labels[i] = re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join((*parts[:-1], Path(parts[-1]).stem or parts[-1])))
        if depth > max(len(path.parts) for path in paths.values()):
            break
    folded = [label.casefold() for label in labels]
    for i, label in enumerate(labels):
        if folded.count(folded[i]) > 1:
            others = [specs[j] for j in range(len(specs)) if folded[j] == folded[i] and j != i]
            raise InvalidInputError(f"scorers {specs[i]!r} and {others[0]!r} would both be labelled {label!r} and "
                                    "overwrite each other's result files; evaluate them in separate runs or "
                                    "rename one")
    if labels != [scorer_label(spec) for spec in specs]:
        logger.info("scorer labels made unique: %s", ", ".join(labels))
    return labels


def _device(args: argparse.Namespace) -> str | None:
    if args.gpu_id is not None and args.device is None:
        import torch

        return f"cuda:{args.gpu_id}" if torch.cuda.is_available() else "cpu"
    return args.device


def _load(spec: str, args: argparse.Namespace):
    if args.rm_path is not None:
        Path(args.rm_path).expanduser().mkdir(parents=True, exist_ok=True)
    namespace = argparse.Namespace(model=spec, device=_device(args), dtype=args.dtype, exif_transpose=True,
                                   download_root=None if args.rm_path is None else os.path.expanduser(args.rm_path))
    return load_scorer(namespace)


def _check_common(args: argparse.Namespace) -> None:
    """Options checked before any data or model is read."""
    from ..pretrained import check_download_root
    from ..textio import check_encoding
    from ..validation import resolve_device

    resolve_device(_device(args), "--device")
    check_encoding(args.encoding, "--encoding")
    check_download_root(args.rm_path, "--rm-path")


def _check_prompts(model, label: str, prompts: Sequence[tuple[str, str]]) -> None:
    """Empty prompts are fine for a prompt-free scorer (``uses_prompt = False``), refused for the others."""
    from ImageReward.errors import InvalidInputError

    empty = [str(pid) for pid, prompt in prompts if not prompt.strip()]
    if empty and getattr(model, "uses_prompt", True):
        raise InvalidInputError(f"{label} scores images against their prompt, but {len(empty)} prompt(s) are empty "
                                f"(id {', '.join(empty[:3])}{', ...' if len(empty) > 3 else ''}); only prompt-free "
                                "scorers such as Aesthetic score without one")


def _open_cache(args: argparse.Namespace, default_dir: str):
    if args.no_cache:
        return None
    from ImageReward.eval.cache import ScoreCache

    return ScoreCache(args.cache or os.path.join(default_dir, "score_cache.sqlite"))


def _split(text: str, separator: str = ",") -> list[str]:
    return [part.strip() for part in text.split(separator) if part.strip()]


def scorer_specs(text: str) -> list[str]:
    """The model strings of ``--model_type``/``--benchmark``: split on ``;`` when present, else on ``,``,
    except that a comma list with a ``:WEIGHT`` on any item is one weighted mix."""
    from ImageReward.resolve import parse_mix

    if ";" in text:
        return _split(text, ";")
    items = _split(text)
    if len(items) > 1 and any(parse_mix(item) is not None for item in items):
        return [text.strip()]
    return items


# ------------------------------------------------------------------------------------------ commands
def run_preference(args: argparse.Namespace) -> int:
    from ImageReward.eval import (dataset_stats, evaluate_preference, load_imagerewarddb, load_test_json,
                                  preference_table, write_predictions, write_preference_report)
    from ImageReward.identity import scorer_identity
    from ImageReward.eval.download import ensure_test_images, ensure_test_json

    _check_common(args)
    download = not args.no_download
    if args.imagerewarddb_split:
        items = load_imagerewarddb(args.imagerewarddb_split, args.imagerewarddb_root, download=download)
        title = f"Preference accuracy: ImageRewardDB {args.imagerewarddb_split}"
    else:
        source = ensure_test_json(args.source_path, download=download)
        ensure_test_images(args.img_prefix, download=download)
        items = load_test_json(source, img_prefix=args.img_prefix, encoding=args.encoding)
        title = f"Preference accuracy: {args.source_path}"
    stats = dataset_stats(items)
    print(f"{stats['prompts']} prompts, {stats['images']} images, {stats['strict_pairs']} pairs "
          f"({stats['human_ties']} human ties skipped)")
    specs = list(ALL_SCORERS) if args.model_type == "all" else scorer_specs(args.model_type)
    labels = scorer_labels(specs)
    os.makedirs(args.target_dir, exist_ok=True)
    cache = _open_cache(args, args.target_dir)
    results = []
    try:
        for spec, label in zip(specs, labels):
            print(f"{label} Test begin: ")
            model = _load(spec, args)
            _check_prompts(model, label, [(item.id, item.prompt) for item in items])
            result = evaluate_preference(model, items, name=label, cache=cache,
                                         scorer_id=scorer_identity(spec, args.dtype), batch_size=args.batch_size,
                                         tie_threshold=args.tie_threshold, n_boot=args.bootstrap, seed=args.seed,
                                         progress=show_progress(args))
            write_predictions(result, os.path.join(args.target_dir, f"test_{label}.json"))
            print(f"{label:>16s} Test Acc: {100 * result.metrics['original'].value:.2f}%")
            results.append(result)
            del model
    finally:
        if cache is not None:
            cache.close()
    summary = {"dataset": stats, "results": [r.summary() for r in results]}
    Path(args.target_dir, "eval_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print()
    print(preference_table(results))
    if not args.no_report:
        report = write_preference_report(results, items, args.report or os.path.join(args.target_dir, "report.html"),
                                         title=title, max_prompts=args.report_max_prompts)
        print(f"\nreport: {report}")
    return 0


def _human_ranking(text: str | None, models: Sequence[str], encoding: str | None = None) -> dict[str, float]:
    from ImageReward.errors import InvalidInputError
    from ImageReward.eval.published import TABLE1_HUMAN_RANK

    if text is None:
        return {m: float(r) for m, r in TABLE1_HUMAN_RANK.items() if m in models}
    if os.path.isfile(text):
        from ImageReward.textio import read_json

        raw = read_json(text, encoding=encoding, what="--human-ranking")
        if not isinstance(raw, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                for v in raw.values()):
            raise InvalidInputError(f"--human-ranking {text!r}: expected a JSON object {{model: rank number}}")
        return {str(k): float(v) for k, v in raw.items()}
    ranking = {}
    for part in _split(text):
        name, sep, rank = part.partition("=")
        try:
            ranking[name.strip()] = float(rank)
        except ValueError:
            raise InvalidInputError(f"--human-ranking: expected model=rank, got {part!r}") from None
        if not sep:
            raise InvalidInputError(f"--human-ranking: expected model=rank, got {part!r}")
    return ranking


def run_benchmark(args: argparse.Namespace) -> int:
    from ImageReward.eval import benchmark_table, evaluate_benchmark, load_benchmark_prompts, write_benchmark_outputs
    from ImageReward.identity import scorer_identity
    from ImageReward.eval.download import (DEFAULT_BENCHMARK_MODELS, ensure_benchmark_generations,
                                           ensure_benchmark_prompts)

    _check_common(args)
    download = not args.no_download
    prompts = load_benchmark_prompts(ensure_benchmark_prompts(args.prompts_path, download=download),
                                     encoding=args.encoding)
    if args.model == "default":
        models = list(DEFAULT_BENCHMARK_MODELS)
    elif args.model == "all":
        from ImageReward.image_io import list_subfolders

        models = list_subfolders(args.img_dir)  # not .ipynb_checkpoints, __MACOSX, ...
    else:
        models = _split(args.model)
    repeated = sorted({m for m in models if [x.casefold() for x in models].count(m.casefold()) > 1})
    if repeated:
        from ImageReward.errors import InvalidInputError

        raise InvalidInputError(f"--model lists {', '.join(map(repr, repeated))} more than once: their result "
                                "files would overwrite each other")
    ensure_benchmark_generations(args.img_dir, models, download=download)
    human = _human_ranking(args.human_ranking, models, args.encoding)
    specs = scorer_specs(args.benchmark)
    labels = scorer_labels(specs)
    os.makedirs(args.result_dir, exist_ok=True)
    cache = _open_cache(args, args.result_dir)
    results = []
    try:
        for spec, label in zip(specs, labels):
            print(f"Loading {label} model...")
            model = _load(spec, args)
            _check_prompts(model, label, [(p["id"], p["prompt"]) for p in prompts])
            print(f"{label} benchmark begins!")
            result = evaluate_benchmark(model, prompts, args.img_dir, models, name=label, cache=cache,
                                        scorer_id=scorer_identity(spec, args.dtype), batch_size=args.batch_size,
                                        progress=show_progress(args))
            written = write_benchmark_outputs(result, args.result_dir)
            print(f"{label} benchmark finished with result dumped to {written[-1]}!")
            results.append(result)
            del model
    finally:
        if cache is not None:
            cache.close()
    print()
    print(benchmark_table(results, human))
    return 0


def main_preference(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scripts/test.py``: ``imagereward eval-preference`` with the given arguments."""
    from ImageReward.cli import main

    return main(["eval-preference", *(argv or [])])


def main_benchmark(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scripts/test-benchmark.py``: ``imagereward eval-benchmark`` with the given arguments."""
    from ImageReward.cli import main

    return main(["eval-benchmark", *(argv or [])])
