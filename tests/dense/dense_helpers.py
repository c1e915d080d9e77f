"""Inputs and checks shared by the front end's tests."""

import torch
from e3nn import o3

from se3tutor.checks import default_dtype

B, N = 2, 12


def inputs(dim=16, b=B, n=N, dtype=torch.float32):
    return (
        torch.randn(b, n, dim, dtype=dtype),
        torch.randn(b, n, 3, dtype=dtype),
        torch.ones(b, n, dtype=torch.bool),
    )


def rotate(x, rotation, degree):
    """Rotate the last axis of degree-``degree`` features (type 1 is (x, y, z))."""
    with default_dtype(rotation.dtype):
        d = o3.Irrep(degree, (-1) ** degree).D_from_matrix(rotation)
    return x @ d.T


def equivariance_errors(model, feats, coors, mask, **kwargs):
    """Largest |model(rotated) - rotated(model)| per output degree, random rotation and shift."""
    rotation = o3.rand_matrix(dtype=coors.dtype)
    shift = torch.randn(3, dtype=coors.dtype)
    if isinstance(feats, dict):
        rotated = {k: rotate(v, rotation, int(k)) if k != "0" else v for k, v in feats.items()}
    else:
        rotated = feats
    before = model(feats, coors, mask, **kwargs)
    after = model(rotated, coors @ rotation.T + shift, mask, **kwargs)
    if not isinstance(before, dict):
        degree = str(kwargs.get("return_type") or 0)
        before, after = {degree: before}, {degree: after}
    errors = {}
    for key in before:
        expected = before[key] if key == "0" else rotate(before[key], rotation, int(key))
        errors[key] = float((after[key] - expected).detach().abs().max())
    return errors


def influence(model, feats, coors, mask, node, **kwargs):
    """Which nodes' features the output of ``node`` (batch 0) depends on."""
    feats = feats.detach().requires_grad_(True)
    out = model(feats, coors, mask, **kwargs)
    (grad,) = torch.autograd.grad(out[0, node].sum(), feats)
    return grad[0].abs().sum(dim=1) > 0


def chain(n):
    i = torch.arange(n)
    return (i[:, None] - i[None, :]).abs() == 1
