"""ci/check_notebook_width.py flags code lines wider than the page, and only those."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("width", ROOT / "ci" / "check_notebook_width.py")
width = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(width)


def notebook(tmp_path, *cells):
    path = tmp_path / "book" / "chapter.ipynb"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"cells": [dict(cell_type=t, source=s) for t, s in cells]}))
    return path


def test_a_code_line_over_80_columns_is_reported_and_markdown_is_not(tmp_path, monkeypatch):
    monkeypatch.setattr(width, "ROOT", tmp_path)
    wide = "x = " + "1 + " * 20 + "1"  # 85 columns
    path = notebook(tmp_path, ("code", "y = 1\n" + wide), ("markdown", "word " * 40))
    [found] = width.wide_lines(path)
    assert "cell 0: 85 columns" in found
    assert width.main([str(path)]) == 1


def test_a_notebook_within_80_columns_passes(tmp_path, monkeypatch):
    monkeypatch.setattr(width, "ROOT", tmp_path)
    path = notebook(tmp_path, ("code", "x" * 80))
    assert width.wide_lines(path) == [] and width.main([str(path)]) == 0
