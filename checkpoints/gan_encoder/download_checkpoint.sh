#!/usr/bin/env bash
# Download a pretrained e4e encoder (encoder4editing) into checkpoints/gan_encoder/e4e_<name>_encode.pt.
# Usage: bash checkpoints/gan_encoder/download_checkpoint.sh <ffhq|horse> [ddpm-seg download options, e.g. --record]
# The generator each encoder was trained for is downloaded separately (checkpoints/stylegan2/).
# The files are published on Google Drive only; resumable and checksum-verified: see `ddpm-seg download --help`.
set -euo pipefail
name=${1:?usage: $0 <ffhq|horse> [ddpm-seg download options]}
shift
root="$(cd "$(dirname "$0")/../.." && pwd)"
exec ddpm-seg download "gan_encoder/$name" --root "$root" "$@"
