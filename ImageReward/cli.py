"""``imagereward`` command line: thin subcommands that parse arguments and call the library.

Each subcommand lives in its own module exposing ``register(subparsers)``; the module is imported only
when listed here, and heavy libraries are imported inside the command function, not at import time.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from .errors import ImageRewardError

# Modules that add subcommands. Each defines register(subparsers) -> None.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "ImageReward.commands.eval",
    "ImageReward.commands.score",
    "ImageReward.commands.score_dataset",
    "ImageReward.commands.train_rm",
    "ImageReward.refl.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagereward", description="Text-to-image human-preference reward models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ImageRewardError as err:
        print(f"imagereward {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
