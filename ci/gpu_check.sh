#!/usr/bin/env bash
# The device check: what only a GPU can show, in one run of under 8 minutes on one GPU.
#
#   bash ci/gpu_check.sh              # on a machine with CUDA; logs to $OUT (default /tmp/gpu_check)
#   bash ci/gpu_check.sh tests bench  # only the steps named (a rerun of those that failed)
#
# Two phases. First the checks of correctness, side by side (each its own process and log;
# the GPU and 16 cores have room for all of them at once):
#   tests          the unit tests, with their CUDA cases (pytest -m "not slow", 6 workers)
#   chapters       The SE(3)-Transformer and Learning dynamics on CUDA (ci/run_notebook.py:
#                  every cell in order, the chapters' assertions included)
#   amp            a force-training epoch under bfloat16 autocast
#   compile        a training epoch with the model compiled for validation
#   deterministic  two --deterministic runs: their parameters must be equal bit for bit
#                  (ci/gpu_repeat.py; two default runs are compared too, for the record)
#   nccl           two processes, one GPU each, when there are two GPUs
# Then the timings, one at a time with the GPU to themselves:
#   radius         bench/radius_graph.py --device cuda (1e3 to 1e6 points: the cell list's memory)
#   bench          bench/transformer.py --gpu (e3nn against cuequivariance, 1e3 to 1e5 points,
#                  time and max_memory_allocated)
# Two more, run only when named (minutes each):
#   slow-tests     the tests marked slow (processes, torchrun, compile, training)
#   headline       bench/headline.py --device cuda: se3-transformer-pytorch's README model
#
# Packages the GPU machine lacks come from .whl/ (ci/gpu_wheels.sh fills it): wheels (ase,
# cuequivariance, cuequivariance-torch, platformdirs) installed into /tmp/site, and
# cuequivariance's CUDA kernels as one xz archive (74 MB of wheels would not travel; 27 MB
# of archive does) unpacked there.
# Each step has a time limit; a failing step is reported and the others still run. The exit
# status is the number of failed steps (0: all passed); without CUDA it is 2 and nothing runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
PY=${PYTHON:-python3}
DEFAULT_STEPS=" tests chapters amp compile deterministic nccl radius bench "
ALL_STEPS="$DEFAULT_STEPS""slow-tests headline "
STEPS=" ${*:-$DEFAULT_STEPS} "
for name in $STEPS; do
    if [[ "$ALL_STEPS" != *" $name "* ]]; then
        echo "gpu_check: no step named $name (steps:${ALL_STEPS% })" >&2
        exit 2
    fi
done

WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

if [[ -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 3
    if [[ -f .whl/cuequivariance-kernels.tar.xz ]]; then
        "$PY" -c "import tarfile; tarfile.open('.whl/cuequivariance-kernels.tar.xz').extractall(
            '/tmp/site', filter='data')" || exit 3
    fi
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "gpu_check: $PY cannot import torch (set PYTHON to one that can)" | tee -a "$LOG"
    exit 2
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device here: nothing to check" | tee -a "$LOG"
    exit 2
fi

# step NAME SECONDS COMMAND...: when NAME is one of the steps asked for, run with a time limit,
# its output in $OUT/NAME.log, one summary line in the main log; the status is the command's
# (124: out of time)
step() {
    local name=$1 limit=$2 start status
    shift 2
    [[ "$STEPS" == *" $name "* ]] || return 0
    start=$(date +%s)
    echo "$*" >"$OUT/$name.log"
    timeout "$limit" "$@" >>"$OUT/$name.log" 2>&1
    status=$?
    if ((status == 0)); then
        echo "ok    $name ($(($(date +%s) - start)) s)" | tee -a "$LOG"
    else
        echo "FAIL  $name (exit $status after $(($(date +%s) - start)) s; see $name.log)" |
            tee -a "$LOG"
    fi
    return "$status"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    nproc
    "$PY" - <<'PYTHON'
import importlib, torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name())
for name in ("e3nn", "ase", "torch_cluster", "torch_scatter", "cuequivariance_torch",
             "cuequivariance_ops_torch"):
    try:
        module = importlib.import_module(name)
        print(f"{name}: {getattr(module, '__version__', 'yes')}")
    except Exception as error:  # not installed, or installed and failing to load
        print(f"{name}: {error!r}")
from se3tutor.tensor_product import cuequivariance_available
print("se3tutor sees cuequivariance:", cuequivariance_available())
PYTHON
} 2>&1 | tee -a "$LOG"

# Phase 1, side by side; two threads each so that they share the cores rather than fight.
export OMP_NUM_THREADS=2
TRAIN=("$PY" -m se3tutor.train --data emt --num-structures 64 --epochs 1 --device cuda
    --no-progress)
pids=()
step tests 240 "$PY" -m pytest -q -n 6 -m "not slow" -p no:cacheprovider tests &
pids+=($!)
step chapters 240 "$PY" ci/run_notebook.py book/transformer.ipynb book/dynamics.ipynb &
pids+=($!)
step amp 180 "${TRAIN[@]}" --amp --out "$WORK/amp" &
pids+=($!)
step compile 240 "${TRAIN[@]}" --compile --out "$WORK/compile" &
pids+=($!)
step deterministic 240 "$PY" ci/gpu_repeat.py --device cuda &
pids+=($!)
if (($("$PY" -c "import torch; print(torch.cuda.device_count())") < 2)); then
    [[ "$STEPS" == *" nccl "* ]] && echo "skip  nccl (one GPU)" | tee -a "$LOG"
else
    step nccl 180 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 \
        -m se3tutor.train --data emt --num-structures 64 --epochs 1 --no-progress \
        --out "$WORK/nccl" &
    pids+=($!)
fi
failed=0
for pid in "${pids[@]}"; do
    wait "$pid" || failed=$((failed + 1))
done

# Phase 2, one at a time: timings.
unset OMP_NUM_THREADS
step radius 60 "$PY" bench/radius_graph.py --device cuda || failed=$((failed + 1))
step bench 200 "$PY" bench/transformer.py --gpu || failed=$((failed + 1))
step slow-tests 200 "$PY" -m pytest -q -n 8 -m slow -p no:cacheprovider tests ||
    failed=$((failed + 1))
step headline 240 "$PY" bench/headline.py --device cuda || failed=$((failed + 1))

echo "gpu_check: $failed step(s) failed; logs in $OUT" | tee -a "$LOG"
exit "$failed"
