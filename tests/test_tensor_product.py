"""se3tutor.tensor_product: the depthwise product on e3nn and on cuequivariance give the same
numbers (values, gradients, a whole transformer's forces), and the backend is chosen as
documented. cuequivariance runs here through its pure-torch fallback (no GPU); the CUDA test
runs where there is one."""

import sys
import types

import pytest
import torch
from e3nn import o3

from se3tutor.checks import default_dtype
from se3tutor.tensor_product import (
    DepthwiseTensorProduct,
    cuequivariance_available,
    runs_cuequivariance_kernels,
    use_backend,
)
from se3tutor.transformer import SE3Transformer, hidden_irreps

needs_cuequivariance = pytest.mark.skipif(
    not cuequivariance_available(), reason="cuequivariance-torch is not installed"
)
IRREPS = [
    # (node, harmonics, targets): several paths into one irrep, both parities, l = 2
    ("8x0e + 8x1o + 4x2e + 3x1e", o3.Irreps.spherical_harmonics(2), "4x0e + 4x1o + 2x2e + 2x1e"),
    ("16x0e + 16x0o + 16x1o + 16x1e", o3.Irreps.spherical_harmonics(1), "0e + 0o + 1o + 1e"),
    ("5x0e + 3x2e", o3.Irreps.spherical_harmonics(3), "1x2e + 1x3o"),
]


def inputs(tp, num_edges=40, dtype=torch.float64, device="cpu"):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(num_edges, tp.irreps_in1.dim, generator=generator, dtype=dtype)
    vectors = torch.randn(num_edges, 3, generator=generator, dtype=dtype)
    y = o3.spherical_harmonics(tp.irreps_in2, vectors, normalize=True)
    weight = torch.randn(num_edges, tp.weight_numel, generator=generator, dtype=dtype)
    return [t.to(device).requires_grad_(True) for t in (x, y, weight)]


def test_auto_is_e3nn_on_the_cpu_and_bad_backends_are_refused():
    tp = DepthwiseTensorProduct("4x0e + 2x1o", "1x0e + 1x1o", "1x1o")
    assert tp.backend == "auto" and not tp.uses_cuequivariance(torch.zeros(1, tp.irreps_in1.dim))
    assert tp.irreps_out == o3.Irreps("4x1o + 2x1o")  # 0e x 1o and 1o x 0e, nothing else
    with pytest.raises(ValueError, match="backend must be one of"):
        tp.backend = "cuda"
    with pytest.raises(ValueError, match="backend must be one of"):
        use_backend(torch.nn.Sequential(tp), "fast")


def test_auto_takes_the_fused_kernel_only_for_one_multiplicity_and_checks_widths():
    assert DepthwiseTensorProduct("8x0e + 8x1o + 8x2e", "0e + 1o", "0e + 1o").kernel_applies
    mixed = DepthwiseTensorProduct("32x0e + 16x1o", "0e + 1o", "0e + 1o")
    assert not mixed.kernel_applies  # cuequivariance would fall back to plain torch
    x, y = torch.zeros(4, mixed.irreps_in1.dim), torch.zeros(4, 4)
    with pytest.raises(ValueError, match=r"x must be \[..., 80\], got \[4, 79\]"):
        mixed(x[:, 1:], y, torch.zeros(4, mixed.weight_numel))
    with pytest.raises(ValueError, match=r"y must be \[..., 4\]"):
        mixed(x, y[:, :3], torch.zeros(4, mixed.weight_numel))


