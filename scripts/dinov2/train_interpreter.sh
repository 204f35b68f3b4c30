#!/usr/bin/env bash
# Train and evaluate the pixel-classifier ensemble on DINOv2 (ViT-L/14) features: the normed outputs of its
# last four blocks, the image resized to 448x448 (a 32x32 patch grid). Not a row of the paper: a present-day baseline.
# Usage: bash scripts/dinov2/train_interpreter.sh <dataset> [extra ddpm-seg train-interpreter flags, e.g. --seed 1 --random_init]
# Datasets: bedroom_28, ffhq_34, cat_15, horse_21, celeba_19, ade_bedroom_30.
# The checkpoint is the config's model_path, Meta's release file checkpoints/dinov2/dinov2_vitl14_pretrain.pth
# (bash checkpoints/dinov2/download_checkpoint.sh vitl14), one for every dataset.
set -euo pipefail
DATASET=${1:?usage: bash scripts/dinov2/train_interpreter.sh <dataset> [flags]}
shift
exec ddpm-seg train-interpreter --exp "experiments/${DATASET}/dinov2.json" "$@"
