#!/usr/bin/env bash
# ReFL for Stable Diffusion 1.4 with the original recipe: 8 GPUs x batch 2 x accumulation 4 = 64 prompts per
# update, 100 updates, AdamW 1e-5, fp16, EMA, UNet gradient checkpointing, grad_scale 1e-3.
# Needs: pip install -e ".[refl]"  and  python data/download_refl_data.py  (the 10,000 prompts).
# Fewer GPUs: change --num_processes (and drop --multi_gpu for one); extra options are passed through, e.g.
#   bash scripts/train_refl.sh --validation_prompts "a cat" --monitor_reward Aesthetic --resume_from_checkpoint latest
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f data/refl_data.json ] || python data/download_refl_data.py

accelerate launch --multi_gpu --mixed_precision=fp16 --num_processes=8 refl.py \
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
