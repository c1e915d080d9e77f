"""What the benchmark scripts share: points at a fixed density, the peak memory of one step,
its best time, and the name of a row's tensor-product backend.

Peak memory is measured the same way by every script:

- on the CPU, the largest resident set during the *first* full-size call minus the resident
  set just before it, in a fresh process that has only been warmed up on small inputs. The
  process's high-water mark is reset just before the call (Linux: ``5`` into
  ``/proc/self/clear_refs``) and read after it (``VmHWM``). ``ru_maxrss`` cannot be reset:
  an earlier version of these scripts took its growth after a full-size warm-up, which had
  already reached the peak, and reported 884 MB for a step that takes the resident set from
  496 MB to 15,272 MB. Where the mark cannot be reset, :func:`peak_memory_mb` falls back to
  ``ru_maxrss`` and refuses to measure in a process that has already been bigger;
- on CUDA, ``torch.cuda.max_memory_allocated`` with the statistics reset just before the first
  full-size call (what PyTorch's caching allocator handed out, not what it holds).
"""

from __future__ import annotations

import math
import os
import resource
import time
from typing import Callable

# How far below its maximum the resident set may be when a CPU measurement starts: what a
# warm-up on small inputs frees (MB). More, and the growth of the maximum under-reports.
SLACK_MB = 64.0


def uniform_points(num_points: int, neighbors: float, device: str = "cpu"):
    """``[num_points, 3]`` points uniform in a cube sized so that each has about
    ``neighbors`` others within distance 1: ``(4/3) pi 1^3 * num_points / side^3 = neighbors``.
    """
    import torch

    side = (num_points * 4 / 3 * math.pi / neighbors) ** (1 / 3)
    return torch.rand(num_points, 3, device=device) * side


def backend_label(model, backend: str, device: str) -> str:
    """A table row's backend: ``cuequivariance`` only where its fused CUDA kernels run
    (:func:`se3tutor.tensor_product.runs_cuequivariance_kernels`), ``cuequivariance (torch
    fallback)`` where cuequivariance computes with plain torch operations."""
    from se3tutor.tensor_product import runs_cuequivariance_kernels

    if backend == "cuequivariance" and not runs_cuequivariance_kernels(model, device):
        return "cuequivariance (torch fallback)"
    return backend


def memory_kind(device: str) -> str:
    """What :func:`peak_memory_mb` measures on ``device``, for a table header."""
    if device == "cuda":
        return "CUDA max_memory_allocated over the first full-size step"
    return "CPU resident-set growth over the first full-size step, in a fresh process"


def resident_mb() -> float:
    """The resident set size now (Linux: ``/proc/self/statm``), in MB."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def max_resident_mb() -> float:
    """The largest resident set size so far (``ru_maxrss``: KiB on Linux), in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mb(field: str) -> float:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_high_water_mark() -> bool:
    """Reset the process's peak resident set to the current one; False where Linux refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_memory_mb(step: Callable[[], object], device: str) -> float:
    """Peak memory of one call of ``step`` in MB (see the module docstring). Call it for the
    first full-size step. On the CPU where the high-water mark cannot be reset, raises
    ``RuntimeError`` when the process has already been bigger than it is now by more than
    ``SLACK_MB``: the growth of ``ru_maxrss`` would then under-report."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    if _reset_high_water_mark():
        resident_before = _status_mb("VmRSS")
        step()
        return max(0.0, _status_mb("VmHWM") - resident_before)
    resident_before = resident_mb()
    if max_resident_mb() > resident_before + SLACK_MB:
        raise RuntimeError(
            f"the process has been at {max_resident_mb():.0f} MB but holds "
            f"{resident_before:.0f} MB now: the maximum after the step would under-report its "
            "peak. Measure in a fresh process, warmed up on small inputs only."
        )
    step()
    # Exact when the step sets a new maximum; otherwise an upper bound (at most SLACK_MB). The
    # two counters round differently (KiB, pages): a step that allocates nothing reads 0.
    return max(0.0, max_resident_mb() - resident_before)


def best_time(step: Callable[[], object], repeats: int, device: str) -> float:
    """Best wall time of ``repeats`` calls of ``step`` (synchronised on CUDA), in seconds."""
    import torch

    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_then_best_time(step: Callable[[], object], repeats: int, device: str) -> tuple:
    """``(best seconds, peak MB)``: the peak memory of the first full-size call of ``step``
    (:func:`peak_memory_mb`), then the best time of ``repeats`` further calls."""
    peak_mb = peak_memory_mb(step, device)
    return best_time(step, repeats, device), peak_mb
