"""Shared fixtures: graph backends, dtypes with their tolerances, devices."""

import importlib.util
import os

import pytest
import torch

HAVE_PYG = all(importlib.util.find_spec(m) for m in ("torch_cluster", "torch_scatter"))
# `make test` sets this so that a missing compiled backend fails instead of skipping.
REQUIRE_PYG = os.environ.get("SE3TUTOR_REQUIRE_PYG") == "1"

BACKENDS = [
    "torch",
    pytest.param(
        "pyg",
        marks=pytest.mark.skipif(
            not HAVE_PYG and not REQUIRE_PYG, reason="torch-cluster/torch-scatter not installed"
        ),
    ),
]

# Equivariance tolerances, absolute, for outputs of order 1.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("SE3TUTOR_BACKEND", request.param)
    return request.param


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request):
    return request.param


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def tolerance(dtype):
    return TOLERANCE[dtype]


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: on graphs of tens of nodes a second thread only
    waits, and on a busy machine it makes a test several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
