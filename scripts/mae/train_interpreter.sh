#!/usr/bin/env bash
# Train and evaluate the pixel-classifier ensemble on MAE (ViT-L/8) features (a baseline of the paper).
# Usage: bash scripts/mae/train_interpreter.sh <dataset> [extra ddpm-seg train-interpreter flags, e.g. --seed 1 --random_init]
# Datasets: bedroom_28, ffhq_34, cat_15, horse_21, celeba_19, ade_bedroom_30.
# The checkpoint is the config's model_path (checkpoints/mae/<lsun_bedroom|ffhq|lsun_cat|lsun_horse>.pth).
set -euo pipefail
DATASET=${1:?usage: bash scripts/mae/train_interpreter.sh <dataset> [flags]}
shift
exec ddpm-seg train-interpreter --exp "experiments/${DATASET}/mae.json" "$@"
