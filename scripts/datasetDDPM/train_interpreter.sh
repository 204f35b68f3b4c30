#!/usr/bin/env bash
# DatasetDDPM, step 1: train the pixel-classifier ensemble on DDPM features of the hand-annotated DDPM samples
# (datasets/<dataset>/ddpm), as the original scripts/datasetDDPM/train_interpreter.sh.
# Usage: bash scripts/datasetDDPM/train_interpreter.sh <bedroom_28|ffhq_34|cat_15|horse_21> [extra train-interpreter flags]
set -euo pipefail
DATASET=${1:?usage: bash scripts/datasetDDPM/train_interpreter.sh <bedroom_28|ffhq_34|cat_15|horse_21> [flags]}
shift
MODEL_FLAGS="--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 --image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True"
exec ddpm-seg train-interpreter --exp "experiments/${DATASET}/datasetDDPM.json" $MODEL_FLAGS "$@"
