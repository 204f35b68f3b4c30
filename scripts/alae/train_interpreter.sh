#!/usr/bin/env bash
# Train and evaluate the pixel-classifier ensemble on ALAE features (StyleALAE generator blocks for the latent
# of ALAE's encoder; a baseline of the paper).
# Usage: bash scripts/alae/train_interpreter.sh <dataset> [extra ddpm-seg train-interpreter flags, e.g. --seed 1 --random_init]
# Datasets: bedroom_28, ffhq_34, celeba_19, ade_bedroom_30 (the paper reports no ALAE number for cat_15 and horse_21).
# The checkpoint is the config's model_path (checkpoints/alae/<bedroom|ffhq>.pth; celeba_19 uses the FFHQ model).
set -euo pipefail
DATASET=${1:?usage: bash scripts/alae/train_interpreter.sh <dataset> [flags]}
shift
exec ddpm-seg train-interpreter --exp "experiments/${DATASET}/alae.json" "$@"
