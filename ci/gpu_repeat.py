"""Do training runs repeat bit for bit? Two ``--deterministic`` runs must end with equal
parameters; two default runs are compared too (on a GPU they may differ in the last bits:
atomic additions sum in a varying order; on a CPU they are equal).

    python ci/gpu_repeat.py [--device cuda] [--num-structures 64]

Exit status 1 when the deterministic runs differ. Run by ``ci/gpu_check.sh``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def final_parameters(out: Path) -> dict:
    return torch.load(out / "model.pt", weights_only=True)["state_dict"]


def runs_repeat(train: list, work: Path, name: str, options: list) -> bool:
    """Train twice with ``options``; whether the two models are equal bit for bit."""
    models = []
    for attempt in (1, 2):
        out = work / f"{name}{attempt}"
        subprocess.run([*train, *options, "--out", str(out)], check=True)
        models.append(final_parameters(out))
    first, second = models
    return all(torch.equal(first[key], second[key]) for key in first)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--num-structures", default="64")
    args = parser.parse_args()
    train = [sys.executable, "-m", "se3tutor.train", "--data", "emt", "--epochs", "1",
             "--num-structures", args.num_structures, "--device", args.device,
             "--no-progress"]  # fmt: skip
    with tempfile.TemporaryDirectory() as work:
        deterministic = runs_repeat(train, Path(work), "deterministic", ["--deterministic"])
        default = runs_repeat(train, Path(work), "default", [])
    print(f"two --deterministic runs on {args.device} equal bit for bit: {deterministic}")
    print(f"two default runs on {args.device} equal bit for bit: {default} (not required)")
    return 0 if deterministic else 1


if __name__ == "__main__":
    sys.exit(main())
