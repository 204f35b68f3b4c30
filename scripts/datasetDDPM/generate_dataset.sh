#!/usr/bin/env bash
# DatasetDDPM, step 2: sample images from the DDPM and label them with the ensemble of step 1. The .npz
# (samples_256x256x3.npz) goes to the ensemble's folder, pixel_classifiers/<dataset>/datasetDDPM/<steps_blocks>/seed_0/.
# Usage: NUM_GPUS=8 bash scripts/datasetDDPM/generate_dataset.sh <bedroom_28|ffhq_34|cat_15|horse_21> [extra flags]
# The original setting (10000 samples, all 1000 ancestral steps, 100 per GPU) suits 8 x A100 80GB; adjust
# --batch_size (per process) to your GPUs. A stopped run resumes where it stopped when started again.
# Faster, at some cost in sample quality: --timestep_respacing 250, or --timestep_respacing ddim100 --use_ddim True.
set -euo pipefail
DATASET=${1:?usage: bash scripts/datasetDDPM/generate_dataset.sh <bedroom_28|ffhq_34|cat_15|horse_21> [flags]}
shift
NUM_GPUS=${NUM_GPUS:-1}
MODEL_FLAGS="--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 --image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True"
SAMPLE_FLAGS="--batch_size 100 --num_samples 10000 --use_ddim False"
exec torchrun --standalone --nproc_per_node="$NUM_GPUS" -m ddpm_seg.cli generate-dataset \
    --exp "experiments/${DATASET}/datasetDDPM.json" $MODEL_FLAGS $SAMPLE_FLAGS "$@"
