"""``imagereward train-rm``: train a reward model from ``config.yaml`` (the original ``train/src/train.py``).

Single GPU: ``imagereward train-rm --config src/config/config.yaml``; several GPUs or nodes:
``accelerate launch -m ImageReward.cli train-rm --config ...``. Run from the folder the config's relative
paths start at (``train/``, as the original).

``--export-from checkpoint/<run>/best`` (or ``.../states/checkpoint-<step>``) exports a saved state of a run
that stopped early, crashed or was killed, with the same config: the same strict-loading export as the end of
training, mean/std from ``train.reference_split``. Logs at INFO with timestamps and shows a progress bar.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from contextlib import contextmanager
from typing import Iterator

# original option name -> config key under ``train`` (the shipped train_one_node.sh flags keep working)
_ORIGINAL_FLAGS: dict[str, tuple[str, type]] = {
    "--savepath": ("savepath", str), "--seed": ("seed", int), "--batch_size": ("batch_size", int),
    "--accumulation_steps": ("accumulation_steps", int), "--epochs": ("epochs", int),
    "--fix_rate": ("fix_rate", float), "--lr": ("lr", float), "--lr-decay-style": ("lr_decay_style", str),
    "--lr-decay-ratio": ("lr_decay_ratio", float), "--warmup": ("warmup", float),
    "--valid_per_epoch": ("valid_per_epoch", int), "--preload_path": ("preload_path", str),
    "--resume_from_checkpoint": ("resume_from_checkpoint", str), "--max_steps": ("max_steps", int),
    "--mixed_precision": ("mixed_precision", str), "--num_workers": ("num_workers", int),
    "--checkpointing_steps": ("checkpointing_steps", int),
}
_ORIGINAL_SWITCHES = {"--fix_base": "fix_base", "--std_log": "std_log", "--clear_visualizer": "clear_visualizer",
                      "--gradient_checkpointing": "gradient_checkpointing"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--set section.key=value`` and the original ``options.py`` flags."""
    parser.add_argument("--config", default="src/config/config.yaml", help="config.yaml (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    for flag, (key, kind) in _ORIGINAL_FLAGS.items():
        parser.add_argument(flag, dest=f"opt_{key}", type=kind, default=None, help=f"= --set train.{key}=...")
    for flag, key in _ORIGINAL_SWITCHES.items():
        parser.add_argument(flag, dest=f"opt_{key}", action="store_true", default=None, help=f"= --set train.{key}=true")
    parser.add_argument("--encoding", default=None,
                        help="text encoding of --config when not UTF-8 (a byte-order mark is always accepted)")
    parser.add_argument("--export-from", dest="export_from", default=None, metavar="DIR",
                        help="export a saved state (checkpoint/<run>/states/checkpoint-N) or checkpoint/<run>/best "
                             "instead of training (use the run's config)")
    parser.add_argument("--export-dir", dest="export_dir", default=None, metavar="DIR",
                        help="with --export-from: where to write the export (default: the run folder)")
    parser.add_argument("--dry_run", "--dry-run", dest="dry_run", action="store_true",
                        help="check the config, the model files (no download), the data and, when resuming, the "
                             "state's settings; print what the run would do, then exit without training")
    parser.add_argument("--rank_pair", action="store_true", help="accepted for compatibility (always pairwise)")
    parser.add_argument("--load_pair_store", action="store_true",
                        help="accepted for compatibility (pairs are built on the fly; images decoded by workers)")


def config_from_args(args: argparse.Namespace):
    """The validated :class:`~ImageReward.rm_training.config.RMTrainConfig` from parsed arguments."""
    from ..rm_training.config import load_config

    overrides = list(args.overrides)
    for key in [k for k, _ in _ORIGINAL_FLAGS.values()] + list(_ORIGINAL_SWITCHES.values()):
        value = getattr(args, f"opt_{key}", None)
        if value is not None:
            overrides.append(f"train.{key}={json.dumps(value)}")  # JSON is YAML: "123" stays a string
    return load_config(args.config, overrides, encoding=getattr(args, "encoding", None))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train-rm", help="train a reward model on ImageRewardDB-style preference data")
    add_arguments(parser)
    parser.set_defaults(func=run)


@contextmanager
def _info_with_timestamps() -> Iterator[None]:
    """Training runs for hours: this library's INFO lines, with timestamps, on the console (no ``-v`` needed;
    other libraries stay at the root's level). Restored afterwards."""
    ours = logging.getLogger("ImageReward")
    level = ours.level
    if ours.getEffectiveLevel() > logging.INFO:
        ours.setLevel(logging.INFO)
    changed = [(h, h.formatter) for h in logging.getLogger().handlers
               if type(h) is logging.StreamHandler and "asctime" not in (getattr(h.formatter, "_fmt", None) or "")]
    for handler, _ in changed:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    try:
        yield
    finally:
        ours.setLevel(level)
        for handler, formatter in changed:
            handler.setFormatter(formatter)


def run(args: argparse.Namespace) -> int:
    with _info_with_timestamps():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from ..rm_training.trainer import export_from_state, train_reward_model

    cfg = config_from_args(args)
    if getattr(args, "dry_run", False):
        from ..rm_training.preflight import dry_run_report

        print("\n".join(dry_run_report(cfg)))
        return 0
    if args.export_from:
        result = export_from_state(cfg, args.export_from, out_dir=args.export_dir)
    else:
        if args.export_dir:
            from ..errors import InvalidInputError

            raise InvalidInputError("--export-dir needs --export-from (a training run exports into its run folder)")
        result = train_reward_model(cfg)
    logging.getLogger(__name__).info("run folder %s", result.run_dir)
    summary = {"run_dir": str(result.run_dir), "finished": result.finished, "global_step": result.global_step,
               "best_val_loss": result.best_val_loss, "best_val_accuracy": result.best_val_accuracy,
               "test_accuracy": result.test_accuracy, "export": str(result.export_dir) if result.export_dir else None,
               "export_pt": str(result.pt_path) if result.pt_path else None, "mean": result.mean, "std": result.std}
    sys.stdout.write(json.dumps(summary) + "\n")  # one write per process: ranks' lines do not interleave
    sys.stdout.flush()
    return 0
