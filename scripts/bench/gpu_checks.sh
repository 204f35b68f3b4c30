#!/usr/bin/env bash
# Every GPU measurement in one run, for a machine with one CUDA GPU (budget: about 10 minutes on an
# H100-class GPU). Writes <out>/*.json and *.txt; the tables are printed too.
#   1. bedroom_28's 40 + 20 images end to end with the defaults (fast recipe; the paper's UNet at random
#      weights in fp16, as its MODEL_FLAGS' --use_fp16 True asks), target <= 60 s;
#   2. the same with the UNet in float32 (what use_fp16 buys);
#   3. seeds 1-4 of run 1 (with seed 0: the 5-seed table of mIoU and times);
#   4. the paper recipe on 8 + 4 images (its training is the slow part; the 40 + 20 figure scales linearly).
# Usage: bash scripts/bench/gpu_checks.sh [out_dir]
set -euo pipefail
OUT=${1:-gpu_checks}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
COMMON=(--phases e2e --device cuda --predict-runs 1 --train-steps 50)
ddpm-seg bench "${COMMON[@]}" --json "$OUT/e2e_fast_fp16.json" | tee "$OUT/e2e_fast_fp16.txt"
ddpm-seg bench "${COMMON[@]}" --extract_dtype fp32 --json "$OUT/e2e_fast_fp32.json" | tee "$OUT/e2e_fast_fp32.txt"
for seed in 1 2 3 4; do
  ddpm-seg bench "${COMMON[@]}" --seed "$seed" --quiet --json "$OUT/e2e_fast_seed$seed.json" | tee "$OUT/e2e_fast_seed$seed.txt"
done
ddpm-seg bench "${COMMON[@]}" --recipe paper --n 8 --test_n 4 --json "$OUT/e2e_paper_8_4.json" | tee "$OUT/e2e_paper_8_4.txt"
python - "$OUT" <<'PY'
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "e2e_*.json"))):
    e = json.load(open(path))["e2e"]["ours"]
    print(f"{os.path.basename(path):28s} wall {e['wall_s']:7.1f} s  extract {e['extract_train_s']:6.1f} s  "
          f"train {e['train_ensemble_s']:6.1f} s  evaluate {e['evaluate_s']:6.1f} s  mIoU {100 * e['miou']:.2f}")
PY
