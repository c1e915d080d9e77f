"""Run a chapter's code cells top to bottom in one namespace, without Jupyter.

For machines that have torch but no Jupyter (the GPU machine of ``ci/gpu_check.sh``): every
code cell runs in order, as a kernel would run it, so the chapter's assertions hold or fail
the run. IPython lines (``%pip``, ``%config``, ``!cmd``) are replaced by ``pass``; figures go
to a non-interactive backend. Prints each cell's time, and the failing cell's number and
source on an error (exit status 1).

    python ci/run_notebook.py book/dynamics.ipynb [more.ipynb ...]
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path


def python_source(cell_source: str) -> str:
    """The cell's code with IPython-only lines turned into ``pass`` (indentation kept, so a
    magic inside a block leaves a valid block)."""
    lines = []
    for line in cell_source.splitlines():
        stripped = line.lstrip()
        if stripped.startswith(("%", "!")):
            line = line[: len(line) - len(stripped)] + "pass"
        lines.append(line)
    return "\n".join(lines)


def run(path: Path) -> bool:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    namespace = {"__name__": "__main__"}
    previous = Path.cwd()
    os.chdir(path.parent)  # as Jupyter runs a notebook: relative paths from its folder
    try:
        for index, cell in enumerate(cells):
            if cell["cell_type"] != "code":
                continue
            source = python_source("".join(cell["source"]))
            start = time.perf_counter()
            try:
                exec(compile(source, f"{path}:cell {index}", "exec"), namespace)
            except Exception:
                print(f"FAIL {path} cell {index}:\n{source}\n", file=sys.stderr)
                traceback.print_exc()
                return False
            print(f"  cell {index:3d}: {time.perf_counter() - start:6.1f} s", flush=True)
    finally:
        os.chdir(previous)
    return True


def main(argv: list[str]) -> int:
    import matplotlib

    matplotlib.use("Agg")
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    for name in argv:
        path = Path(name).resolve()
        start = time.perf_counter()
        print(f"{path.name}:", flush=True)
        if not run(path):
            return 1
        print(f"{path.name}: ok in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
