#!/usr/bin/env bash
# Download a pretrained MAE into checkpoints/mae/<name>.pth.
# Usage: bash checkpoints/mae/download_checkpoint.sh <lsun_bedroom|ffhq|lsun_cat|lsun_horse> [ddpm-seg download options, e.g. --record]
# Resumable and checksum-verified: see `ddpm-seg download --help`.
set -euo pipefail
name=${1:?usage: $0 <lsun_bedroom|ffhq|lsun_cat|lsun_horse> [ddpm-seg download options]}
shift
root="$(cd "$(dirname "$0")/../.." && pwd)"
exec ddpm-seg download "mae/$name" --root "$root" "$@"
