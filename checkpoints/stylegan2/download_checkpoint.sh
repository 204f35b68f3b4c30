#!/usr/bin/env bash
# Download a public StyleGAN2 generator (NVIDIA's config-F TensorFlow pickle, read without running its code) or the
# projector's LPIPS weights into checkpoints/stylegan2/.
# Usage: bash checkpoints/stylegan2/download_checkpoint.sh <ffhq|cat|horse|vgg16|lpips_vgg> [ddpm-seg download options, e.g. --record]
# GAN Inversion needs a generator and both vgg16 and lpips_vgg. Resumable and checksum-verified: see `ddpm-seg download --help`.
set -euo pipefail
name=${1:?usage: $0 <ffhq|cat|horse|vgg16|lpips_vgg> [ddpm-seg download options]}
shift
root="$(cd "$(dirname "$0")/../.." && pwd)"
exec ddpm-seg download "stylegan2/$name" --root "$root" "$@"
