"""The headline model of se3-transformer-pytorch's README, through se3tutor's drop-in: forward.

    python bench/headline.py                        # 256 points, then 1024 (all pairs)
    python bench/headline.py --points 256           # one size
    python bench/headline.py --smoke                # 8 points, one layer (CI)
    python bench/headline.py --device cuda          # on a GPU: the torch and cuequivariance paths

The model and the call are the README's, with only the import changed::

    model = SE3Transformer(dim=512, heads=8, depth=6, dim_head=64, num_degrees=4,
                           valid_radius=10)
    feats = torch.randn(1, 1024, 512)
    coors = torch.randn(1, 1024, 3)
    mask = torch.ones(1, 1024).bool()
    out = model(feats, coors, mask)  # (1, 1024, 512)

Within ``valid_radius = 10`` of Gaussian points every pair is an edge: 1,047,552 edges at 1024
points, each with a message 79,872 numbers wide. The attention is folded
(:class:`se3tutor.multihead.MultiHeadAttention`): no edge has keys or values, and the
receiving nodes go in groups sized by an estimate of their edges' temporaries
(``--chunk-mb``; a group holds at least one node, about 1.3 GB of temporaries at 1024
points), so the memory does not grow with the number of nodes attended at once. Each size
runs in a fresh process (warmed up on 4 points) under ``torch.no_grad()``; printed: the time
of one forward pass, its peak memory (``measure.py``: resident-set growth on the CPU,
``max_memory_allocated`` on CUDA), and the time per edge and layer. A line per layer shows
the progress (one forward at 1024 points takes over half an hour on a 2-core CPU).

On CUDA the tensor products run once in plain torch (``e3nn`` backend: batched matrix
products) and once on cuequivariance's kernels when ``cuequivariance-torch`` is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from measure import backend_label, memory_kind, peak_memory_mb

CONFIG = dict(dim=512, heads=8, depth=6, dim_head=64, num_degrees=4, valid_radius=10)
SMOKE = dict(CONFIG, depth=1)
WARM_UP_POINTS = 4


def run_case(points, config, device, backend, threads, chunk_mb) -> dict:
    import torch

    from se3tutor.dense import SE3Transformer
    from se3tutor.tensor_product import use_backend

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    model = SE3Transformer(**config).to(device).eval()
    use_backend(model, backend)
    for block in model.net.blocks:
        block.attention.chunk_mb = chunk_mb
    built_s = time.perf_counter() - start
    _report_progress(model.net.blocks, points)

    def inputs(n):
        feats = torch.randn(1, n, config["dim"], device=device)
        coors = torch.randn(1, n, 3, device=device)
        return feats, coors, torch.ones(1, n, dtype=torch.bool, device=device)

    with torch.no_grad():
        model(*inputs(WARM_UP_POINTS))
        feats, coors, mask = inputs(points)
        output = {}

        def forward():
            start = time.perf_counter()
            output["out"] = model(feats, coors, mask)
            if device == "cuda":
                torch.cuda.synchronize()
            output["seconds"] = time.perf_counter() - start

        peak_mb = peak_memory_mb(forward, device)
    distances = torch.cdist(coors[0], coors[0])
    edges = int((distances < config["valid_radius"]).sum()) - points  # no self-loops
    assert output["out"].shape == (1, points, config["dim"]) and output["out"].isfinite().all()
    return dict(
        points=points, edges=edges, seconds=output["seconds"], peak_mb=peak_mb,
        build_s=built_s, depth=config["depth"],
        # e3nn's products in the folded attention are batched matrix products: "torch"
        backend="torch" if backend == "e3nn" else backend_label(model, backend, device),
        parameters=sum(p.numel() for p in model.parameters()),
    )  # fmt: skip


def _report_progress(blocks, points) -> None:
    """A line on stderr as each layer of the full-size pass ends, with an estimate of the
    rest (the warm-up's layers are not reported)."""
    started = {}

    def begin(block, args):
        if args[0].shape[0] == points:
            started["at"] = time.perf_counter()

    def done(block, args, out):
        if args[0].shape[0] != points:
            return
        layer = next(i for i, b in enumerate(blocks) if b is block) + 1
        elapsed = time.perf_counter() - started["at"]
        remaining = elapsed / layer * (len(blocks) - layer)
        print(
            f"  layer {layer}/{len(blocks)}: {elapsed:.0f} s, about {remaining:.0f} s to go",
            file=sys.stderr,
            flush=True,
        )

    blocks[0].register_forward_pre_hook(begin)
    for block in blocks:
        block.register_forward_hook(done)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="8 points, one layer")
    parser.add_argument("--points", type=int, nargs="+", help="sizes (default 256 1024)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--chunk-mb", type=float, default=1024.0, help="budget of the edge temporaries"
    )
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="e3nn", help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = SMOKE if args.smoke else CONFIG

    if args.case is not None:
        result = run_case(args.case, config, args.device, args.backend, args.threads, args.chunk_mb)
        print(json.dumps(result))
        return

    backends = ["e3nn"]
    if args.device == "cuda":
        from se3tutor.tensor_product import cuequivariance_available

        if cuequivariance_available(kernels=True):
            backends.append("cuequivariance")
        else:
            print("cuequivariance-torch (with its CUDA kernels) is not installed: torch only")
    sizes = args.points or ([8] if args.smoke else [256, 1024])
    environment = dict(os.environ, MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(2**36))
    print(
        f"se3-transformer-pytorch's README model through se3tutor.dense: {config}; forward, "
        f"{args.device}, {args.threads} threads, chunk_mb {args.chunk_mb:g}",
        flush=True,
    )
    print(f"peak MB: {memory_kind(args.device)}", flush=True)
    print(
        f"{'points':>7}{'edges':>10}  {'backend':<16}{'seconds':>9}{'peak MB':>9}"
        f"{'ms / edge / layer':>19}"
    )
    for size in sizes:
        for backend in backends:
            command = [
                sys.executable, __file__, "--case", str(size), "--device", args.device,
                "--threads", str(args.threads), "--chunk-mb", str(args.chunk_mb),
                "--backend", backend,
            ] + (["--smoke"] if args.smoke else [])  # fmt: skip
            done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=environment)
            if done.returncode != 0:
                raise SystemExit(f"{size} points, {backend} failed (its output is above)")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            per_edge = 1e3 * result["seconds"] / (result["edges"] * result["depth"])
            print(
                f"{result['points']:>7}{result['edges']:>10}  {result['backend']:<16}"
                f"{result['seconds']:>9.1f}{result['peak_mb']:>9.0f}{per_edge:>19.3f}",
                flush=True,
            )
    print(f"parameters: {result['parameters']:,}", flush=True)


if __name__ == "__main__":
    main()
