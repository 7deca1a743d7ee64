#!/usr/bin/env bash
# Online RL (Flow-GRPO) for SD3.5-medium on PickScore, with flow_grpo's recipe (config/grpo.py:pickscore_sd3_4gpu,
# scripts/train_sd3.py): 4 GPUs x 8 images x 8 sample batches = 256 images per update = 16 prompts x groups of
# 16; 10 SDE steps (noise level 0.7), CFG 4.5, 512 px; train on 99 % of the steps, 2 optimizer steps per update
# (accumulation 4); LoRA r32 / alpha 64 on the MMDiT attention; AdamW 3e-4, weight decay 1e-4; clip range 1e-4,
# advantages clamped at 5, KL beta 0.01 to the base (LoRA disabled), std over the whole update (global_std).
# flow_grpo also keeps an EMA of the LoRA (not offered with --lora_rank here) and evaluates with 40 ODE steps.
# Needs: pip install -e ".[refl]". Prompts: TRAIN_DATA (one prompt per line, or JSON/JSONL/CSV; flow_grpo's
# dataset/pickscore/train.txt works as is). Fewer GPUs: NUM_GPUS=1 keeps the groups (16 images per prompt) and
# gives 4 prompts per update. Extra options are passed through, e.g.
#   bash scripts/train_grpo.sh --reward "PickScore:1.0,Aesthetic:0.1" --reward_aggregation group_zscore
#   bash scripts/train_grpo.sh --resume_from_checkpoint latest
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_GPUS="${NUM_GPUS:-4}"
TRAIN_DATA="${TRAIN_DATA:-data/refl_data.json}"
[ -f "$TRAIN_DATA" ] || { [ "$TRAIN_DATA" = data/refl_data.json ] && python data/download_refl_data.py; }
LAUNCH=(accelerate launch --mixed_precision=bf16 --num_processes="$NUM_GPUS")
[ "$NUM_GPUS" -gt 1 ] && LAUNCH+=(--multi_gpu)

"${LAUNCH[@]}" refl.py \
  --algorithm grpo \
  --pretrained_model_name_or_path="stabilityai/stable-diffusion-3.5-medium" \
  --model_family sd3 \
  --train_data="$TRAIN_DATA" \
  --reward PickScore \
  --resolution 512 \
  --num_inference_steps 10 \
  --guidance_scale 4.5 \
  --noise_level 0.7 \
  --train_batch_size 8 \
  --group_size 16 \
  --sample_batches_per_update 8 \
  --gradient_accumulation_steps 4 \
  --num_inner_epochs 1 \
  --timestep_fraction 0.99 \
  --clip_range 1e-4 \
  --adv_clip_max 5 \
  --beta 0.01 \
  --global_std \
  --lora_rank 32 --lora_alpha 64 \
  --learning_rate 3e-4 --adam_weight_decay 1e-4 --max_grad_norm 1.0 \
  --max_sequence_length 128 \
  --max_train_steps 1000 \
  --checkpointing_steps 60 \
  --validation_steps 60 \
  --gradient_checkpointing \
  --output_dir checkpoint/grpo-sd3.5m-pickscore \
  "$@"
