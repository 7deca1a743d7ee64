#!/usr/bin/env bash
# Reward-model training on one node (the original scripts/train_one_node.sh, on accelerate).
# Run from train/:  bash scripts/train_one_node.sh            (4 GPUs, 4 pairs x 4 accumulation = 64 pairs)
#                   NUM_GPUS=1 bash scripts/train_one_node.sh (1 GPU: accumulation 16 keeps 64 pairs per step)
# Extra arguments are passed on, e.g.  --resume_from_checkpoint latest   or   --set train.mixed_precision=bf16
# --help prints this and train.py's options; --dry_run checks the config, the model files and the data in one
# process (nothing is downloaded or trained) and prints what the run would do.
set -euo pipefail
source "$(dirname "$0")/../../scripts/help_or_dry_run.sh"
help_or_dry_run "$(dirname "$0")/../src/train.py" "$@"
NUM_GPUS="${NUM_GPUS:-4}"
BATCH_SIZE="${BATCH_SIZE:-4}"
ACCUM=$(( 64 / (BATCH_SIZE * NUM_GPUS) ))
if (( ACCUM < 1 )); then ACCUM=1; fi
if (( DRY_RUN )); then LAUNCH=(env WORLD_SIZE="$NUM_GPUS" python)  # one process; sizes the printed plan
elif (( NUM_GPUS > 1 )); then LAUNCH=(accelerate launch --multi_gpu --num_processes "$NUM_GPUS" --main_process_port 29500);
else LAUNCH=(accelerate launch --num_processes 1); fi
"${LAUNCH[@]}" src/train.py --config src/config/config.yaml \
    --savepath blip_uni_cross_mul --batch_size "$BATCH_SIZE" --accumulation_steps "$ACCUM" --epochs 10 \
    --fix_rate 0.7 --lr 1e-05 --lr-decay-style cosine --warmup 0.0 --rank_pair --std_log \
    --clear_visualizer --valid_per_epoch 4 "$@"
