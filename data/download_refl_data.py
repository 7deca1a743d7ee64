"""Download the original ReFL prompt set (10,000 prompts, ``data/refl_data.json``) from THUDM/ImageReward.

Usage: ``python data/download_refl_data.py [--output data/refl_data.json]``. Needs internet once; the file is
checked against its SHA-256 and written atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

URL = "https://raw.githubusercontent.com/THUDM/ImageReward/main/data/refl_data.json"
SHA256 = "47cc5f5c0faa36167c5bd10cdc3aee0b1072147b44d3ae18f77bd98f377ecbb8"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(Path(__file__).with_name("refl_data.json")))
    parser.add_argument("--url", default=URL)
    args = parser.parse_args(argv)
    from ImageReward.errors import DownloadError
    from ImageReward.pretrained import download_url

    if Path(args.output).is_file():
        print(f"{args.output} already exists")
        return 0
    try:
        download_url(args.url, args.output, sha256=SHA256 if args.url == URL else None)
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
