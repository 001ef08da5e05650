#!/usr/bin/env bash
# The one prepared device script: every benchmark at the official 8B config on one GPU, logs under $OUT.
#
#   Here (once):  pip download --no-deps ... -d .whl diffusers==0.32.2 transformers==5.24.0  (see docs/benchmarks.md)
#   Device tool:  command "bash benchmarks/gpu_all.sh", carry [".whl"], timeout_s 600
#
# The device image has torch and transformers but no diffusers: the carried wheels go to /tmp/site with
# --no-deps. The carried transformers (the version the CPU tests pass with) is used if blip3o imports with
# it, else the image's. Each benchmark has its own time limit, so one that hangs cannot starve the others;
# every line is logged as it is printed (PYTHONUNBUFFERED), so a benchmark cut off still leaves its figures.
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
# ONLY picks benchmarks (a rerun within a lease); EXTRA_GENERATION adds options, e.g. "--sections dit --compile"
ONLY=${ONLY:-generation,understanding,train_stage2}
[[ ,$ONLY, == *,train_stage2,* ]] && bench train_stage2 ${TRAIN_LIMIT:-120} benchmarks/train_stage2.py --preset "$PRESET"
[[ ,$ONLY, == *,generation,* ]] && bench generation ${GENERATION_LIMIT:-300} benchmarks/generation.py \
  --preset "$PRESET" ${EXTRA_GENERATION:-}
[[ ,$ONLY, == *,understanding,* ]] && bench understanding 150 benchmarks/understanding.py --preset "$PRESET"
true
