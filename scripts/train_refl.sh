#!/usr/bin/env bash
# ReFL for Stable Diffusion 1.4 with the original recipe: 8 GPUs x batch 2 x accumulation 4 = 64 prompts per
# update, 100 updates, AdamW 1e-5, fp16, EMA, UNet gradient checkpointing, grad_scale 1e-3.
# Needs: pip install -e ".[refl]"  and  python data/download_refl_data.py  (the 10,000 prompts).
# Fewer GPUs: NUM_PROCESSES=2 bash scripts/train_refl.sh (1 = no --multi_gpu); extra options are passed on, e.g.
#   bash scripts/train_refl.sh --validation_prompts "a cat" --monitor_reward Aesthetic --resume_from_checkpoint latest
# --help prints this and refl.py's options; --dry_run checks the prompts, the model files and the settings in one
# process (nothing is downloaded or trained) and prints what the run would do.
set -euo pipefail
source "$(dirname "$0")/help_or_dry_run.sh"
help_or_dry_run "$(dirname "$0")/../refl.py" "$@"
cd "$(dirname "$0")/.."
NUM_PROCESSES="${NUM_PROCESSES:-8}"
if (( DRY_RUN )); then
  LAUNCH=(env WORLD_SIZE="$NUM_PROCESSES" python)  # one process; WORLD_SIZE only sizes the plan it prints
else
  [ -f data/refl_data.json ] || python data/download_refl_data.py
  MULTI=(); (( NUM_PROCESSES > 1 )) && MULTI=(--multi_gpu)
  LAUNCH=(accelerate launch "${MULTI[@]}" --mixed_precision=fp16 --num_processes="$NUM_PROCESSES")
fi

"${LAUNCH[@]}" refl.py \
  --pretrained_model_name_or_path="CompVis/stable-diffusion-v1-4" \
  --train_data="data/refl_data.json" \
  --use_ema \
  --resolution=512 \
  --train_batch_size=2 \
  --gradient_accumulation_steps=4 \
  --gradient_checkpointing \
  --max_train_steps=100 \
  --learning_rate=1e-05 \
  --max_grad_norm=1 \
  --lr_scheduler="constant" --lr_warmup_steps=0 \
  --output_dir="checkpoint/refl" \
  --grad_scale 0.001 \
  --checkpointing_steps 100 \
  "$@"
