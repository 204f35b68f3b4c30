#!/usr/bin/env bash
# DatasetDDPM, step 3: train DeepLabV3 (ResNet-101) on the synthetic dataset, pick the epoch with the best mIoU
# on validation_path (real/train) and report its mIoU on testing_path (real/test). Stopped runs resume.
# Usage: bash scripts/datasetDDPM/train_deeplab.sh <bedroom_28|ffhq_34|cat_15|horse_21> [extra flags]
# --data_path: the released dataset (bash synthetic-datasets/ddpm/download_synthetic_dataset.sh <dataset>), as here;
#   leave it out to use the one generate_dataset.sh wrote into the ensemble's folder.
#   DatasetGAN's files (synthetic-datasets/gan/<dataset>/...) load too.
# --max_data: number of synthetic images used (the original's 50000; up to 50000 gives 2-4% more mIoU than 10000).
# --uncertainty_portion: share of the most uncertain samples dropped (0.1; 0.2-0.25 is sometimes a little better).
#   Add --drop_most_certain 30 to filter exactly as the original code (see ddpm-seg train-deeplab --help).
# Multi-GPU: torchrun --standalone --nproc_per_node=N -m ddpm_seg.cli train-deeplab ... (--batch_size is per process).
set -euo pipefail
DATASET=${1:?usage: bash scripts/datasetDDPM/train_deeplab.sh <bedroom_28|ffhq_34|cat_15|horse_21> [flags]}
shift
# The paper's DeepLab backbone is ImageNet-pretrained: fetch it with checkpoints/deeplab/download_checkpoint.sh resnet101.
WEIGHTS=()
if [ -f checkpoints/deeplab/resnet101.pth ]; then WEIGHTS=(--backbone_weights checkpoints/deeplab/resnet101.pth); fi
exec ddpm-seg train-deeplab "${WEIGHTS[@]}" --exp "experiments/${DATASET}/datasetDDPM.json" \
    --data_path "synthetic-datasets/ddpm/${DATASET}/samples_256x256x3.npz" \
    --max_data 50000 --uncertainty_portion 0.1 "$@"
