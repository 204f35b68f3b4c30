#!/usr/bin/env bash
# Download a released StyleALAE checkpoint into checkpoints/alae/<name>.pth (name = the config's alae_config).
# Usage: bash checkpoints/alae/download_checkpoint.sh <ffhq|bedroom|celeba-hq256|celeba> [ddpm-seg download options, e.g. --record]
# Resumable and checksum-verified: see `ddpm-seg download --help`.
set -euo pipefail
name=${1:?usage: $0 <ffhq|bedroom|celeba-hq256|celeba> [ddpm-seg download options]}
shift
root="$(cd "$(dirname "$0")/../.." && pwd)"
exec ddpm-seg download "alae/$name" --root "$root" "$@"
