"""Train the reward model (the original train/src/train.py). Run from train/:

    python src/train.py --config src/config/config.yaml                  # one process
    accelerate launch --num_processes 4 src/train.py --config ...        # several GPUs / nodes
    python src/train.py --config src/config/config.yaml --export-from checkpoint/<run>/best   # export a stopped run

All logic lives in ImageReward.rm_training; this file only parses arguments.
"""

import argparse
import logging
import sys

from ImageReward.commands.train_rm import add_arguments, run
from ImageReward.errors import ImageRewardError

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sys.exit(run(parser.parse_args()))
    except ImageRewardError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        sys.exit(2)
