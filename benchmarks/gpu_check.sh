#!/usr/bin/env bash
# One GPU check: every speed and memory figure the README promises for GPUs, in one run under 8 minutes on one
# H100/H200, written to benchmarks/results/gpu_check.md and gpu_check.json (device, driver, torch/CUDA/cuDNN, date,
# every figure with the exact command that produced it). The cases and their budgets are the table in
# benchmarks/gpu_check.py; each runs an existing benchmark (bench_score.py, bench_refl.py, bench_score_dataset.py,
# ...) with arguments. Random weights built from configs: nothing is downloaded, nothing is installed at run time.
#
#   bash benchmarks/gpu_check.sh --setup                 # once: the project's missing dependencies (see below)
#   bash benchmarks/gpu_check.sh [--out DIR]             # the GPU run (default DIR: benchmarks/results)
#   bash benchmarks/gpu_check.sh --smoke --out /tmp/gc   # every case on CPU with tiny configs (~3 min on 2 cores)
#   bash benchmarks/gpu_check.sh --list                  # the cases; those whose work is not in this tree yet
#   bash benchmarks/gpu_check.sh --cases 'refl/*'        # a subset; --help for the rest
#   python benchmarks/gpu_check.py --readme benchmarks/results/gpu_check.json   # README-ready tables
#
# Setup, one line (a machine with package registries; torch with CUDA first if it has none):
#   python3 -m pip install -e ".[dev]"
# `--setup` does exactly that, or, when the folder .whl/ holds wheels (a machine with no registry, such as the
# project's lent GPU machines, whose image already has torch+CUDA, transformers, accelerate, peft, pyarrow, pyyaml,
# tensorboard and pytest), installs those wheels offline into .gpu_site/ (put on PYTHONPATH by this script) and
# runs the project from the tree itself (PYTHONPATH=<repo>; nothing is built). Fill .whl/ beforehand, here, with
#   bash benchmarks/gpu_check.sh --fetch-wheels          # diffusers, ftfy, wcwidth (pure-Python, ~5 MB)
# Setup takes ~10-20 s from .whl/; with a registry and no torch, the CUDA torch wheel (~2.5 GB with its CUDA
# libraries) makes it 2-5 minutes.
#
# The device run (the tool library's `run`, in the repository root of a fresh lent machine; carry [".whl"]):
#   set -o pipefail; bash benchmarks/gpu_check.sh --setup && bash benchmarks/gpu_check.sh --out $OUT 2>&1 | tee $OUT/gpu_check.log
# with timeout_s 600: the cases' budgets add up to at most 470 s (--total-budget); a machine's start and the setup
# come on top, so one call fits a 15-minute device lease with time to spare. gpu_check.md and gpu_check.json come
# back in $OUT; commit them to benchmarks/results/ and update the README's GPU tables from them (--readme).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELS=(diffusers ftfy wcwidth  # + the reward-server case: its server, its clients and the baseline it is compared to
        fastapi starlette uvicorn h11 annotated-doc aiohttp aiosignal frozenlist multidict yarl propcache aiohappyeyeballs
        flask werkzeug itsdangerous blinker gunicorn)

case "${1:-}" in
  --setup)
    if compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
      "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$ROOT/.gpu_site" "$ROOT"/.whl/*.whl
    else
      "$PYTHON" -m pip install -q -e "$ROOT[dev]"
    fi
    PYTHONPATH="$ROOT:$ROOT/.gpu_site${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c \
      "import torch, transformers, diffusers, accelerate, peft, ImageReward; print('gpu_check setup: torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
    exit 0 ;;
  --fetch-wheels)
    pins=()
    for name in "${WHEELS[@]}"; do
      pins+=("$name==$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
    done
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$ROOT/.whl" "${pins[@]}"
    ls -l "$ROOT/.whl"
    exit 0 ;;
esac

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ -d "$ROOT/.gpu_site" ]; then
  export PYTHONPATH="$PYTHONPATH:$ROOT/.gpu_site"
fi
exec "$PYTHON" "$ROOT/benchmarks/gpu_check.py" "$@"
