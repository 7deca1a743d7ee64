"""``imagereward`` command line: thin subcommands that parse arguments and call the library.

Each subcommand lives in its own module exposing ``register(subparsers)``; the module is imported only
when listed here, and heavy libraries are imported inside the command function, not at import time.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any, Callable, NoReturn, Sequence

from .errors import DiskSpaceError, DownloadError, ImageRewardError

# Modules that add subcommands. Each defines register(subparsers) -> None.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "ImageReward.commands.eval",
    "ImageReward.commands.score",
    "ImageReward.commands.score_dataset",
    "ImageReward.commands.serve",
    "ImageReward.commands.train_rm",
    "ImageReward.finetune.cli",
)


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr (``prog: error: message``), exit 2.
    Subparsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


_LENIENT_ERRORS = ("backslashreplace", "namereplace", "replace", "xmlcharrefreplace")


def safe_output_streams() -> None:
    """Let stdout and stderr write any text: a character their encoding cannot hold (a Chinese file name on a
    cp1252 console or pipe, a file name that is not valid UTF-8) is written as a ``\\uXXXX`` escape instead
    of raising ``UnicodeEncodeError`` after the work is done. The encoding itself is left as it is."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None and getattr(stream, "errors", None) not in _LENIENT_ERRORS:
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # a closed or detached stream: nothing will be written to it
                pass


def run_command(func: Callable[[], Any], prog: str, *, verbose: bool = False) -> int:
    """Run a command and turn every exception into one line on stderr and an exit status: 2 for a mistake in
    the user's input (an :class:`ImageRewardError`: a bad option, file, image, checkpoint or name), 1 for a
    failure that is not (a :class:`DownloadError` or :class:`DiskSpaceError`, I/O, out of memory, a bug: the
    traceback is logged only with ``--verbose``), 130 for Ctrl-C. Output never fails on encoding (see
    :func:`safe_output_streams`)."""
    safe_output_streams()
    try:
        return int(func() or 0)
    except ImageRewardError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1 if isinstance(err, (DownloadError, DiskSpaceError)) else 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head`: not an error of ours
        return 1
    except (Exception, SystemExit) as err:  # noqa: BLE001 - the CLI never shows a traceback
        if isinstance(err, SystemExit):
            if err.code in (None, 0):
                return 0
            if isinstance(err.code, int):
                return err.code
        if verbose:
            logging.getLogger(__name__).exception("%s failed", prog)
        text = str(err).strip().splitlines()
        print(f"{prog}: error: {type(err).__name__}: {text[0] if text else ''}"
              + ("" if verbose else " (rerun with -v for details)"), file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="imagereward", description="Text-to-image human-preference reward models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_command(lambda: args.func(args), f"imagereward {args.command}", verbose=args.verbose)


if __name__ == "__main__":
    raise SystemExit(main())
