"""Make the student versions of the exercise notebooks from the solved ones.

    python ci/make_student_notebooks.py          # write book/exercises/student/*.ipynb
    python ci/make_student_notebooks.py --check  # exit 1 if one is missing or out of date

The solved notebook ``book/exercises/<chapter>.ipynb`` is the only one edited by hand; it is a
page of the book, executed in every build, its solutions in dropdowns. Its student version,
``book/exercises/student/<chapter>.ipynb``, is for Colab and Jupyter, and is made from it:

- a gated solution (a markdown cell ``{solution-start} <label>``, cells, a markdown cell
  ``{solution-end}``) is removed, but for its code cells tagged ``solution``: in those,
  imports are dropped (choosing the tools is part of the answer) and every function keeps its
  signature and docstring (the specification the reader implements), its body replaced by
  ``# YOUR CODE HERE`` and ``raise NotImplementedError``;
- an ``{exercise}`` directive becomes plain markdown (Jupyter does not know MyST directives);
- cells tagged ``solved-only`` (the link to this very student version) are dropped, and a
  note saying where the notebook comes from follows the title;
- relative links gain one ``../`` (the student version is one folder deeper);
- outputs, execution counts and cell metadata are cleared.

Everything else, the setup cell and the cells that call ``se3tutor.exercises.check_...``, is
copied as it is. Standard library only; tests/test_exercises.py checks that the committed
student notebooks are what this script makes.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOLVED = ROOT / "book" / "exercises"
STUDENT = SOLVED / "student"

STUB = "# YOUR CODE HERE\nraise NotImplementedError"
SOLUTION_START = re.compile(r"^\s*(`{3,}|:{3,})\{solution-start\}", re.M)
SOLUTION_END = re.compile(r"^\s*(`{3,}|:{3,})\{solution-end\}", re.M)
EXERCISE = re.compile(
    r"^(?P<fence>`{3,}|:{3,})\{exercise\}[ \t]*(?P<title>[^\n]*)\n"
    r"(?P<options>(?::[\w-]+:[^\n]*\n)*)(?P<body>.*?)^(?P=fence)[ \t]*$",
    re.M | re.S,
)
# MyST that Jupyter and Colab would show as raw text.
MYST_LEFTOVERS = re.compile(r"^\s*(`{3,}|:{3,})\{|\{(ref|numref|doc|eq|cite)[^}]*\}`", re.M)


class NotebookError(ValueError):
    """A solved notebook breaks the conventions above."""


def source_of(cell: dict) -> str:
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def stub(source: str, where: str) -> str:
    """The cell ``source`` with imports dropped and every function body replaced by a stub."""
    try:
        module = ast.parse(source)
    except SyntaxError as error:
        raise NotebookError(f"{where}: a solution cell must be plain Python ({error})") from None
    lines = source.splitlines()
    pieces = []
    for node in module.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            raise NotebookError(
                f"{where}: a solution cell holds only imports and functions, found "
                f"{type(node).__name__} on line {node.lineno}"
            )
        docstring = node.body[0]
        if not (
            isinstance(docstring, ast.Expr)
            and isinstance(docstring.value, ast.Constant)
            and isinstance(docstring.value.value, str)
            and len(node.body) > 1
        ):
            raise NotebookError(
                f"{where}: function {node.name!r} needs a docstring (the reader's specification) "
                "and a body after it"
            )
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        indent = " " * docstring.col_offset
        kept = lines[first - 1 : docstring.end_lineno]
        pieces.append("\n".join(kept + [indent + line for line in STUB.splitlines()]))
    if not pieces:
        raise NotebookError(f"{where}: a solution cell without a function to write")
    return "\n\n\n".join(pieces)


def plain_exercise(source: str) -> str:
    """An ``{exercise}`` directive as plain markdown: a bold title, then the statement."""

    def replace(match: re.Match) -> str:
        title = match.group("title").strip()
        heading = f"**Exercise: {title}.**" if title else "**Exercise.**"
        return f"{heading}\n\n{match.group('body').strip()}\n"

    return EXERCISE.sub(replace, source)


def deeper_links(source: str) -> str:
    """Relative links from one folder further down: ``](x)`` -> ``](../x)``."""
    return re.sub(r"\]\((?![a-z]+:|#|/)", "](../", source)


def _cell(cell_type: str, source: str, cell_id: str) -> dict:
    cell = {"cell_type": cell_type, "id": cell_id, "metadata": {}, "source": _lines(source)}
    if cell_type == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def _lines(source: str) -> list:
    return source.splitlines(keepends=True)


def _note(name: str) -> str:
    return (
        "*The version without solutions. Write the code in every cell marked `# YOUR CODE "
        "HERE`, then run the cell below it: it checks your answer and says what is wrong. "
        f"Made from `book/exercises/{name}` (the page of the book, with the solutions) by "
        "`ci/make_student_notebooks.py`: edit that one, not this.*"
    )


def student_notebook(solved: dict, name: str) -> dict:
    """The student version of the solved notebook ``solved`` (parsed JSON) named ``name``."""
    cells, inside = [], None
    for index, cell in enumerate(solved["cells"]):
        source, tags = source_of(cell), cell.get("metadata", {}).get("tags", [])
        where = f"{name}, cell {index}"
        if cell["cell_type"] == "markdown" and SOLUTION_START.search(source):
            if inside is not None:
                raise NotebookError(f"{where}: a solution starts inside another")
            inside = where
            continue
        if cell["cell_type"] == "markdown" and SOLUTION_END.search(source):
            if inside is None:
                raise NotebookError(f"{where}: a solution ends that did not start")
            inside = None
            continue
        if "solution" in tags:
            if inside is None or cell["cell_type"] != "code":
                raise NotebookError(f"{where}: a solution cell outside {{solution-start}} ... end")
            cells.append(_cell("code", stub(source, where), cell["id"]))
            continue
        if inside is not None or "solved-only" in tags:
            continue  # the solution's explanations, and what only the solved version needs
        if cell["cell_type"] == "markdown":
            source = deeper_links(plain_exercise(source))
            leftover = MYST_LEFTOVERS.search(source)
            if leftover:
                raise NotebookError(
                    f"{where}: MyST syntax that Jupyter would show as raw text: "
                    f"{leftover.group(0)!r}"
                )
        cells.append(_cell(cell["cell_type"], source, cell["id"]))
        if len(cells) == 1:  # after the title
            cells.append(_cell("markdown", _note(name), "student-note"))
    if inside is not None:
        raise NotebookError(f"{inside}: a solution that does not end")
    if not any("YOUR CODE HERE" in source_of(cell) for cell in cells):
        raise NotebookError(f"{name}: no solution cell (tagged 'solution') to turn into a stub")
    return {
        "cells": cells,
        "metadata": solved["metadata"],
        "nbformat": solved["nbformat"],
        "nbformat_minor": solved["nbformat_minor"],
    }


def dumps(notebook: dict) -> str:
    """JSON as Jupyter writes it (nbformat's writer), so that tools rewrite nothing."""
    return json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def student_versions() -> dict:
    """``{path of the student version: its text}`` for every solved notebook."""
    versions = {}
    for path in sorted(SOLVED.glob("*.ipynb")):
        solved = json.loads(path.read_text(encoding="utf-8"))
        versions[STUDENT / path.name] = dumps(student_notebook(solved, path.name))
    return versions


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check, write nothing")
    args = parser.parse_args(argv)
    versions = student_versions()
    stale = [
        path
        for path, text in versions.items()
        if not path.exists() or path.read_text(encoding="utf-8") != text
    ]
    orphans = sorted(set(STUDENT.glob("*.ipynb")) - set(versions))
    if args.check:
        for path in stale:
            print(f"out of date: {path.relative_to(ROOT)}")
        for path in orphans:
            print(f"no solved notebook for: {path.relative_to(ROOT)}")
        if stale or orphans:
            print("run: python ci/make_student_notebooks.py")
        return 1 if stale or orphans else 0
    STUDENT.mkdir(exist_ok=True)
    for path in stale:
        path.write_text(versions[path], encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")
    for path in orphans:
        path.unlink()
        print(f"removed {path.relative_to(ROOT)} (its solved notebook is gone)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
