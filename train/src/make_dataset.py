"""Build dataset/{train,valid,test}.json from ImageRewardDB (the original train/src/make_dataset.py).

Run from train/:

    python src/make_dataset.py --scale 8k                 # download from the Hub into ./ (images/ + parquet)
    python src/make_dataset.py --mirror /data/ImageRewardDB --root /data/ImageRewardDB   # an existing copy

Images stay on disk as they are (decoded by the training DataLoader workers); missing or corrupt ones are
listed in dataset/bad_images.txt and left out. All logic lives in ImageReward.preference.imagerewarddb.
"""

import argparse
import json
import logging
import sys

from ImageReward.errors import ImageRewardError
from ImageReward.preference.imagerewarddb import IMAGEREWARDDB_REPO, SCALES, hub_fetcher, local_fetcher, make_dataset


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".", help="where ImageRewardDB is kept: metadata-*.parquet and images/ (default: .)")
    parser.add_argument("--out", default="dataset", help="output folder = config data_base (default: dataset)")
    parser.add_argument("--image_base", default=None, help="folder the generations are relative to = config image_base "
                                                           "(default: <root>/images)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="8k", help="train subset (default: 8k)")
    parser.add_argument("--splits", nargs="+", default=["train", "valid", "test"], choices=["train", "valid", "test"])
    parser.add_argument("--repo", default=IMAGEREWARDDB_REPO, help="Hub dataset repository (default: %(default)s)")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    parser.add_argument("--mirror", default=None, help="read the files from this local copy of the repository instead")
    parser.add_argument("--no_verify", action="store_true", help="do not decode every image once (faster, less safe)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fetch = local_fetcher(args.mirror) if args.mirror else hub_fetcher(args.repo, args.root, args.revision)
    try:
        summary = make_dataset(args.root, args.out, scale=args.scale, splits=args.splits, fetch=fetch,
                               image_base=args.image_base, verify=not args.no_verify)
    except ImageRewardError as err:
        print(f"make_dataset.py: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
