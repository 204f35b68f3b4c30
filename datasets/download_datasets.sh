#!/usr/bin/env bash
# Download the six labelled datasets (datasets.tar.gz, about 47 MB) and extract them into datasets/.
# Usage: bash datasets/download_datasets.sh [ddpm-seg download options, e.g. --record]
# Resumable and checksum-verified: see `ddpm-seg download --help`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
exec ddpm-seg download datasets --root "$root" "$@"
