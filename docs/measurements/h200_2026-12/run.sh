#!/bin/bash
# The GPU check behind the README's H200 tables, run from the repository root.
# Parts in order of value, each under a timeout that keeps the whole within DEADLINE s:
#   A  configs/voc12_lite0.py:cpu on voc_dev's train split (the real-photo table)
#   B  benchmarks.propagation
#   C  benchmarks.pipeline
#   D  benchmarks.models
# SKIP_SETUP=1 (local dry run with a venv's python3), VARIANT, PROP, PIPE, MODELS override.
set -u
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 XLA_PYTHON_CLIENT_MEM_FRACTION=0.6
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
DEADLINE=${DEADLINE:-565}
T0=$(date +%s)
el() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
# timeout of at most $1 s and at most what is left before the deadline (minus $2 s kept).
tmo() { local l=$(( $(left) - ${2:-0} )); (( l < $1 )) && echo $l || echo $1; }

exec > >(tee -a "$OUT/log.txt") 2>&1
el setup
if [ -z "${SKIP_SETUP:-}" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  lscpu | grep -E "^Model name|^CPU\(s\)|^Flags" | cut -c1-200
  # (Machine-specific: install the lock's packages and pydensecrf2 into ${SITE:-./site} from
  # local wheel files, in the background for pydensecrf2, whose pid is PDC.)
  export PYTHONPATH=${SITE:-./site}:$PWD
  smoke='import jax, jax.numpy as jnp, flax, optax, numpy, grain, tensorflow_datasets, orbax.checkpoint
from flax import nnx
from affinity_jax.models import CAMNet
m = CAMNet("tiny", rngs=nnx.Rngs(0)); y, aux = m(jnp.zeros((1, 64, 64, 3)), train=False)
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "numpy",
      numpy.__version__, jax.devices(), y.shape)'
  if ! python3 -c "$smoke"; then
    el "carried flax/optax/orbax failed; trying the image's own"
    rm -rf ${SITE:-./site}/flax* ${SITE:-./site}/optax* ${SITE:-./site}/orbax*
    python3 -c "$smoke" || exit 1
  fi
  if [ -n "${PDC:-}" ]; then wait "$PDC"; cat "$OUT/pdc.txt"; fi
fi
VARIANT=${VARIANT:-cpu}
W=/tmp/voc_gpu

el "A voc12_lite0:$VARIANT (timeout $(tmo 330 150))"
timeout -k 15 -s INT $(tmo 330 150) python3 -m affinity_jax.main \
    --config=configs/voc12_lite0.py:$VARIANT --workdir=$W \
    --config.data.manual_dir=${VOC_DEV:-../voc_dev} --config.data.num_workers=8 \
    --config.crf.num_workers=12
echo "rc $?"
(cd $W && tar czf "$OUT/voc_gpu.tgz" --exclude='ckpt' --exclude='tfds' config.json eval \
    cam/metrics.jsonl aff/metrics.jsonl 2>/dev/null)

el "B propagation (timeout $(tmo 100 60))"
timeout -k 15 -s INT $(tmo 100 60) python3 -m affinity_jax.benchmarks.propagation \
    --out "$OUT/propagation.json" ${PROP:-}

el "C pipeline (timeout $(tmo 170 5))"
timeout -k 15 -s INT $(tmo 170 5) python3 -m affinity_jax.benchmarks.pipeline --crf-workers 12 \
    --out "$OUT/pipeline.json" ${PIPE:-}

if (( $(left) > 40 )); then
  el "D models (timeout $(tmo 200 0))"
  timeout -k 15 -s INT $(tmo 200 0) python3 -m affinity_jax.benchmarks.models \
      --out "$OUT/models.json" ${MODELS:---backbones lite0,resnet38,tiny --size 448 --batch 16 --iters 5}
fi
el done
