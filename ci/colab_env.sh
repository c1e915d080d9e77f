#!/usr/bin/env bash
# The chapters in a Colab-like environment (`make colab-check`).
#
# A reader on Colab gets whatever torch Colab has, the newest e3nn, and se3tutor from the
# first cell's `%pip install` with its hard dependencies only (no torch-scatter/torch-cluster).
# This script makes such an environment, apart from the book's own (.venv, torch pinned):
#   - a fresh virtual environment, $COLAB_VENV (default .venv-colab), made anew each run;
#   - torch $COLAB_TORCH (default 2.14.1, not requirements.txt's 2.13.0), which pip takes from
#     the files that machines of this kind keep on disk: PyPI's Linux build, whose CUDA
#     libraries come as dependencies (as on Colab; it runs on the CPU when there is no GPU);
#   - the newest e3nn from PyPI;
#   - se3tutor from the working tree, without optional extras;
#   - what executing notebooks needs: ipykernel, matplotlib, pytest and nbval.
# It first checks pyproject.toml's dependencies and each chapter's first code cell
# (ci/colab_install.py). In the environment it prints the versions, the device and the graph
# backend, then executes every chapter notebook of _toc.yml top to bottom (`pytest
# --nbval-lax`: a cell that raises fails; outputs are not compared) from a copy in a temporary
# folder, so that the committed notebooks keep their outputs and `import se3tutor` finds the
# installed package, not the source tree.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
VENV=${COLAB_VENV:-.venv-colab}
TORCH=${COLAB_TORCH:-2.14.1}
start=$SECONDS

WORK=$(mktemp -d "${TMPDIR:-/tmp}/se3tutor-colab.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# The chapter notebooks, in the order of _toc.yml (its root and every `file:` entry).
notebooks=()
while read -r doc; do
    if [[ -f "$doc.ipynb" ]]; then notebooks+=("$doc.ipynb"); fi
done < <(sed -n -E 's/^[[:space:]-]*(root|file):[[:space:]]*([^[:space:]#]+).*/\2/p' _toc.yml)
if ((${#notebooks[@]} == 0)); then
    echo "colab-check: no chapter notebook found in _toc.yml" >&2
    exit 1
fi

echo "== what a Colab reader installs: pyproject.toml's dependencies, each chapter's first cell"
"$PYTHON" ci/colab_install.py "${notebooks[@]}"

echo "== a fresh environment in $VENV: torch==$TORCH, the newest e3nn, se3tutor without extras"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
# pip, quiet: its output only when it fails (but for the machine's notes on local indexes).
pip_install() {
    local log="$WORK/pip.log"
    if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" >"$log" 2>&1
    then
        cat "$log" >&2
        return 1
    fi
    grep -v "^WARNING: Location 'file:" "$log" || true
}
pip_install --upgrade pip
pip_install "torch==$TORCH"
pip_install --upgrade e3nn
# se3tutor from a copy of the working tree's package (pip would build in the tree itself).
mkdir "$WORK/src"
cp -R pyproject.toml README.md se3tutor "$WORK/src/"
rm -rf "$WORK/src/se3tutor/__pycache__"
pip_install "$WORK/src"
pip_install ipykernel matplotlib pytest nbval
echo "installed in $((SECONDS - start)) s; $(du -sh "$VENV" | cut -f1) on disk"

# Versions, the device the chapters pick, and the graph backend; the environment is what it
# should be: the torch asked for, no compiled extras, so the pure-torch backend.
(cd "$WORK" && "$ROOT/$VENV/bin/python" - "$TORCH" <<'EOF'
import importlib.util
import sys

import e3nn
import torch

import se3tutor
from se3tutor.graph import available_backends

backends = available_backends()
device = "cuda" if torch.cuda.is_available() else "cpu"
print(f"torch {torch.__version__} (CUDA build {torch.version.cuda}), e3nn {e3nn.__version__}, "
      f"se3tutor {se3tutor.__version__} from {se3tutor.__file__}")
print(f"device the chapters pick: {device}; graph backend: {backends}")
assert torch.__version__.split("+")[0] == sys.argv[1], f"torch {torch.__version__}, not {sys.argv[1]}"
extras = [m for m in ("torch_scatter", "torch_cluster") if importlib.util.find_spec(m)]
assert not extras, f"optional extras installed: {extras}"
assert backends == {"radius_graph": "torch", "scatter": "torch"}, backends
assert "site-packages" in se3tutor.__file__, "se3tutor should come from the installed package"
EOF
)

echo "== the chapters, executed top to bottom"
# With their paths: book/attention.ipynb and book/exercises/attention.ipynb are two notebooks.
cp --parents "${notebooks[@]}" "$WORK/"
(cd "$WORK" && "$ROOT/$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    --rootdir "$WORK" --nbval-lax --nbval-current-env --durations=5 "${notebooks[@]}")
echo "colab-check: ${#notebooks[@]} chapters ran in the Colab-like environment ($((SECONDS - start)) s)"
