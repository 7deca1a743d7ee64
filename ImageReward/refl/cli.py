"""Command line for ReFL: ``python refl.py [options]``, ``accelerate launch refl.py ...`` or
``imagereward refl [options]``. Parses options and calls :class:`ReFLTrainer`; no algorithm here.

>>> main(["--help"])   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from ..errors import ImageRewardError
from .config import add_arguments, build_parser, config_from_namespace

__all__ = ["main", "register", "run"]


def run(args: argparse.Namespace) -> int:
    """Train with the parsed options; returns the exit status."""
    from .trainer import ReFLTrainer

    config = config_from_namespace(args)
    result = ReFLTrainer(config).train()
    print(f"ReFL finished after {result['global_step']} updates; output in {config.output_dir}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``imagereward refl``."""
    parser = subparsers.add_parser(
        "refl", help="fine-tune a diffusion model with ReFL (SD1.x / SDXL / SD3 / FLUX.1, LoRA)")
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``refl.py``: errors of ours print one line and exit 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except ImageRewardError as err:
        print(f"refl.py: error: {err}", file=sys.stderr)
        return 2
