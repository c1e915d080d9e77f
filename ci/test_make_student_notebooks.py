"""The student notebooks: what ci/make_student_notebooks.py makes from the solved exercise
notebooks, holding no solution, and reporting the missing code through the checkers."""

import ast
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from se3tutor.exercises import ExerciseError

ROOT = Path(__file__).resolve().parent.parent


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "ci" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generator = _load_script("make_student_notebooks")
colab_install = _load_script("colab_install")

SOLVED = sorted(generator.SOLVED.glob("*.ipynb"))
CHAPTERS = ["attention", "convolution", "normalization", "potential", "smoothness", "transformer"]


def load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def sources(notebook, cell_type=None):
    return [
        generator.source_of(cell)
        for cell in notebook["cells"]
        if cell_type is None or cell["cell_type"] == cell_type
    ]


def test_every_chapter_has_a_solved_exercise_notebook():
    assert set(CHAPTERS) <= {path.stem for path in SOLVED}


@pytest.mark.parametrize("path", SOLVED, ids=lambda path: path.stem)
def test_student_notebook_is_what_the_generator_makes(path):
    student = generator.STUDENT / path.name
    assert student.exists(), "run: python ci/make_student_notebooks.py"
    expected = generator.dumps(generator.student_notebook(load(path), path.name))
    assert student.read_text(encoding="utf-8") == expected, (
        f"{student.relative_to(ROOT)} differs from what ci/make_student_notebooks.py makes from "
        f"{path.relative_to(ROOT)}: edit the solved notebook, then run the script"
    )


def test_no_student_notebook_without_a_solved_one():
    assert sorted(p.name for p in generator.STUDENT.glob("*.ipynb")) == [p.name for p in SOLVED]


def _solution_only_lines(solved):
    """The lines of the solutions (their cells, the markdown between them) that appear
    nowhere else in the solved notebook, nor in the stubs made from them."""
    hidden, visible, inside = set(), [], False
    for cell in solved["cells"]:
        source = generator.source_of(cell)
        if generator.SOLUTION_START.search(source) or generator.SOLUTION_END.search(source):
            inside = bool(generator.SOLUTION_START.search(source))
            continue
        if "solution" in cell["metadata"].get("tags", []):
            visible.append(generator.stub(source, ""))
        if inside:
            hidden.update(line.strip() for line in source.splitlines() if len(line.strip()) >= 8)
        else:
            visible.append(source)
    visible = "\n".join(visible)
    return [line for line in hidden if line not in visible]


@pytest.mark.parametrize("path", SOLVED, ids=lambda path: path.stem)
def test_student_notebook_holds_no_solution(path):
    solved, student = load(path), load(generator.STUDENT / path.name)
    text = "\n".join(sources(student))
    leaked = [line for line in _solution_only_lines(solved) if line in text]
    assert not leaked, f"solution lines in the student version: {leaked}"
    assert not re.search(r"\{solution|\{exercise\}|solved-only", text)
    for cell in student["cells"]:
        assert cell["metadata"] == {}
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
    stubs = [s for s in sources(student, "code") if "# YOUR CODE HERE" in s]
    solutions = [cell for cell in solved["cells"] if "solution" in cell["metadata"].get("tags", [])]
    assert len(stubs) == len(solutions) >= 1
    for stub in stubs:  # a signature, a docstring, the stub: nothing else
        (function,) = ast.parse(stub).body
        assert len(function.body) == 2 and isinstance(function.body[1], ast.Raise)


@pytest.mark.parametrize("path", SOLVED, ids=lambda path: path.stem)
def test_exercise_notebooks_start_like_the_chapters(path):
    for notebook in (path, generator.STUDENT / path.name):
        first, rest = colab_install.first_code_cell(notebook)
        assert colab_install.problems_of(first) == []
        assert any("device" in cell for cell in rest)


@pytest.mark.slow  # executes every code cell of the notebook
@pytest.mark.parametrize("path", SOLVED, ids=lambda path: path.stem)
def test_running_a_student_notebook_reports_the_missing_code(path):
    """Every cell runs; every cell that checks an answer says that it is not written yet."""
    from IPython.core.inputtransformer2 import TransformerManager

    transform = TransformerManager().transform_cell
    namespace = {"__name__": "__main__"}
    checked = 0
    threads = torch.get_num_threads()
    try:
        for source in sources(load(generator.STUDENT / path.name), "code"):
            code = compile(transform(source), f"<{path.stem} cell>", "exec")
            if re.match(r"exercises\.check_\w+\(", source):
                with pytest.raises(ExerciseError, match=r"is not written yet: replace `raise"):
                    exec(code, namespace)
                checked += 1
            else:
                exec(code, namespace)
    finally:
        torch.set_num_threads(threads)
    assert checked >= 1


def _solved(*cells):
    def cell(cell_type, source, tags=()):
        metadata = {"tags": list(tags)}
        return {"cell_type": cell_type, "id": "x", "metadata": metadata, "source": source}

    return {"cells": [cell(*c) for c in cells], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


START = ("markdown", "````{solution-start} ex\n:class: dropdown\n````")
END = ("markdown", "````{solution-end}\n````")
SOLUTION = '''import math


def f(x):
    """Twice x."""
    y = 2 * x
    return y
'''


def test_the_generator_keeps_signature_and_docstring_and_drops_the_rest():
    notebook = _solved(
        ("markdown", "# Title"),
        ("markdown", "````{exercise} Twice\n:label: ex\n\nWrite [f](../x.ipynb).\n````"),
        START,
        ("code", SOLUTION, ["solution"]),
        ("markdown", "Why: the secret."),
        END,
        ("code", "exercises.check_f(f)"),
    )
    student = generator.student_notebook(notebook, "t.ipynb")
    texts = sources(student)
    assert texts[0] == "# Title" and "ci/make_student_notebooks.py" in texts[1]
    assert texts[2] == "**Exercise: Twice.**\n\nWrite [f](../../x.ipynb).\n"
    assert texts[3] == (
        'def f(x):\n    """Twice x."""\n    # YOUR CODE HERE\n    raise NotImplementedError'
    )
    assert texts[4] == "exercises.check_f(f)" and len(texts) == 5


@pytest.mark.parametrize(
    "cells, match",
    [
        ([("code", SOLUTION, ["solution"])], r"solution cell outside"),
        ([START, ("code", "def f(x):\n    return 2 * x\n", ["solution"]), END], r"docstring"),
        ([START, ("code", "y = 2\n", ["solution"]), END], r"only imports and functions"),
        ([START, ("code", SOLUTION, ["solution"])], r"does not end"),
        ([START, ("code", SOLUTION, ["solution"]), END, ("markdown", "See {ref}`x`.")], r"MyST"),
    ],
    ids=["outside a solution", "no docstring", "not a function", "unclosed", "MyST role"],
)
def test_the_generator_refuses_a_notebook_that_breaks_the_conventions(cells, match):
    with pytest.raises(generator.NotebookError, match=match):
        generator.student_notebook(_solved(("markdown", "# Title"), *cells), "t.ipynb")
