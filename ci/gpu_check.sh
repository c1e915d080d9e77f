#!/usr/bin/env bash
# The device check: what only a GPU can show, in one run of under 8 minutes on one GPU.
#
#   bash ci/gpu_check.sh              # on a machine with CUDA; logs to $OUT (default /tmp/gpu_check)
#
# Steps (each with its own time limit; a failing step is reported and the others still run):
#   tests        the unit tests, with their CUDA cases (pytest -m "not slow", 8 workers)
#   chapters     The SE(3)-Transformer and Learning dynamics on CUDA (ci/run_notebook.py: every
#                cell in order, the chapters' assertions included)
#   radius       bench/radius_graph.py --device cuda (1e3 to 1e6 points: the cell list's memory)
#   bench        bench/transformer.py --gpu (e3nn against cuequivariance's kernels, 1e3 to 1e5
#                points, time and max_memory_allocated)
#   amp          a force-training epoch under bfloat16 autocast
#   compile      a training epoch with the model compiled for validation
#   deterministic  two --deterministic runs: their parameters must be equal bit for bit
#                (ci/gpu_repeat.py; two default runs are compared too, for the record)
#   nccl         two processes, one GPU each, when there are two GPUs
#
# Packages the GPU machine lacks (ase; cuequivariance-torch and its kernels, optional) come as
# wheels in .whl/ (ci/gpu_wheels.sh downloads them): installed into /tmp/site first.
# The exit status is the number of failed steps (0: all passed); without CUDA it is 2 and
# nothing runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

if [[ -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 3
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

failed=0
# step NAME SECONDS COMMAND...: run with a time limit, its output in the log, one summary line
step() {
    local name=$1 limit=$2 start status
    shift 2
    start=$(date +%s)
    echo "===== $name: $*" >>"$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    status=$?
    if ((status == 0)); then
        echo "ok    $name ($(($(date +%s) - start)) s)" | tee -a "$LOG"
    else
        echo "FAIL  $name (exit $status after $(($(date +%s) - start)) s; see $LOG)" | tee -a "$LOG"
        failed=$((failed + 1))
    fi
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" - <<'EOF'
import importlib.util, torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name())
for name in ("e3nn", "ase", "torch_cluster", "torch_scatter", "cuequivariance_torch",
             "cuequivariance_ops_torch"):
    print(f"{name}: {'yes' if importlib.util.find_spec(name) else 'no'}")
EOF
} 2>&1 | tee -a "$LOG"

step tests 240 "$PY" -m pytest -q -n 8 -m "not slow" -p no:cacheprovider tests
step chapters 240 "$PY" ci/run_notebook.py book/transformer.ipynb book/dynamics.ipynb
step radius 120 "$PY" bench/radius_graph.py --device cuda
step bench 240 "$PY" bench/transformer.py --gpu

TRAIN=("$PY" -m se3tutor.train --data emt --num-structures 64 --epochs 1 --device cuda
    --no-progress)
step amp 120 "${TRAIN[@]}" --amp --out "$WORK/amp"
step compile 180 "${TRAIN[@]}" --compile --out "$WORK/compile"
step deterministic 180 "$PY" ci/gpu_repeat.py --device cuda
if (($("$PY" -c "import torch; print(torch.cuda.device_count())") >= 2)); then
    step nccl 180 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 \
        -m se3tutor.train --data emt --num-structures 64 --epochs 1 --no-progress \
        --out "$WORK/nccl"
else
    echo "skip  nccl (one GPU)" | tee -a "$LOG"
fi

echo "gpu_check: $failed step(s) failed; log: $LOG" | tee -a "$LOG"
exit "$failed"
