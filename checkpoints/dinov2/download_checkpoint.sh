#!/usr/bin/env bash
# Download a pretrained DINOv2 into checkpoints/dinov2/.
# Usage: bash checkpoints/dinov2/download_checkpoint.sh <vitl14|vitl14_reg4|vitl14_timm> [ddpm-seg download options, e.g. --record]
#   vitl14       Meta's ViT-L/14 release file, dinov2_vitl14_pretrain.pth (the configs' model_path)
#   vitl14_reg4  Meta's ViT-L/14 with 4 registers, dinov2_vitl14_reg4_pretrain.pth (arch vit_large_patch14_reg4_dinov2)
#   vitl14_timm  the same ViT-L/14 weights as timm's model.safetensors, vit_large_patch14_dinov2.lvd142m.safetensors
# Resumable and checksum-verified: see `ddpm-seg download --help`.
set -euo pipefail
name=${1:?usage: $0 <vitl14|vitl14_reg4|vitl14_timm> [ddpm-seg download options]}
shift
root="$(cd "$(dirname "$0")/../.." && pwd)"
exec ddpm-seg download "dinov2/$name" --root "$root" "$@"
