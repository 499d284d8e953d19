#!/usr/bin/env bash
# The figures of BENCHMARKS.md "GPU targets", one process per figure, each under its own time limit, so that
# a short lease of a GPU yields every figure that fits. From the repository root:
#
#   bench/gpu_targets.sh OUTDIR
#
# writes OUTDIR/<name>.json (the scripts' records) and OUTDIR/<name>.log, and prints each script's markdown
# rows. A failed or timed-out figure is reported and the next one runs. Environment (defaults: the GPU run):
#   PYTHON (python3), CONFIG (configs/cifar10.py), TRAIN_BATCH (128), SAMPLE_BATCH (2048: one H200 met the
#   DDIM-100 target there, not at 1024), WINDOWS (10), STEPS (50), WARMUP (20), REPEATS (3), ANCESTRAL_T (100:
#   the ancestral chain is timed over T=100 and scaled to the config's T), METHODS (ddim100,ddim50,respaced100:
#   the bfloat16 samplers), FP32_METHODS (ddim100), LIMIT_S (each figure's time limit in seconds, 200).
set -u
out=${1:?usage: bench/gpu_targets.sh OUTDIR}
mkdir -p "$out"
py=${PYTHON:-python3}
config=${CONFIG:-configs/cifar10.py}
train=(--config="$config" --batch_size="${TRAIN_BATCH:-128}" --windows="${WINDOWS:-10}"
       --steps_per_window="${STEPS:-50}" --warmup_steps="${WARMUP:-20}")
sample=(--config="$config" --batch_size="${SAMPLE_BATCH:-2048}" --repeats="${REPEATS:-3}")
failed=0

figure() {  # figure NAME SCRIPT ARGS...
  local name=$1 script=$2
  shift 2
  echo "### $name: $script $*"
  if timeout -k 5 "${LIMIT_S:-200}" "$py" "bench/$script" "$@" --out="$out/$name.json" >"$out/$name.log" 2>&1; then
    grep '^|' "$out/$name.log"
  else
    echo "### $name FAILED (exit $?): the end of $out/$name.log:"
    tail -n 5 "$out/$name.log"
    failed=$((failed + 1))
  fi
}

figure train_bf16 train_throughput.py "${train[@]}" --dtype=bfloat16
figure sample_bf16 sample_throughput.py "${sample[@]}" --dtype=bfloat16 --methods="${METHODS:-ddim100,ddim50,respaced100}"
figure train_fp32 train_throughput.py "${train[@]}" --dtype=float32
figure ancestral_bf16 sample_throughput.py "${sample[@]}" --dtype=bfloat16 --methods=ancestral \
  --ancestral_timesteps="${ANCESTRAL_T:-100}"
figure sample_fp32 sample_throughput.py "${sample[@]}" --dtype=float32 --methods="${FP32_METHODS:-ddim100}"
echo "### $failed of 5 figures failed"
exit $((failed > 0))
