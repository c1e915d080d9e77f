#!/usr/bin/env bash
# Wheels for the GPU machine of ci/gpu_check.sh (Python 3.12, x86-64; it reaches no package
# registry): what its image lacks and the checks need, downloaded here into .whl/ (ignored by
# git), which the device call carries and ci/gpu_check.sh installs into /tmp/site.
#
#   bash ci/gpu_wheels.sh
#
# ase (the EMT data), cuequivariance and cuequivariance-torch (3.4 MB together). Not the
# kernels: cuequivariance-ops-torch-cu13 and cuequivariance-ops-cu13 are 74 MB, over the 64 MB
# a device call carries, so there the cuequivariance rows run its plain-torch fallback (and
# bench/transformer.py labels them so).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$tag")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl \
    ase==3.29.0 cuequivariance==0.13.0 cuequivariance-torch==0.13.0
ls -l .whl
