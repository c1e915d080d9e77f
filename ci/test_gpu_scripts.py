"""The GPU check's scripts, on this CPU: the notebook runner runs cells in order and names a
failing cell; ci/gpu_check.sh refuses to start without CUDA (and says why), refuses a step
it does not have, and parses."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("runner", ROOT / "ci" / "run_notebook.py")
runner = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runner)


def notebook(path, *sources):
    cells = [dict(cell_type="code", source=source, outputs=[]) for source in sources]
    path.write_text(json.dumps({"cells": [dict(cell_type="markdown", source="# T"), *cells]}))
    return path


def test_ipython_lines_become_pass_and_keep_their_block():
    source = "try:\n    import nothing\nexcept ImportError:\n    %pip install nothing\n!ls"
    converted = runner.python_source(source)
    assert converted.splitlines()[3:] == ["    pass", "pass"]
    compile(converted, "cell", "exec")  # still valid Python


def test_cells_share_one_namespace_in_order_and_a_failing_cell_is_named(tmp_path, capsys):
    good = notebook(tmp_path / "good.ipynb", "%config X = 1\nx = 2", "assert x == 2")
    assert runner.main([str(good)]) == 0
    bad = notebook(tmp_path / "bad.ipynb", "x = 2", "assert x == 3, 'x is not 3'")
    assert runner.main([str(bad)]) == 1
    error = capsys.readouterr().err
    assert "bad.ipynb cell 2" in error and "x is not 3" in error


def test_gpu_check_parses_and_without_cuda_runs_nothing(tmp_path):
    assert subprocess.run(["bash", "-n", str(ROOT / "ci" / "gpu_check.sh")]).returncode == 0
    environment = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable,
                   "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
    result = subprocess.run(
        ["bash", str(ROOT / "ci" / "gpu_check.sh")], env=environment, capture_output=True,
        text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert "torch sees no CUDA device here: nothing to check" in result.stdout
    assert (tmp_path / "gpu_check.log").read_text().count("\n") == 1  # no step ran


def test_gpu_check_refuses_an_unknown_step_by_name_before_anything_runs(tmp_path):
    environment = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(ROOT / "ci" / "gpu_check.sh"), "tests", "benhc"], env=environment,
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert "no step named benhc" in result.stderr and "headline)" in result.stderr
    assert (tmp_path / "gpu_check.log").read_text() == ""
