"""Every test and every docstring example (under tests/ and se3tutor/) starts from the same
torch random state, so that none depends on what ran before it."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
