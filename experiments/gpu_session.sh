#!/usr/bin/env bash
# Every measurement that needs an accelerator, in one command, for a session
# that is lent a GPU (the device tool; see README "Benchmarks"). Run from the
# repository root on the GPU machine; JSON and logs go to $OUT (default
# ./gpu_out). It uses the machine's own Python (its image holds jax with
# CUDA, flax, optax, orbax, transformers; nothing is installed) and the
# repository on PYTHONPATH. Each step is independent: one failing does not
# stop the others, and its log says why. The device tool allows 10 minutes
# per command, so run the steps in two or three calls with STEPS:
#
#   STEPS="kernel_tests bench_kernel" bash experiments/gpu_session.sh
#   STEPS="bench_step" bash experiments/gpu_session.sh
#   STEPS="bench_train" bash experiments/gpu_session.sh
#
# Steps (issue numbers of the project's tracker):
#   1. compiled Pallas kernel == jnp reference (tests/test_kernels.py, the
#      cases that skip on CPU)                                       issue 5
#   2. kernel vs reference per decode step, batch 1 and 32, and its share
#      of a pythia-1.4b-shaped T3 step (experiments/bench_kernel.py)  issue 5
#   3. AR pass vs the HBM bound and T3 pass / AR pass, pythia-1.4b and
#      pythia-6.9b shapes, bf16, batch 1 and 8 (experiments/bench_step.py)
#                                                                     issue 4
#   4. train-step MFU, DynaMo-430M-T3 (experiments/bench_train.py)    issue 3
set -u
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

STEPS="${STEPS:-kernel_tests bench_kernel bench_step bench_train}"
wanted() { [[ " $STEPS " == *" $1 "* ]]; }
step() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  wanted "$name" || return 0
  echo "== $name"
  timeout "$limit" "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
  echo "   exit $? ($(wc -c < "$OUT/$name.json") bytes of stdout)"
}
if wanted kernel_tests; then
  echo "== kernel_tests"
  timeout 500 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py \
    > "$OUT/kernel_tests.log" 2>&1
  echo "   exit $?"; tail -3 "$OUT/kernel_tests.log"
fi
step bench_kernel 500 "$PY" experiments/bench_kernel.py
step bench_step 560 "$PY" experiments/bench_step.py
step bench_train 560 "$PY" experiments/bench_train.py --preset dynamo-430m-t3 --batch 8
