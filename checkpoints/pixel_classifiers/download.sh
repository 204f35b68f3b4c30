#!/usr/bin/env bash
# Download the authors' released pixel classifiers and test predictions and extract them into
# pixel_classifiers/released/ (kept apart from our own runs in pixel_classifiers/<dataset>/).
# Usage: bash checkpoints/pixel_classifiers/download.sh [ddpm-seg download options, e.g. --record]
# Resumable and checksum-verified: see `ddpm-seg download --help`.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
exec ddpm-seg download pixel_classifiers --root "$root" "$@"
