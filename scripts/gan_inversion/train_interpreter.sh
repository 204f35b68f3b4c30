#!/usr/bin/env bash
# Train and evaluate the pixel-classifier ensemble on GAN Inversion features (a baseline of the paper): each
# image is projected into a StyleGAN2's latent space, and the generator's block outputs for it are the features.
# Usage: bash scripts/gan_inversion/train_interpreter.sh <dataset> [extra ddpm-seg train-interpreter flags, e.g. --seed 1 --random_init]
# Datasets: ffhq_34, celeba_19 (FFHQ generator), cat_15 (LSUN cat), horse_21 (LSUN horse). NVIDIA released no
# StyleGAN2 LSUN bedroom network, so bedroom_28 and ade_bedroom_30 have no config.
# Files: the config's model_path (checkpoints/stylegan2/stylegan2-<ffhq|cat|horse>-config-f.pkl) and the LPIPS
# weights (checkpoints/stylegan2/vgg16-397923af.pth, lpips_vgg_v0.1.pth): see checkpoints/stylegan2/download_checkpoint.sh.
set -euo pipefail
DATASET=${1:?usage: bash scripts/gan_inversion/train_interpreter.sh <dataset> [flags]}
shift
exec ddpm-seg train-interpreter --exp "experiments/${DATASET}/gan_inversion.json" "$@"
