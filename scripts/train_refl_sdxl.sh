#!/usr/bin/env bash
# ReFL for SDXL base 1.0 at 1024 px. Full UNet by default; LoRA with LORA_RANK=4 (or any rank):
#   bash scripts/train_refl_sdxl.sh                    # full fine-tune, EMA, 2 GPUs
#   LORA_RANK=4 bash scripts/train_refl_sdxl.sh        # LoRA, writes pytorch_lora_weights.safetensors
# The SDXL VAE is run in fp32 unless an fp16-fix VAE is given (VAE=madebyollin/sdxl-vae-fp16-fix).
# Optional pre-training regulariser: add --pretrain_data pairs.json --image_base_dir images/ --pretrain_loss_weight 1
# Needs: pip install -e . -r requirements_refl_sdxl.txt  and  python data/download_refl_data.py
# --help prints this and refl.py's options; --dry_run checks the prompts, the model files and the settings in one
# process (nothing is downloaded or trained) and prints what the run would do.
set -euo pipefail
source "$(dirname "$0")/help_or_dry_run.sh"
help_or_dry_run "$(dirname "$0")/../refl.py" "$@"
cd "$(dirname "$0")/.."
(( DRY_RUN )) || [ -f data/refl_data.json ] || python data/download_refl_data.py
NUM_GPUS="${NUM_GPUS:-2}"
LORA_RANK="${LORA_RANK:-0}"
EXTRA=()
if [ "$LORA_RANK" -gt 0 ]; then
  EXTRA+=(--lora_rank "$LORA_RANK" --learning_rate 1e-4 --output_dir checkpoint/refl_sdxl_lora)
else
  EXTRA+=(--use_ema --learning_rate 1e-5 --output_dir checkpoint/refl_sdxl)
fi
if [ -n "${VAE:-}" ]; then EXTRA+=(--pretrained_vae_model_name_or_path "$VAE"); fi
MULTI=(); [ "$NUM_GPUS" -gt 1 ] && MULTI=(--multi_gpu)
if (( DRY_RUN )); then
  LAUNCH=(env WORLD_SIZE="$NUM_GPUS" python)  # one process; WORLD_SIZE only sizes the plan it prints
else
  LAUNCH=(accelerate launch "${MULTI[@]}" --mixed_precision=fp16 --num_processes="$NUM_GPUS")
fi

"${LAUNCH[@]}" refl.py \
  --model_family sdxl \
  --pretrained_model_name_or_path="stabilityai/stable-diffusion-xl-base-1.0" \
  --train_data="data/refl_data.json" \
  --reward "ImageReward-v1.0" \
  --resolution=1024 \
  --train_batch_size=2 \
  --gradient_accumulation_steps=4 \
  --gradient_checkpointing \
  --max_train_steps=100 \
  --max_grad_norm=1 \
  --lr_scheduler="constant" --lr_warmup_steps=0 \
  --grad_scale 0.001 \
  --checkpointing_steps 50 --checkpoints_total_limit 2 \
  "${EXTRA[@]}" \
  "$@"
