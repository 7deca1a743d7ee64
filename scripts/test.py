"""Preference accuracy on the human-ranked test set (the paper's Table 3): the original ``test.py``.

Thin entry point: ``imagereward eval-preference`` with the original defaults (run from the repo root)::

    python scripts/test.py --model_type all --source_path data/test.json --img_prefix data/test_images \
        --target_dir data/ --rm_path checkpoint/
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ImageReward.commands.eval import main_preference  # noqa: E402

DEFAULTS = ["--source_path", "data/test.json", "--target_dir", "data/", "--img_prefix", "data/test_images",
            "--model_type", "all", "--rm_path", "checkpoint/"]

if __name__ == "__main__":
    raise SystemExit(main_preference(DEFAULTS + sys.argv[1:]))
