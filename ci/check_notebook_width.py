"""Fail when a code line of a chapter is wider than the page (80 columns).

The book's HTML cuts code cells at the right edge of the page; a reader then sees half a line.
ruff's line length (100) is for the package; chapters and exercises are held to 80 here.

    python ci/check_notebook_width.py [notebooks...]   # default: every notebook under book/
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

WIDTH = 80
ROOT = Path(__file__).resolve().parent.parent


def wide_lines(path: Path) -> list[str]:
    """``"path:cell N: <line>"`` for every code line over ``WIDTH`` columns."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    found = []
    for index, cell in enumerate(cells):
        if cell["cell_type"] != "code":
            continue
        for line in "".join(cell["source"]).splitlines():
            if len(line) > WIDTH:
                found.append(f"{path.relative_to(ROOT)}: cell {index}: {len(line)} columns: {line}")
    return found


def main(argv: list[str]) -> int:
    paths = [Path(p).resolve() for p in argv] or sorted((ROOT / "book").rglob("*.ipynb"))
    found = [line for path in paths for line in wide_lines(path)]
    for line in found:
        print(line)
    if found:
        print(f"{len(found)} code lines wider than {WIDTH} columns", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