def test_only_runs_on_the_fused_kernels_count_as_cuequivariance(monkeypatch):
    """What a benchmark may label "cuequivariance": CUDA, the kernels' package, one
    multiplicity, a backend that takes them; anything else runs e3nn or the plain-torch
    fallback. (The installed packages are pretended here: no GPU is needed to ask.)"""
    from se3tutor import SE3Transformer

    monkeypatch.setattr(
        "se3tutor.tensor_product.cuequivariance_available", lambda kernels=False: True
    )
    one = SE3Transformer("2x0e", "8x0e + 8x1o", "1x0e", max_radius=2.0)
    mixed = SE3Transformer("2x0e", "16x0e + 8x1o", "1x0e", max_radius=2.0)
    assert runs_cuequivariance_kernels(one, "cuda")
    assert not runs_cuequivariance_kernels(one, "cpu")
    assert not runs_cuequivariance_kernels(mixed, "cuda")
    assert not runs_cuequivariance_kernels(use_backend(one, "e3nn"), "cuda")
    assert not runs_cuequivariance_kernels(torch.nn.Linear(2, 2), "cuda")
    monkeypatch.setattr(
        "se3tutor.tensor_product.cuequivariance_available", lambda kernels=False: not kernels
    )
    assert not runs_cuequivariance_kernels(use_backend(one, "cuequivariance"), "cuda")


def test_cuequivariance_refused_with_an_install_hint_when_missing(monkeypatch):
    monkeypatch.setattr(
        "se3tutor.tensor_product.cuequivariance_available", lambda kernels=False: False
    )
    with pytest.raises(ImportError, match="pip install cuequivariance-torch"):
        DepthwiseTensorProduct("4x0e", "1x0e", "1x0e", backend="cuequivariance")


