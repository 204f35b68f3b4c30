#!/usr/bin/env bash
# Train and evaluate the pixel-classifier ensemble on VDVAE features (a baseline of the paper, faces only).
# Usage: bash scripts/vdvae/train_interpreter.sh <dataset> [extra ddpm-seg train-interpreter flags, e.g. --seed 1 --random_init]
# Datasets: ffhq_34, celeba_19 (both read the public FFHQ-256 VDVAE, checkpoints/vdvae/ffhq256.th).
set -euo pipefail
DATASET=${1:?usage: bash scripts/vdvae/train_interpreter.sh <ffhq_34|celeba_19> [flags]}
shift
exec ddpm-seg train-interpreter --exp "experiments/${DATASET}/vdvae.json" "$@"
