#!/usr/bin/env bash
# Train and evaluate the pixel-classifier ensemble on DDPM features (the fast training recipe; add --recipe paper
# for the paper's own: batch 64, every pixel, all features, its stopping rule).
# Usage: bash scripts/ddpm/train_interpreter.sh <dataset> [extra ddpm-seg train-interpreter flags, e.g. --seed 1 --device cpu]
# Datasets: bedroom_28, ffhq_34, cat_15, horse_21, celeba_19, ade_bedroom_30 (and demo).
# Note: change MODEL_FLAGS if you use another pretrained DDPM; checkpoints trained with `ddpm-seg train-ddpm`
# carry their own flags (model_flags.json beside them) and need none.
set -euo pipefail
DATASET=${1:?usage: bash scripts/ddpm/train_interpreter.sh <dataset> [flags]}
shift
MODEL_FLAGS="--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 --image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True"
if [ "$DATASET" = demo ]; then MODEL_FLAGS=""; fi
exec ddpm-seg train-interpreter --exp "experiments/${DATASET}/ddpm.json" $MODEL_FLAGS "$@"
