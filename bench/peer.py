"""se3tutor against se3-transformer-pytorch 0.9.0 on the same work: forward plus backward.

    python bench/peer.py                 # the issue's configuration, 2 threads
    python bench/peer.py --smoke         # tiny sizes, one repeat (CI)

Both libraries get the same call, ``SE3Transformer(dim=32, heads=4, dim_head=16, depth=2,
num_degrees=2, valid_radius=10, num_neighbors=16)`` (se3tutor's through its drop-in front end
``se3tutor.dense``), on a batch of 2 x 64 random points. Each library runs in its own
subprocess, warmed up on a batch of 4-node graphs; the peer runs in its own virtual
environment (``.venv-peer``, made on first use from the package registry, with the same torch
as ours). Printed: median time of forward plus backward, the ratio, the peak memory of the
first full-size step (resident-set growth, ``measure.py``), the parameters, and each model's
invariance error of its type-0 output under a random rotation and translation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from measure import memory_kind

ROOT = Path(__file__).resolve().parent.parent
PEER_VENV = ROOT / ".venv-peer"
PEER_PACKAGE = "se3-transformer-pytorch==0.9.0"

CONFIG = dict(
    batch=2, nodes=64, dim=32, heads=4, dim_head=16, depth=2, num_degrees=2, radius=10.0,
    neighbors=16,
)  # fmt: skip
SMOKE = dict(CONFIG, nodes=8, dim=8, dim_head=4, heads=2, depth=1, neighbors=4)
WARM_UP_NODES = 4  # per graph, before the first full-size step


def peer_python(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        import torch  # the peer gets the same torch as ours

        print(f"making {venv} with {PEER_PACKAGE} (once)", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        torch_pin = f"torch=={torch.__version__.split('+')[0]}"
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", torch_pin, PEER_PACKAGE], check=True
        )
    return python


def build_se3tutor(config):
    import torch

    from se3tutor.dense import SE3Transformer

    return _build(SE3Transformer, torch, config)


def build_peer(config):
    import torch
    from se3_transformer_pytorch import SE3Transformer

    return _build(SE3Transformer, torch, config)


def _build(model_class, torch, config):
    """The same constructor call and forward call for both libraries."""
    model = model_class(
        dim=config["dim"],
        heads=config["heads"],
        dim_head=config["dim_head"],
        depth=config["depth"],
        num_degrees=config["num_degrees"],
        valid_radius=config["radius"],
        num_neighbors=config["neighbors"],
    )

    def run(feats, coors):
        mask = torch.ones(feats.shape[:2], dtype=torch.bool)
        return model(feats, coors, mask, return_type=0)

    return model, run


def worker(library: str, config: dict, repeats: int, threads: int) -> dict:
    import torch
    from measure import peak_memory_mb

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, run = (build_se3tutor if library == "se3tutor" else build_peer)(config)

    def inputs(nodes):
        return torch.randn(config["batch"], nodes, config["dim"]), torch.randn(
            config["batch"], nodes, 3
        )

    # imports, kernels, allocator: on small graphs, so that the full-size peak shows below
    run(*inputs(WARM_UP_NODES)).sum().backward()
    model.zero_grad(set_to_none=True)
    feats, coors = inputs(config["nodes"])

    def full_step():
        run(feats, coors).sum().backward()
        model.zero_grad(set_to_none=True)

    peak_mb = peak_memory_mb(full_step, "cpu")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        full_step()
        times.append(time.perf_counter() - start)

    rotation = _random_rotation(torch)
    with torch.no_grad():
        shift = torch.randn(3)
        invariance = (run(feats, coors @ rotation.T + shift) - run(feats, coors)).abs().max()
    return dict(
        library=library,
        median_s=statistics.median(times),
        times_s=times,
        peak_mb=peak_mb,
        parameters=sum(p.numel() for p in model.parameters()),
        invariance_error=float(invariance),
        torch=torch.__version__,
    )


def _random_rotation(torch):
    q, r = torch.linalg.qr(torch.randn(3, 3))
    q = q * torch.sign(torch.diagonal(r))
    return q * torch.sign(torch.det(q))  # det +1


def run_worker(python: Path, library: str, config: dict, repeats: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    command = [
        str(python), __file__, "--worker", library, "--config", json.dumps(config),
        "--repeats", str(repeats), "--threads", str(threads),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{library} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--peer-venv", type=Path, default=PEER_VENV, help="virtual environment of the peer"
    )
    parser.add_argument("--worker", choices=["se3tutor", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.config), args.repeats, args.threads)))
        return

    config, repeats = (SMOKE, 1) if args.smoke else (CONFIG, args.repeats)
    print(f"configuration: {config}, {args.threads} threads, median of {repeats}", flush=True)
    ours = run_worker(Path(sys.executable), "se3tutor", config, repeats, args.threads)
    peer = run_worker(peer_python(args.peer_venv), "peer", config, repeats, args.threads)
    print(f"{'library':<32}{'fwd+bwd (s)':>12}{'peak MB':>10}{'params':>11}{'inv. error':>12}")
    for result, name in ((ours, "se3tutor"), (peer, PEER_PACKAGE)):
        print(
            f"{name:<32}{result['median_s']:>12.4f}{result['peak_mb']:>10.0f}"
            f"{result['parameters']:>11,}{result['invariance_error']:>12.1e}"
        )
    print(f"peak MB: {memory_kind('cpu')}")
    memory = f"{ours['peak_mb'] / peer['peak_mb']:.2f}x" if peer["peak_mb"] > 0 else "(too small)"
    print(
        f"se3tutor is {peer['median_s'] / ours['median_s']:.1f}x faster, uses {memory} the "
        f"peak memory, and has {ours['parameters'] / peer['parameters']:.3f}x the parameters"
    )


if __name__ == "__main__":
    main()
