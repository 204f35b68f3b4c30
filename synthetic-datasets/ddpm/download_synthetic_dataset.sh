#!/usr/bin/env bash
# Download a DDPM-produced synthetic dataset (50000 samples, about 7 GB) and extract it into synthetic-datasets/ddpm/.
# Usage: bash synthetic-datasets/ddpm/download_synthetic_dataset.sh <bedroom_28|ffhq_34|cat_15|horse_21> [ddpm-seg download options, e.g. --record]
# Resumable and checksum-verified: see `ddpm-seg download --help`.
set -euo pipefail
name=${1:?usage: $0 <bedroom_28|ffhq_34|cat_15|horse_21> [ddpm-seg download options]}
shift
root="$(cd "$(dirname "$0")/../.." && pwd)"
exec ddpm-seg download "synthetic/ddpm/$name" --root "$root" "$@"
