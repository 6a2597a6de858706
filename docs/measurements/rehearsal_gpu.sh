#!/bin/bash
# Rehearsal of the paper's full-size run on one GPU: ResNet-38 (random weights; speed
# does not depend on them), every stage on VOC-sized inputs, compilation included,
# projected to the whole train_aug pipeline (affinity_jax/benchmarks/rehearsal.py).
# Run from the repository root with the project installed and the GPU jax
# (docs/install.md):
#   pip install -r requirements.lock -e . --no-deps
#   pip install "jax[cuda12]==$(sed -n 's/^jax==//p' requirements.lock)"
# Writes $OUT/rehearsal.json and $OUT/log.txt (OUT defaults to ./rehearsal_out).
# The timeouts keep it under 9 minutes of device time; STEPS and IMAGES shrink it.
set -u
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
OUT=${OUT:-./rehearsal_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
lscpu | grep -E "^Model name|^CPU\(s\)"
timeout 450 python -m affinity_jax.benchmarks.rehearsal --backbone=resnet38 \
    --steps="${STEPS:-10}" --images="${IMAGES:-48}" --out="$OUT/rehearsal.json"
echo "exit $?"
# AffinityNet's pair affinities and their gradient at the paper's 448 crop (56x56 cells).
timeout 90 python -m affinity_jax.benchmarks.affinity_loss --grids 56x56 --radii 5,12 \
    --out="$OUT/affinity_loss.json"
echo "exit $?"
