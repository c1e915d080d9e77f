"""Benchmark: radius_graph, pure-torch cell list against torch-cluster.

Points are uniform in a cube whose size is chosen so that each point has about
``--neighbors`` neighbours within max_radius = 1 (the density of a typical molecular graph).
Each case runs in a fresh subprocess, warmed up on 256 points, so that its peak memory is
that of the first full-size call (``measure.py``: resident set growth on the CPU,
``torch.cuda.max_memory_allocated`` on CUDA).

    python bench/radius_graph.py            # 1e3 .. 1e6 points, both backends
    python bench/radius_graph.py --smoke    # 1e3 and 1e4 points only (CI)
    python bench/radius_graph.py --device cuda
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys

from measure import memory_kind, peak_then_best_time, uniform_points


def run_case(num_points: int, backend: str, neighbors: float, device: str, repeats: int) -> dict:
    import torch

    from se3tutor import radius_graph

    torch.manual_seed(0)
    pos = uniform_points(num_points, neighbors, device)
    radius_graph(pos[:256], 1.0, backend=backend)  # warm up small (imports, kernels)
    seconds, peak_mb = peak_then_best_time(
        lambda: radius_graph(pos, 1.0, backend=backend), repeats, device
    )
    edge_index = radius_graph(pos, 1.0, backend=backend)
    return {
        "points": num_points,
        "backend": backend,
        "seconds": seconds,
        "peak_mb": peak_mb,
        "edges": edge_index.shape[1],
        "degree": edge_index.shape[1] / num_points,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small sizes only (for CI)")
    parser.add_argument("--neighbors", type=float, default=20.0, help="mean neighbours per point")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--case", nargs=2, metavar=("POINTS", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:
        points, backend = int(args.case[0]), args.case[1]
        repeats = 3 if points <= 100_000 else 1
        print(json.dumps(run_case(points, backend, args.neighbors, args.device, repeats)))
        return

    sizes = [1_000, 10_000] if args.smoke else [1_000, 10_000, 100_000, 1_000_000]
    backends = ["torch"]
    if importlib.util.find_spec("torch_cluster"):
        backends.append("pyg")
    else:
        print("torch-cluster is not installed: timing the pure-torch backend only")
    neighbors = f"about {args.neighbors:g} neighbours per point"
    print(f"radius_graph on {args.device}, {neighbors}, max_radius=1")
    print(f"peak MB: {memory_kind(args.device)}")
    header = (
        f"{'points':>10} {'backend':>8} {'seconds':>9} {'peak MB':>9} {'edges':>11} {'degree':>7}"
    )
    print(header)
    print("-" * len(header))
    results = {}
    for points in sizes:
        for backend in backends:
            command = [
                sys.executable,
                __file__,
                "--case",
                str(points),
                backend,
                "--neighbors",
                str(args.neighbors),
                "--device",
                args.device,
            ]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            results[points, backend] = row
            print(
                f"{row['points']:>10,} {row['backend']:>8} {row['seconds']:>9.3f} "
                f"{row['peak_mb']:>9.0f} {row['edges']:>11,} {row['degree']:>7.1f}",
                flush=True,
            )
    if "pyg" in backends:
        print("\nratio torch / torch-cluster:")
        for points in sizes:
            ratio = results[points, "torch"]["seconds"] / results[points, "pyg"]["seconds"]
            print(f"{points:>10,}  {ratio:.2f}x")


if __name__ == "__main__":
    main()
