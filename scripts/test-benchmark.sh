#! /bin/bash
# Generator benchmark (Table 1). On a fresh clone the Python side creates benchmark/generations and downloads the published
# generations of each missing model (versatile-diffusion.zip goes to the folder "vd"), then scores them.
# Extra options are passed through, e.g.
#   bash scripts/test-benchmark.sh --benchmark "ImageReward-v1.0, CLIP, BLIP, Aesthetic"
set -euo pipefail
cd "$(dirname "$0")/.."
run_cmd=("${PYTHON:-python}" scripts/test-benchmark.py "$@")
echo "${run_cmd[@]}"
"${run_cmd[@]}"
