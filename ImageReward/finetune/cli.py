"""Command line for ReFL: ``python refl.py [options]``, ``accelerate launch refl.py ...`` or
``imagereward refl [options]``. Parses options and calls :class:`ReFLTrainer`; no algorithm here.

>>> main(["--help"])   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import logging
from typing import Sequence

from .config import add_arguments, build_parser, config_from_namespace

__all__ = ["main", "register", "run"]


def add_dry_run(parser: argparse.ArgumentParser) -> None:
    """``--dry_run``: a command-line switch only (not a :class:`ReFLConfig` setting)."""
    parser.add_argument("--dry_run", "--dry-run", dest="dry_run", action="store_true",
                        help="check the options, the prompts, the model files (no download) and, when resuming, the "
                             "checkpoint's settings; print what the run would do, then exit without training")


def run(args: argparse.Namespace) -> int:
    """Train with the parsed options; returns the exit status."""
    from .trainer import ReFLTrainer

    config = config_from_namespace(args)
    if getattr(args, "dry_run", False):
        from .preflight import dry_run_report

        print("\n".join(dry_run_report(ReFLTrainer(config))))
        return 0
    result = ReFLTrainer(config).train()
    print(f"ReFL finished after {result['global_step']} updates; output in {config.output_dir}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``imagereward refl``."""
    parser = subparsers.add_parser(
        "refl", help="fine-tune a diffusion model with ReFL (SD1.x / SDXL / SD3 / FLUX.1, LoRA)")
    add_arguments(parser)
    add_dry_run(parser)
    parser.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``refl.py``: errors of ours print one line and exit 2."""
    from ..cli import run_command

    parser = build_parser()
    add_dry_run(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_command(lambda: run(args), "refl.py", verbose=True)
