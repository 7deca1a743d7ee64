"""Train the reward model (the original train/src/train.py). Run from train/:

    python src/train.py --config src/config/config.yaml                  # one process
    accelerate launch --num_processes 4 src/train.py --config ...        # several GPUs / nodes
    python src/train.py --config src/config/config.yaml --export-from checkpoint/<run>/best   # export a stopped run

All logic lives in ImageReward.rm_training; this file only parses arguments.
"""

import argparse
import logging
import sys

from ImageReward.cli import OneLineParser, run_command
from ImageReward.commands.train_rm import add_arguments, run

if __name__ == "__main__":
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser.parse_args()
    sys.exit(run_command(lambda: run(args), "train.py", verbose=True))
