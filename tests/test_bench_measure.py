"""bench/measure.py: the peak memory the benchmarks report is at least what a step touches,
also in a process that has been bigger before (the high-water mark is reset)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
ONE_GIB_OF_FLOAT32 = 2**28  # elements


def run_python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (a fresh resident set), with bench/ importable."""
    prelude = f"import sys; sys.path.insert(0, {str(BENCH)!r})\nimport torch\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_a_step_that_touches_one_gib_is_reported_as_at_least_one_gib():
    done = run_python(
        "from measure import peak_memory_mb\n"
        f"print(peak_memory_mb(lambda: torch.ones({ONE_GIB_OF_FLOAT32}), 'cpu'))"
    )
    assert done.returncode == 0, done.stderr
    peak_mb = float(done.stdout.strip())
    assert 1020 <= peak_mb < 1024 + 256, peak_mb  # the GiB (less pages already resident)


@pytest.mark.slow
def test_a_process_that_has_already_peaked_still_reports_the_step():
    # A full-size warm-up: the maximum is reached and the memory given back (a large block is
    # mmapped by malloc and unmapped when freed). ru_maxrss would not grow again; the reset
    # high-water mark does.
    done = run_python(
        "from measure import peak_memory_mb\n"
        f"torch.ones({2 * ONE_GIB_OF_FLOAT32})\n"
        f"print(peak_memory_mb(lambda: torch.ones({ONE_GIB_OF_FLOAT32}), 'cpu'))"
    )
    assert done.returncode == 0, done.stderr
    assert 1020 <= float(done.stdout.strip()) < 1024 + 256  # a few pages were resident
