#!/usr/bin/env bash
# Train and evaluate the pixel-classifier ensemble on GAN Encoder features (a baseline of the paper): e4e
# encodes each image to W+, and the StyleGAN2 generator's activations for those codes are the features.
# Usage: bash scripts/gan_encoder/train_interpreter.sh <dataset> [extra ddpm-seg train-interpreter flags, e.g. --seed 1 --random_init]
# Datasets: ffhq_34, celeba_19 (FFHQ encoder and generator), horse_21 (LSUN horse). The paper also reports
# bedroom_28, cat_15 and ade_bedroom_30, for which no e4e encoder is published.
# Checkpoints: the config's encoder_path (checkpoints/gan_encoder/e4e_<ffhq|horse>_encode.pt, see
# checkpoints/gan_encoder/download_checkpoint.sh) and model_path (checkpoints/stylegan2/stylegan2-<ffhq|horse>-config-f.pkl).
set -euo pipefail
DATASET=${1:?usage: bash scripts/gan_encoder/train_interpreter.sh <dataset> [flags]}
shift
exec ddpm-seg train-interpreter --exp "experiments/${DATASET}/gan_encoder.json" "$@"
