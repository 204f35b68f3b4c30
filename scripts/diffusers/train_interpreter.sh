#!/usr/bin/env bash
# Train and evaluate the pixel-classifier ensemble on Stable Diffusion 1.5 features (model_type "diffusers").
# Usage: bash scripts/diffusers/train_interpreter.sh <dataset> [extra ddpm-seg train-interpreter flags, e.g. --seed 1 --device cuda]
# Datasets: bedroom_28, ffhq_34, cat_15, horse_21, celeba_19, ade_bedroom_30.
# Needs the extra: pip install -e '.[diffusers]'. The pipeline is the config's model_path (a hub id, taken from
# the Hugging Face cache or downloaded once; or a folder written by save_pretrained).
set -euo pipefail
DATASET=${1:?usage: bash scripts/diffusers/train_interpreter.sh <dataset> [flags]}
shift
exec ddpm-seg train-interpreter --exp "experiments/${DATASET}/sd15.json" "$@"
