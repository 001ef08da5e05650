#!/usr/bin/env bash
# Every benchmark at the official 8B config on one GPU; logs (and an env.txt) under $OUT.
#
#   Beforehand, where there is network:  pip download --no-deps -d .whl diffusers==0.32.2 transformers==5.24.0
#   On the GPU machine:                   bash benchmarks/gpu_all.sh       (at most 14 minutes: the limits below)
#
# A machine with torch and transformers but no diffusers (and no network) gets the wheels in .whl/, installed
# to /tmp/site with --no-deps. The wheel's transformers (the version the CPU tests pass with) is used if blip3o
# imports with it, else the machine's. Each benchmark has its own time limit, so one that hangs cannot starve
# the others; every line is logged as it is printed (PYTHONUNBUFFERED), so a benchmark cut off still leaves
# its figures.
set -u
OUT=${OUT:-benchmarks_out}
mkdir -p "$OUT"
export USE_FLAX=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PRESET=${PRESET:-blip3o-8b}
PY=${PYTHON:-python3}
PIP="$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade"
SITE=src
if ls .whl/diffusers-*.whl >/dev/null 2>&1; then
  $PIP --target /tmp/site .whl/diffusers-*.whl && SITE=src:/tmp/site
fi
if ls .whl/transformers-*.whl >/dev/null 2>&1; then
  $PIP --target /tmp/site-tf .whl/transformers-*.whl \
    && PYTHONPATH=src:/tmp/site-tf:/tmp/site $PY -c "import blip3o.model" 2>>"$OUT/env.txt" \
    && SITE=src:/tmp/site-tf:/tmp/site
fi
export PYTHONPATH=$SITE:${PYTHONPATH:-}
{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'diffusers', diffusers.__version__)"
} 2>&1 | tee -a "$OUT/env.txt"

bench() {  # name, seconds, script arguments...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
  timeout -k 10 "$limit" $PY "$@" 2>&1 | tee -a "$OUT/$name.log"
  echo "=== $name exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.log"
}
# ONLY picks benchmarks (to rerun some); EXTRA_GENERATION adds options, e.g. "--sections dit --compile"
ONLY=${ONLY:-generation,understanding,train_stage2,train_real}
[[ ,$ONLY, == *,train_stage2,* ]] && bench train_stage2 ${TRAIN_LIMIT:-120} benchmarks/train_stage2.py --preset "$PRESET"
[[ ,$ONLY, == *,generation,* ]] && bench generation ${GENERATION_LIMIT:-300} benchmarks/generation.py \
  --preset "$PRESET" ${EXTRA_GENERATION:-}
[[ ,$ONLY, == *,understanding,* ]] && bench understanding 150 benchmarks/understanding.py --preset "$PRESET"
[[ ,$ONLY, == *,train_real,* ]] && bench train_real ${TRAIN_REAL_LIMIT:-240} benchmarks/train_real.py --preset "$PRESET"
true
