"""Every Python block of the README runs as written, each on its own (a reader copies one)."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("source", BLOCKS, ids=[f"block {i}" for i in range(len(BLOCKS))])
def test_a_readme_block_runs_on_its_own(source):
    namespace = {}  # a fresh one for each block
    exec(compile(source, "README.md", "exec"), namespace)
    outputs = [value for value in namespace.values() if isinstance(value, torch.Tensor)]
    assert outputs and all(bool(value.isfinite().all()) for value in outputs)
