"""Benchmark: how the graph-level SE3Transformer scales with the size of the graph.

Points are uniform in a cube whose size is chosen so that each has about ``--neighbors``
neighbours within ``max_radius = 1`` (fixed density), so the number of edges grows in
proportion to the number of points. Each size runs forward plus backward in a fresh
subprocess (peak memory of its own: resident set size growth on the CPU,
``torch.cuda.max_memory_allocated`` on CUDA). The last columns divide the time by the number
of edges: constant when the cost is linear in the edges; the slope of log(time) against
log(edges) is printed at the end (1 = linear).

On the CPU the per-edge temporaries of a million-edge graph are gigabytes each, and glibc's
malloc maps every block above 32 MB freshly from the kernel and unmaps it when freed: the page
faults (system time) then cost more than the arithmetic. The cases therefore run with glibc's
heap kept (``MALLOC_MMAP_MAX_=0``, a large ``MALLOC_TRIM_THRESHOLD_``), which makes the
allocator reuse memory the way PyTorch's CUDA caching allocator does; ``--system-malloc``
runs them with the default instead, to see the difference. (Use the same environment
variables for large graphs on the CPU.)

    python bench/transformer.py                 # 1e3 .. 1e5 points
    python bench/transformer.py --smoke         # 1e3 points only (CI)
    python bench/transformer.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

from measure import best_time_and_peak, uniform_points


def run_case(num_points: int, neighbors: float, device: str, repeats: int, threads: int) -> dict:
    import torch

    from se3tutor import SE3Transformer, radius_graph
    from se3tutor.transformer import hidden_irreps

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = SE3Transformer(
        "8x0e", hidden_irreps(8, 1, "SE3"), "1x0e + 1x1o", max_radius=1.0, num_layers=2,
        num_heads=2,
    ).to(device)  # fmt: skip
    pos = uniform_points(num_points, neighbors, device)
    f = torch.randn(num_points, 8, device=device)
    edge_index = radius_graph(pos, 1.0)

    def step():
        model(f, pos, edge_index=edge_index).pow(2).mean().backward()

    step()  # warm up
    seconds, peak_mb = best_time_and_peak(step, repeats, device)
    return {
        "points": num_points,
        "edges": edge_index.shape[1],
        "seconds": seconds,
        "peak_mb": peak_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="1e3 points, one repeat")
    parser.add_argument("--neighbors", type=float, default=12.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--system-malloc", action="store_true", help="glibc's default malloc settings"
    )
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case is not None:
        result = run_case(args.case, args.neighbors, args.device, args.repeats, args.threads)
        print(json.dumps(result))
        return

    sizes = [1000] if args.smoke else [1000, 3000, 10000, 30000, 100000]
    repeats = 1 if args.smoke else args.repeats
    environment = dict(os.environ)
    if not args.system_malloc:
        environment.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(2**36))
    print(
        f"SE3Transformer forward + backward, {args.device}, {args.threads} threads, "
        f"~{args.neighbors:g} neighbours per point, best of {repeats}, "
        f"{'default' if args.system_malloc else 'heap-keeping'} malloc"
    )
    print(f"{'points':>8}{'edges':>10}{'seconds':>10}{'peak MB':>10}{'us / edge':>11}")
    results = []
    for size in sizes:
        command = [
            sys.executable, __file__, "--case", str(size), "--neighbors", str(args.neighbors),
            "--device", args.device, "--repeats", str(repeats), "--threads", str(args.threads),
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, env=environment)
        if done.returncode != 0:
            raise SystemExit(f"{size} points failed:\n{done.stderr}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(result)
        print(
            f"{result['points']:>8}{result['edges']:>10}{result['seconds']:>10.3f}"
            f"{result['peak_mb']:>10.0f}{1e6 * result['seconds'] / result['edges']:>11.2f}",
            flush=True,
        )
    if len(results) > 1:
        first, last = results[0], results[-1]
        slope = math.log(last["seconds"] / first["seconds"]) / math.log(
            last["edges"] / first["edges"]
        )
        print(f"slope of log(time) against log(edges): {slope:.2f} (1 = linear)")


if __name__ == "__main__":
    main()
