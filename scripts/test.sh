#! /bin/bash
# Preference accuracy (Table 3). Downloads data/test.json and data/test_images (test_images.zip from the
# Hub repo THUDM/ImageReward) when missing, then scores them. Extra options are passed through, e.g.
#   bash scripts/test.sh --model_type ImageReward-v1.0 --rm_path checkpoint/
set -euo pipefail
cd "$(dirname "$0")/.."
run_cmd=("${PYTHON:-python}" scripts/test.py "$@")
echo "${run_cmd[@]}"
"${run_cmd[@]}"
