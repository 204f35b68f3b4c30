#!/usr/bin/env bash
# Download the public FFHQ-256 VDVAE (its EMA weights, ffhq256-iter-1700000-model-ema.th) into checkpoints/vdvae/ffhq256.th.
# Usage: bash checkpoints/vdvae/download_checkpoint.sh ffhq256 [ddpm-seg download options, e.g. --record]
# Resumable and checksum-verified: see `ddpm-seg download --help`.
set -euo pipefail
name=${1:?usage: $0 ffhq256 [ddpm-seg download options]}
shift
root="$(cd "$(dirname "$0")/../.." && pwd)"
exec ddpm-seg download "vdvae/$name" --root "$root" "$@"
