"""Benchmark: how the graph-level SE3Transformer scales with the size of the graph.

Points are uniform in a cube whose size is chosen so that each has about ``--neighbors``
neighbours within ``max_radius = 1`` (fixed density), so the number of edges grows in
proportion to the number of points. Each size runs forward plus backward in a fresh
subprocess, warmed up on a graph of ``WARM_UP_POINTS`` points; its peak memory is that of the
first full-size step (``measure.py``: resident set growth on the CPU,
``torch.cuda.max_memory_allocated`` on CUDA), then the best time of the repeats. The last
columns divide the time by the number of edges: constant when the cost is linear in the edges;
the slope of log(time) against log(edges) is printed at the end (1 = linear).

On the CPU the per-edge temporaries of a million-edge graph are gigabytes each, and glibc's
malloc maps every block above 32 MB freshly from the kernel and unmaps it when freed: the page
faults (system time) then cost more than the arithmetic. The cases therefore run with glibc's
heap kept (``MALLOC_MMAP_MAX_=0``, a large ``MALLOC_TRIM_THRESHOLD_``), which makes the
allocator reuse memory the way PyTorch's CUDA caching allocator does; ``--system-malloc``
runs them with the default instead, to see the difference. (Use the same environment
variables for large graphs on the CPU.)

    python bench/transformer.py                 # 1e3 .. 1e5 points
    python bench/transformer.py --smoke         # 1e3 points only (CI)
    python bench/transformer.py --points 100000 # one size alone
    python bench/transformer.py --device cuda
    python bench/transformer.py --gpu           # the GPU section (below)

The GPU section (``--gpu``) runs only where CUDA is present (elsewhere it says so and exits
0): 1e3 to 1e5 points on CUDA, the depthwise tensor products on e3nn against cuequivariance's
kernels (``--backends``; cuequivariance when installed, see ``se3tutor.tensor_product``), and
``--compile`` adds each backend under ``torch.compile``. ``--backends e3nn,cuequivariance``
also runs on the CPU, where cuequivariance is its pure-torch fallback (a check of the bench,
not a speed to quote). A row says ``cuequivariance`` only where its fused CUDA kernels ran
(:func:`se3tutor.tensor_product.runs_cuequivariance_kernels`), and ``cuequivariance (torch
fallback)`` otherwise: on the CPU, without ``cuequivariance-ops-torch``, or for
multiplicities the kernel does not take.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

from measure import backend_label, memory_kind, peak_then_best_time, uniform_points

# Points of the warm-up graph (imports, kernels, allocator): small, so that the first
# full-size step still shows its peak memory (see measure.py).
WARM_UP_POINTS = 256


def run_case(
    num_points: int,
    neighbors: float,
    device: str,
    repeats: int,
    threads: int,
    backend: str = "e3nn",
    compile: bool = False,
) -> dict:
    import torch

    from se3tutor import SE3Transformer, radius_graph
    from se3tutor.tensor_product import prepare_tensor_products, use_backend
    from se3tutor.transformer import hidden_irreps

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = SE3Transformer(
        "8x0e", hidden_irreps(8, 1, "SE3"), "1x0e + 1x1o", max_radius=1.0, num_layers=2,
        num_heads=2,
    ).to(device)  # fmt: skip
    use_backend(model, backend)
    label = backend_label(model, backend, device)
    forward = torch.compile(prepare_tensor_products(model)) if compile else model

    def graph(n):
        pos = uniform_points(n, neighbors, device)
        return torch.randn(n, 8, device=device), pos, radius_graph(pos, 1.0)

    def step(f, pos, edge_index):
        forward(f, pos, edge_index=edge_index).pow(2).mean().backward()

    step(*graph(WARM_UP_POINTS))
    f, pos, edge_index = graph(num_points)
    seconds, peak_mb = peak_then_best_time(lambda: step(f, pos, edge_index), repeats, device)
    return {
        "points": num_points,
        "edges": edge_index.shape[1],
        "seconds": seconds,
        "peak_mb": peak_mb,
        "backend": label + (" compiled" if compile else ""),
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
    parser.add_argument(
        "--backends", default="e3nn", help="tensor-product backends, comma-separated"
    )
    parser.add_argument("--compile", action="store_true", help="also under torch.compile")
    parser.add_argument("--gpu", action="store_true", help="the GPU section: see above")
    parser.add_argument(
        "--points", type=int, nargs="+", help="graph sizes (default 1e3 .. 1e5; --smoke: 1e3)"
    )
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case is not None:
        result = run_case(
            args.case, args.neighbors, args.device, args.repeats, args.threads,
            args.backends, args.compiled,
        )  # fmt: skip
        print(json.dumps(result))
        return

    backends = args.backends.split(",")
    if args.gpu:
        import torch

        from se3tutor.tensor_product import cuequivariance_available

        if not torch.cuda.is_available():
            print("GPU section: no CUDA device here, skipped")
            return
        args.device = "cuda"
        backends = ["e3nn"] + (["cuequivariance"] if cuequivariance_available() else [])
        if len(backends) == 1:
            print("cuequivariance-torch is not installed: e3nn only")
    variants = [(backend, False) for backend in backends]
    if args.compile:
        variants += [(backend, True) for backend in backends]
    sizes = args.points or ([1000] if args.smoke else [1000, 3000, 10000, 30000, 100000])
    repeats = 1 if args.smoke else args.repeats
    environment = dict(os.environ)
    if not args.system_malloc:
        environment.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(2**36))
    print(
        f"SE3Transformer forward + backward, {args.device}, {args.threads} threads, "
        f"~{args.neighbors:g} neighbours per point, best of {repeats}, "
        f"{'default' if args.system_malloc else 'heap-keeping'} malloc"
    )
    print(f"peak MB: {memory_kind(args.device)}")
    print(
        f"{'points':>8}{'edges':>10}  {'backend':<40}{'seconds':>10}{'peak MB':>10}"
        f"{'us / edge':>11}"
    )
    results = {variant: [] for variant in variants}
    for size in sizes:
        for backend, compiled in variants:
            command = [
                sys.executable, __file__, "--case", str(size), "--neighbors", str(args.neighbors),
                "--device", args.device, "--repeats", str(repeats), "--threads", str(args.threads),
                "--backends", backend,
            ] + (["--compiled"] if compiled else [])  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, env=environment)
            if done.returncode != 0:
                raise SystemExit(f"{size} points, {backend} failed:\n{done.stderr}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results[backend, compiled].append(result)
            print(
                f"{result['points']:>8}{result['edges']:>10}  {result['backend']:<40}"
                f"{result['seconds']:>10.3f}{result['peak_mb']:>10.0f}"
                f"{1e6 * result['seconds'] / result['edges']:>11.2f}",
                flush=True,
            )
    for rows in results.values():
        if len(rows) > 1:
            first, last = rows[0], rows[-1]
            slope = math.log(last["seconds"] / first["seconds"]) / math.log(
                last["edges"] / first["edges"]
            )
            print(f"{rows[0]['backend']}: slope of log(time) against log(edges): {slope:.2f}")


if __name__ == "__main__":
    main()
