#!/usr/bin/env bash
# Packages for the GPU machine of ci/gpu_check.sh (Python 3.12, x86-64, torch 2.11 for CUDA 13;
# it reaches no package registry): what its image lacks and the checks need, downloaded here
# into .whl/ (ignored by git), which the device call carries and ci/gpu_check.sh installs
# into /tmp/site.
#
#   bash ci/gpu_wheels.sh
#
# Wheels: ase (the EMT data), cuequivariance and cuequivariance-torch, and platformdirs (which
# the kernels import; the image lacks it). The kernels themselves, cuequivariance-ops-cu13 and
# cuequivariance-ops-torch-cu13, are 74 MB of wheels, over the 64 MB a device call carries:
# they travel unpacked and recompressed with xz, as .whl/cuequivariance-kernels.tar.xz (27 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
    manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$tag")
done
download() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platforms[@]}" -d "$1" "${@:2}"
}
download .whl ase==3.29.0 cuequivariance==0.13.0 cuequivariance-torch==0.13.0 \
    platformdirs==4.14.9
if [[ ! -f .whl/cuequivariance-kernels.tar.xz ]]; then
    kernels=$(mktemp -d)
    download "$kernels/wheels" cuequivariance-ops-cu13==0.13.0 \
        cuequivariance-ops-torch-cu13==0.13.0
    mkdir "$kernels/site"
    for wheel in "$kernels"/wheels/*.whl; do
        python3 -m zipfile -e "$wheel" "$kernels/site"
    done
    tar -C "$kernels/site" -cf - . | xz -9 -T0 >.whl/cuequivariance-kernels.tar.xz
    rm -rf "$kernels"
fi
ls -l .whl
