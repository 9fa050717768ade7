#!/usr/bin/env bash
# GPU verification in one go, for a machine with an NVIDIA GPU, CuPy, PyTorch and no network:
#
#   bench/gpu_check.sh OUTDIR
#
# Steps (each under `timeout`, all output under OUTDIR, a failed step does not stop the rest):
#   env        device, CuPy, PyTorch and driver versions                -> OUTDIR/env.txt
#   install    pip install --no-deps --no-build-isolation -e .           -> OUTDIR/install.txt
#   pytest_gpu pytest -m "gpu and not slow" tests/test_gpu.py: NumPy vs CuPy for every layer
#              type (golden cases + snippets), the CUDA kernels, LeNet 40 iterations
#                                                                         -> OUTDIR/pytest_gpu.txt
#   golden_gpu pytest tests/test_golden_layers.py -k cupy (Caffe's numbers on the GPU)
#                                                                         -> OUTDIR/golden_gpu.txt
#   bench      bench/gpu_bench.py (vs PyTorch)  -> OUTDIR/bench.txt, gpu_bench.json, gpu_bench.txt
#   train_gpu  pytest -m "gpu and slow": tools/train --gpu 0 vs CPU     -> OUTDIR/train_gpu.txt
#   parallel_gpu pytest -m gpu tests/test_parallel.py: 2 ranks on GPUs (NCCL with 2 GPUs, MPI
#              on host copies with 1) vs one GPU process; skips without mpi4py/mpiexec
#                                                                         -> OUTDIR/parallel_gpu.txt
#   layers_gpu pytest -m "gpu and not slow" on every other test file: the CuPy variant of each
#              layer test (600+ tests; gets the time left, -v so a timeout still shows what
#              ran; GPU_CHECK_STEPS=layers_gpu GPU_CHECK_BUDGET=480 runs it alone)
#                                                                         -> OUTDIR/layers_gpu.txt
# then OUTDIR/summary.txt. The whole script stays under GPU_CHECK_BUDGET seconds (default 450:
# 7.5 minutes); each step's limit is cut to what is left. GPU_CHECK_STEPS=bench,train_gpu (say)
# runs only those steps (env and install always run). Without a GPU the GPU steps skip cleanly.
# Exit status: 0 when no step failed, 1 otherwise.
set -u

OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
PY=${PYTHON:-python}
BUDGET=${GPU_CHECK_BUDGET:-450}
START=$(date +%s)
SUMMARY=()
FAILED=0
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME LIMIT_SECONDS COMMAND...: run with a timeout (cut to the time left), log to OUT/NAME.txt
step() {
    local name=$1 limit=$2 rc t0 secs note
    shift 2
    if [ -n "${GPU_CHECK_STEPS:-}" ] && [ "$name" != env ] && [ "$name" != install ] \
            && [[ ",$GPU_CHECK_STEPS," != *",$name,"* ]]; then
        return 0
    fi
    local remaining
    remaining=$(( $(left) - 5 ))
    if [ "$remaining" -lt 15 ]; then
        SUMMARY+=("$(printf '%-11s SKIPPED (time budget spent)' "$name")")
        echo "== $name: skipped, time budget spent"
        return 0
    fi
    [ "$limit" -gt "$remaining" ] && limit=$remaining
    echo "== $name (limit ${limit}s): $*"
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.txt" 2>&1
    rc=$?
    secs=$(( $(date +%s) - t0 ))
    if [ "$name" = env ]; then
        note=$(grep -E '^(GPU [0-9]|no GPU)' "$OUT/$name.txt" | tail -n 1)
    else
        note=$(grep -E '(passed|failed|error|skipped|no tests ran)' "$OUT/$name.txt" | tail -n 1)
    fi
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        note="TIMED OUT after ${limit}s; $note"
    fi
    if [ $rc -eq 5 ]; then  # pytest: nothing collected/selected
        rc=0
    fi
    [ $rc -ne 0 ] && FAILED=1
    SUMMARY+=("$(printf '%-11s rc=%-3s %4ss  %s' "$name" "$rc" "$secs" "$note")")
    tail -n 3 "$OUT/$name.txt"
    return 0
}

env_report() {
    date -u
    echo "repo: $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
    "$PY" --version
    timeout 30 nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    "$PY" - <<'EOF'
import importlib
for name in ("numpy", "cupy", "torch", "google.protobuf"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as err:
        print(f"{name}: not importable ({type(err).__name__}: {err})")
try:
    import torch
    print("torch CUDA:", torch.cuda.is_available(), "cuDNN:", torch.backends.cudnn.version())
except Exception:
    pass
from netengine import backend
from netengine.ops import cuda_kernels as kernels
print(backend.device_summary())
print("cuDNN through CuPy:", kernels.cudnn_version())
EOF
}

step env 60 bash -c "$(declare -f env_report); PY=$PY REPO=$REPO env_report"
step install 120 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e "$REPO"
PYTEST=("$PY" -m pytest -p no:cacheprovider -rfEs)
step pytest_gpu 150 "${PYTEST[@]}" -v -m "gpu and not slow" --durations=15 \
    --junitxml="$OUT/pytest_gpu.xml" tests/test_gpu.py
step golden_gpu 45 "${PYTEST[@]}" -q tests/test_golden_layers.py -k cupy
BENCH_LIMIT=150
step bench "$BENCH_LIMIT" "$PY" bench/gpu_bench.py --out "$OUT" \
    --budget "$(( BENCH_LIMIT - 15 < $(left) - 20 ? BENCH_LIMIT - 15 : $(left) - 20 ))"
step train_gpu 80 "${PYTEST[@]}" -q -m "gpu and slow" tests/test_gpu.py
step parallel_gpu 60 "${PYTEST[@]}" -v -m gpu tests/test_parallel.py
step layers_gpu 480 "${PYTEST[@]}" -v -m "gpu and not slow" --durations=15 tests \
    --ignore=tests/test_gpu.py --ignore=tests/test_golden_layers.py --ignore=tests/test_parallel.py

{
    echo "netengine GPU check: $(date -u), $(( $(date +%s) - START ))s of ${BUDGET}s budget"
    printf '%s\n' "${SUMMARY[@]}"
    [ -f "$OUT/gpu_bench.txt" ] && { echo; cat "$OUT/gpu_bench.txt"; }
} > "$OUT/summary.txt"
echo
cat "$OUT/summary.txt"
exit $FAILED
