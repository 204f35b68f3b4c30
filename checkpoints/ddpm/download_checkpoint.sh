#!/usr/bin/env bash
# Download a pretrained DDPM into checkpoints/ddpm/<name>.pt (LSUN models also from OpenAI's guided-diffusion release);
# imagenet_256_uncond (OpenAI's ImageNet ADM) goes to checkpoints/adm_imagenet/ with its model_flags.json beside it.
# Usage: bash checkpoints/ddpm/download_checkpoint.sh <lsun_bedroom|ffhq|lsun_cat|lsun_horse|imagenet_256_uncond> [ddpm-seg download options, e.g. --record]
# Resumable and checksum-verified: see `ddpm-seg download --help`.
set -euo pipefail
name=${1:?usage: $0 <lsun_bedroom|ffhq|lsun_cat|lsun_horse|imagenet_256_uncond> [ddpm-seg download options]}
shift
root="$(cd "$(dirname "$0")/../.." && pwd)"
exec ddpm-seg download "ddpm/$name" --root "$root" "$@"
