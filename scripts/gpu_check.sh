#!/usr/bin/env bash
# The one command for a GPU machine: install fastdistil into the image's Python without touching its torch and
# Triton, build the C++ extension, print what runs where, run every -m cuda test at full size, run the GPU
# benchmarks, distil 100 steps in bf16 with the fused attention, and report. Everything lands in one folder.
#
#   bash scripts/gpu_check.sh [--out DIR] [--wheels DIR] [--dry-run]
#
# --out DIR     where the results go (default gpu_check_out). At most 8 files, no sub-folders, so that a
#               machine lent for a few minutes can hand all of them back: log.txt (everything printed, with
#               nvidia-smi and python -m fastdistil.env), steps.tsv (each step's status and seconds),
#               cuda-tests.xml, gpu.json and train_step_gpu.json (pytest-benchmark), train-summary.json and
#               REPORT.md (bench/report.py's GPU section; copy the two JSON files into bench/results/ and rerun
#               python -m bench.report --readme README.md to put it in the README).
# --wheels DIR  wheels to install first, with --no-deps and no index, for packages the image lacks (e.g.
#               liger-kernel, to benchmark against it).
# --dry-run     every step's plumbing on a machine without a GPU (CI runs it): pip resolves the install
#               without building, the cuda tests are collected (and skip), the benchmarks run on CPU tensors at
#               tiny sizes with Triton's interpreter, and the training runs 2 steps on the CPU.
#
# No network is needed. A failed step does not stop the later ones (one run should show every problem); the
# exit status is non-zero if any failed. Each step prints its wall time, so that an overrun of the 8-minute
# budget (one H100/H200, install and build included) shows where the time went.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-gpu_check_out}
WHEELS=""
DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --wheels) WHEELS=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,/^set /p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FASTDISTIL_REQUIRE_EXTENSION=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}  # parallel compile of the C++ extension (ninja)
if [ "$DRY_RUN" = 1 ]; then
  export FASTDISTIL_BENCH_TINY=1 TRITON_INTERPRET=1
fi

exec > >(tee "$OUT/log.txt") 2>&1
TEE=$!
# tee finishes writing the log after the script's last line: wait for it, or log.txt may lose its end.
trap 'exec 1>&- 2>&-; wait "$TEE"' EXIT
printf 'step\tstatus\tseconds\n' > "$OUT/steps.tsv"
FAILED=()
START=$SECONDS

# step NAME COMMAND...: runs it, prints and records its status and wall time, and carries on either way.
step() {
  local name=$1
  shift
  echo
  echo "=== [$name] $*"
  local begin=$SECONDS
  "$@"
  local rc=$?
  local took=$((SECONDS - begin))
  if [ $rc -eq 0 ]; then
    echo "=== [$name] ok, ${took} s (${SECONDS} s since start)"
    printf '%s\tok\t%s\n' "$name" "$took" >> "$OUT/steps.tsv"
  else
    echo "=== [$name] FAILED (exit $rc), ${took} s (${SECONDS} s since start)"
    printf '%s\tfailed (exit %s)\t%s\n' "$name" "$rc" "$took" >> "$OUT/steps.tsv"
    FAILED+=("$name")
  fi
  return 0
}

machine() {
  uname -a
  nproc
  "$PYTHON" --version
  "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton',
                triton.__version__, '| GPUs:', torch.cuda.device_count())"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi
  elif [ "$DRY_RUN" = 1 ]; then
    echo "no nvidia-smi (dry run)"
  else
    echo "no nvidia-smi on a GPU run" >&2
    return 1
  fi
}

install() {
  # --no-deps and no index: the image's torch, Triton and transformers stay as they are. --no-build-isolation:
  # the extension compiles against that torch. PIP_BREAK_SYSTEM_PACKAGES: a throwaway machine's system Python.
  local pip=("$PYTHON" -m pip install --no-deps --no-index --no-build-isolation)
  if [ -n "$WHEELS" ]; then
    "${pip[@]}" "$WHEELS"/*.whl || return 1
  fi
  if [ "$DRY_RUN" = 1 ]; then
    PIP_BREAK_SYSTEM_PACKAGES=1 "${pip[@]}" --dry-run -e .
  else
    PIP_BREAK_SYSTEM_PACKAGES=1 "${pip[@]}" -e .
  fi
}

imports() {
  "$PYTHON" -c "import fastdistil, fastdistil._C, fastdistil.kernels.triple_loss, fastdistil.kernels.attention
print('fastdistil', fastdistil.__version__, 'from', fastdistil.__file__, '| CPU kernels:', fastdistil.extension.cpu_isa())"
}

cuda_tests() {
  # Exit status 5 (nothing collected) fails the step: a renamed marker must not pass silently.
  "$PYTHON" -m pytest tests -m cuda -q -rs -p no:cacheprovider --junitxml "$OUT/cuda-tests.xml"
}

benchmarks() {
  "$PYTHON" -m pytest bench/test_bench_gpu.py -q -p no:cacheprovider --durations=0 --benchmark-json "$OUT/gpu.json"
}

train_step_benchmark() {
  # A bert-base-sized step, fastdistil against the original distiller, in the GPU precisions.
  "$PYTHON" -m pytest bench/test_bench_train_step.py -k "bf16 or fp16" -q -p no:cacheprovider --durations=0 \
    --benchmark-json "$OUT/train_step_gpu.json"
}

train() {
  local run steps=100 device=cuda
  run=$(mktemp -d)
  if [ "$DRY_RUN" = 1 ]; then
    steps=2
    device=cpu
  fi
  "$PYTHON" -m fastdistil.train --precision bf16 --attention fastdistil --device "$device" --max-steps "$steps" \
    --log-every 10 --output-dir "$run" --overwrite || return 1
  # The student's weights stay behind: the folder must be small enough to hand back.
  "$PYTHON" -c "import json, sys
run = sys.argv[1]
summary = json.load(open(run + '/summary.json'))
metrics = [json.loads(line) for line in open(run + '/metrics.jsonl')]
json.dump({'summary': summary, 'metrics': metrics, 'config': json.load(open(run + '/config.json'))},
          open(sys.argv[2], 'w'), indent=2)
print(json.dumps(summary, indent=2))" "$run" "$OUT/train-summary.json"
}

report() {
  # --no-plots: the folder must stay within 8 files.
  "$PYTHON" -m bench.report --results-dir "$OUT" --out "$OUT/REPORT.md" --no-plots
}

step machine machine
step install install
step imports imports
step env "$PYTHON" -m fastdistil.env
step cuda-tests cuda_tests
step benchmarks benchmarks
step train-step-benchmark train_step_benchmark
step train train
step report report

echo
echo "=== gpu_check: $((SECONDS - START)) s in all$([ "$DRY_RUN" = 1 ] && echo ' (dry run)')"
column -t -s $'\t' "$OUT/steps.tsv" 2> /dev/null || cat "$OUT/steps.tsv"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "=== gpu_check: FAILED: ${FAILED[*]}"
  exit 1
fi
echo "=== gpu_check: every step passed; results in $OUT"
