"""Generator benchmark (the paper's Table 1): the original ``test-benchmark.py``.

Thin entry point: ``imagereward eval-benchmark`` with the original defaults (run from the repo root)::

    python scripts/test-benchmark.py --model default --benchmark "ImageReward-v1.0, CLIP"
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ImageReward.commands.eval import main_benchmark  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main_benchmark(sys.argv[1:]))
