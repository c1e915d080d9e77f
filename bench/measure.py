"""What the benchmark scripts share: points at a fixed density, and timing with peak memory."""

from __future__ import annotations

import math
import resource
import time
from typing import Callable


def uniform_points(num_points: int, neighbors: float, device: str = "cpu"):
    """``[num_points, 3]`` points uniform in a cube sized so that each has about
    ``neighbors`` others within distance 1: ``(4/3) pi 1^3 * num_points / side^3 = neighbors``.
    """
    import torch

    side = (num_points * 4 / 3 * math.pi / neighbors) ** (1 / 3)
    return torch.rand(num_points, 3, device=device) * side


def best_time_and_peak(step: Callable[[], object], repeats: int, device: str) -> tuple:
    """Best wall time of ``repeats`` calls of ``step`` (after one warm-up call by the caller),
    and the peak memory they needed in MB: ``torch.cuda.max_memory_allocated`` on CUDA, the
    growth of the resident set size (``ru_maxrss``, KiB on Linux) on the CPU."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    return min(times), peak_mb
