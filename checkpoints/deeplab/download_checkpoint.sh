#!/usr/bin/env bash
# Download torchvision's ImageNet ResNet weights for DeepLabV3's backbone into checkpoints/deeplab/<name>.pth
# (the paper's DeepLab starts from an ImageNet-pretrained ResNet-101; scripts/datasetDDPM/train_deeplab.sh uses it
# when present).
# Usage: bash checkpoints/deeplab/download_checkpoint.sh <resnet101|resnet50> [ddpm-seg download options]
set -euo pipefail
name=${1:?usage: $0 <resnet101|resnet50> [ddpm-seg download options]}
shift
root="$(cd "$(dirname "$0")/../.." && pwd)"
exec ddpm-seg download "deeplab/$name" --root "$root" "$@"