@needs_cuequivariance
def test_cuequivariance_on_the_cpu_stays_off_the_cuda_kernels_on_a_gpu_machine(monkeypatch):
    # On a machine with a GPU and cuequivariance-ops-torch installed, cuequivariance's layout
    # transposes pick the CUDA kernel (which has no CPU implementation) unless told not to:
    # seen on the GPU of ci/gpu_check.sh. Here: a GPU, the kernels and a CUDA-only transpose.
    import cuequivariance_torch.primitives.transpose as transpose

    def cuda_only(*args):
        raise NotImplementedError("segmented_transpose has no CPU kernel")

    monkeypatch.setitem(sys.modules, "cuequivariance_ops_torch", types.ModuleType("ops"))
    monkeypatch.setattr(transpose, "segmented_transpose", cuda_only, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    irreps_node, irreps_sh, irreps_targets = IRREPS[0]  # multiplicities > 1: real transposes
    with default_dtype(torch.float64):
        e3nn_tp = DepthwiseTensorProduct(irreps_node, irreps_sh, irreps_targets, backend="e3nn")
        cue_tp = DepthwiseTensorProduct(
            irreps_node, irreps_sh, irreps_targets, backend="cuequivariance"
        )
    out = cue_tp(*inputs(cue_tp))
    assert torch.allclose(out, e3nn_tp(*inputs(e3nn_tp)), atol=1e-12)


@pytest.mark.slow
@needs_cuequivariance
@pytest.mark.parametrize("irreps_node, irreps_sh, irreps_targets", IRREPS)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_cuequivariance_gives_e3nn_values_and_gradients(
    irreps_node, irreps_sh, irreps_targets, dtype, tolerance
):
    with default_dtype(dtype):
        e3nn_tp = DepthwiseTensorProduct(irreps_node, irreps_sh, irreps_targets, backend="e3nn")
        cue_tp = DepthwiseTensorProduct(
            irreps_node, irreps_sh, irreps_targets, backend="cuequivariance"
        )
    assert cue_tp.state_dict().keys() == e3nn_tp.state_dict().keys()
    args_e3nn, args_cue = inputs(e3nn_tp, dtype=dtype), inputs(cue_tp, dtype=dtype)
    out_e3nn, out_cue = e3nn_tp(*args_e3nn), cue_tp(*args_cue)
    scale = out_e3nn.abs().max()
    assert out_cue.shape == out_e3nn.shape
    assert (out_cue - out_e3nn).abs().max() <= tolerance * scale
    # The same gradient for every input: x, the harmonics and the per-edge weights.
    cotangent = torch.randn_like(out_e3nn)
    grads_e3nn = torch.autograd.grad(out_e3nn, args_e3nn, cotangent)
    grads_cue = torch.autograd.grad(out_cue, args_cue, cotangent)
    for name, a, b in zip(("x", "y", "weight"), grads_e3nn, grads_cue):
        assert (a - b).abs().max() <= tolerance * a.abs().max(), name


@pytest.mark.slow
@needs_cuequivariance
def test_a_transformer_on_cuequivariance_gives_the_same_outputs_and_forces():
    torch.manual_seed(0)
    with default_dtype(torch.float64):
        model = SE3Transformer(
            "3x0e", hidden_irreps(8, 2, "SE3"), "1x0e", max_radius=2.0, num_layers=2, num_heads=2
        )
    f, pos = torch.randn(30, 3, dtype=torch.float64), 2 * torch.randn(30, 3, dtype=torch.float64)
    batch = torch.arange(30) // 15

    def energy_and_forces(backend):
        use_backend(model, backend)
        position = pos.clone().requires_grad_(True)
        energy = model(f, position, batch).sum()
        # create_graph: a force loss differentiates once more
        (gradient,) = torch.autograd.grad(energy, position, create_graph=True)
        (second,) = torch.autograd.grad(gradient.pow(2).sum(), position)
        return energy.detach(), -gradient.detach(), second

    energy, forces, second = energy_and_forces("e3nn")
    energy_cue, forces_cue, second_cue = energy_and_forces("cuequivariance")
    assert forces.abs().max() > 1e-3  # a real test: the forces are not all zero
    assert (energy_cue - energy).abs() <= 1e-10 * energy.abs()
    assert (forces_cue - forces).abs().max() <= 1e-10 * forces.abs().max()
    assert (second_cue - second).abs().max() <= 1e-9 * second.abs().max()


@needs_cuequivariance
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_cuequivariance_on_cuda_gives_e3nn_values_and_gradients(dtype, tolerance):
    # one multiplicity: the fused kernel, where cuequivariance-ops-torch is installed
    with default_dtype(dtype):
        tp = DepthwiseTensorProduct("16x0e + 16x1o + 16x2e", "0e + 1o + 2e", "0e + 1o + 2e")
    tp = tp.cuda()
    assert tp.uses_cuequivariance(torch.zeros(1, device="cuda")) == cuequivariance_available(
        kernels=True
    )
    results = {}
    for backend in ("e3nn", "cuequivariance"):
        tp.backend = backend
        args = inputs(tp, num_edges=1000, dtype=dtype, device="cuda")
        out = tp(*args)
        results[backend] = (out, *torch.autograd.grad(out.pow(2).sum(), args))
    for name, a, b in zip(("out", "x", "y", "weight"), results["e3nn"], results["cuequivariance"]):
        assert (a - b).abs().max() <= tolerance * a.abs().max(), name


@pytest.mark.parametrize(
    "irreps_node, lmax, targets",
    [
        ("4x0e + 2x1o + 3x2e", 2, "0e + 1o + 1e + 2e"),  # mixed multiplicities, both parities
        ("3x0o + 2x1e", 1, "0e + 0o + 1o + 1e"),
        ("2x0e + 2x0o + 2x3o + 2x3e", 3, "0e + 0o + 1o + 1e + 2e + 2o + 3o + 3e"),
    ],
)
def test_the_product_in_blocks_is_e3nns_product_with_its_gradients(irreps_node, lmax, targets):
    # forward_blocks contracts the harmonics with the 3j symbols first and multiplies every
    # channel at once; rearranged by from_blocks it must be e3nn's product, values and
    # gradients (to_blocks inverts from_blocks).
    with default_dtype(torch.float64):
        tp = DepthwiseTensorProduct(irreps_node, o3.Irreps.spherical_harmonics(lmax), targets)
    x, y, w = inputs(tp)
    expected = tp(x, y, w)
    blocks = tp.forward_blocks(x, y, w[:, tp.block_weight_order])
    assert [b.shape[1] for b in blocks] == tp.block_widths
    got = tp.from_blocks(blocks)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat(tp.to_blocks(expected), 1), torch.cat(blocks, 1))
    probe = torch.randn_like(expected)
    for a, b in zip(
        torch.autograd.grad((got * probe).sum(), (x, y, w)),
        torch.autograd.grad((expected * probe).sum(), (x, y, w)),
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
