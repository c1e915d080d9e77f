"""se3tutor.graph: radius graph, scatter and segment softmax, on both backends."""

import importlib.util
import os

import pytest
import torch

from se3tutor.graph import (
    _radius_graph_cells,
    edge_vectors,
    radius_graph,
    scatter,
    segment_softmax,
)


def test_the_compiled_backends_are_installed_when_required():
    # `make test` sets SE3TUTOR_REQUIRE_PYG=1, so that a missing compiled backend fails the
    # run instead of skipping every test of it.
    have_pyg = all(importlib.util.find_spec(m) for m in ("torch_cluster", "torch_scatter"))
    required = os.environ.get("SE3TUTOR_REQUIRE_PYG") == "1"
    assert have_pyg or not required, "SE3TUTOR_REQUIRE_PYG=1 but torch-cluster/scatter missing"


def brute_force_edges(pos, max_radius, batch=None, loop=False):
    """Every pair closer than max_radius, from the full distance matrix (small clouds only)."""
    dist2 = (pos[:, None] - pos[None]).pow(2).sum(-1)
    connected = dist2 < max_radius**2
    if batch is not None:
        connected &= batch[:, None] == batch[None]
    if not loop:
        connected.fill_diagonal_(False)
    dst, src = connected.nonzero().T
    return set(zip(src.tolist(), dst.tolist()))


def edge_set(edge_index):
    edges = set(zip(*edge_index.tolist()))
    assert len(edges) == edge_index.shape[1], "an edge appears twice"
    return edges


@pytest.mark.parametrize("num_nodes", [0, 1, 2, 30, 500])
@pytest.mark.parametrize("loop", [False, True])
@pytest.mark.parametrize("batched", [False, True])
def test_radius_graph_finds_exactly_the_pairs_closer_than_max_radius(
    backend, num_nodes, loop, batched
):
    pos = torch.randn(num_nodes, 3) * 2
    batch = torch.randint(0, 3, (num_nodes,)) if batched else None  # unsorted on purpose
    edge_index = radius_graph(pos, 1.1, batch=batch, loop=loop)
    assert edge_index.dtype == torch.long and edge_index.shape[0] == 2
    assert edge_set(edge_index) == brute_force_edges(pos, 1.1, batch, loop)


def test_both_backends_give_the_same_edges_on_a_dense_batched_cloud():
    pytest.importorskip("torch_cluster")
    pos = torch.rand(3000, 3) * 6
    batch = torch.arange(3000) // 1000
    for loop in (False, True):
        by_torch = radius_graph(pos, 0.8, batch=batch, loop=loop, backend="torch")
        by_pyg = radius_graph(pos, 0.8, batch=batch, loop=loop, backend="pyg")
        assert edge_set(by_torch) == edge_set(by_pyg)


def test_radius_graph_rows_are_source_then_destination_and_edge_vec_points_to_the_source(backend):
    pos = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [5.0, 0.0, 0.0]])
    edge_index = radius_graph(pos, 1.0)
    assert edge_set(edge_index) == {(0, 1), (1, 0)}
    vec = edge_vectors(pos, torch.tensor([[1], [0]]))  # message from 1 to centre 0
    assert torch.equal(vec, torch.tensor([[0.5, 0.0, 0.0]]))


def test_points_exactly_at_the_cutoff_are_not_connected_and_coincident_points_are(backend):
    pos = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [3.0, 3.0, 3.0]])
    assert edge_set(radius_graph(pos, 1.0)) == {(0, 2), (2, 0)}


def test_a_cloud_far_from_the_origin_loses_no_pair():
    # float32 positions near 1e4 with max_radius 0.5: cell indices must not suffer from rounding.
    pos = (torch.rand(400, 3) * 3 + 1e4).double().float()
    assert edge_set(radius_graph(pos, 0.5, backend="torch")) == brute_force_edges(pos, 0.5)


def test_the_neighbor_cap_keeps_the_nearest_neighbors(backend):
    pos = torch.randn(300, 3)
    full = radius_graph(pos, 1.5)
    capped = radius_graph(pos, 1.5, max_num_neighbors=5)
    for i in range(300):
        neighbours = full[0, full[1] == i]
        kept = capped[0, capped[1] == i]
        assert len(kept) == min(5, len(neighbours))
        dist = (pos[neighbours] - pos[i]).norm(dim=1).sort().values
        kept_dist = (pos[kept] - pos[i]).norm(dim=1).sort().values
        assert torch.equal(kept_dist, dist[: len(kept)])


def test_both_backends_keep_the_same_nearest_neighbors_under_a_cap():
    pytest.importorskip("torch_cluster")
    pos = torch.randn(300, 3)
    for loop in (False, True):
        by_torch = radius_graph(pos, 1.5, loop=loop, max_num_neighbors=5, backend="torch")
        by_pyg = radius_graph(pos, 1.5, loop=loop, max_num_neighbors=5, backend="pyg")
        assert edge_set(by_torch) == edge_set(by_pyg)
        assert torch.bincount(by_torch[1]).max() == 5


def test_no_cap_by_default_unlike_torch_cluster():
    pos = torch.randn(200, 3) * 0.1  # everyone sees everyone: 199 neighbours each
    edge_index = radius_graph(pos, 10.0)
    assert torch.equal(torch.bincount(edge_index[1]), torch.full((200,), 199))


def test_the_cell_list_is_chunked_when_candidates_are_many(monkeypatch):
    import se3tutor.graph as graph

    monkeypatch.setattr(graph, "_MAX_CANDIDATES_PER_CHUNK", 500)
    pos = torch.randn(400, 3)
    edges = _radius_graph_cells(pos, 1.0, None, False, None)
    assert edge_set(edges) == brute_force_edges(pos, 1.0)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"pos": torch.randn(5, 2)}, "pos must have shape"),
        ({"pos": torch.randint(0, 3, (5, 3))}, "floating-point"),
        ({"max_radius": -1.0}, "max_radius"),
        ({"batch": torch.zeros(4, dtype=torch.long)}, "batch must have shape"),
        ({"batch": torch.zeros(5)}, "batch must be an integer"),
        ({"batch": torch.tensor([0, 0, -1, 1, 1])}, "batch entries must be >= 0"),
        ({"max_num_neighbors": -2}, "max_num_neighbors"),
        ({"backend": "cupy"}, "backend"),
    ],
)
def test_radius_graph_rejects_bad_input_naming_the_argument(kwargs, error):
    args = {"pos": torch.randn(5, 3), "max_radius": 1.0, **kwargs}
    with pytest.raises((ValueError, TypeError), match=error):
        radius_graph(**args)


def naive_scatter(src, index, dim_size, reduce):
    out = []
    for i in range(dim_size):
        rows = src[index == i]
        if len(rows) == 0:
            out.append(torch.full(src.shape[1:], 1.0 if reduce == "mul" else 0.0))
        else:
            op = {"sum": torch.sum, "mean": torch.mean, "mul": torch.prod}.get(reduce)
            out.append(
                op(rows, dim=0)
                if op
                else getattr(rows, "amax" if reduce == "max" else "amin")(dim=0)
            )
    return torch.stack(out)


@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "min", "mul"])
def test_scatter_reduces_rows_that_share_an_index(backend, reduce):
    src = torch.randn(50, 4, dtype=torch.float64)
    index = torch.randint(0, 12, (50,))
    out = scatter(src, index, dim=0, dim_size=15, reduce=reduce)  # slots 12..14 are empty
    torch.testing.assert_close(out, naive_scatter(src, index, 15, reduce))


def test_scatter_along_a_later_dimension(backend):
    src = torch.randn(3, 10)
    index = torch.randint(0, 4, (10,))
    out = scatter(src, index, dim=1, dim_size=4)
    torch.testing.assert_close(out, naive_scatter(src.T, index, 4, "sum").T)


def test_both_scatter_backends_give_equal_sums():
    pytest.importorskip("torch_scatter")
    src = torch.randn(10000, 8, dtype=torch.float64)
    index = torch.randint(0, 500, (10000,))
    by_torch = scatter(src, index, dim_size=500, backend="torch")
    by_pyg = scatter(src, index, dim_size=500, backend="pyg")
    torch.testing.assert_close(by_torch, by_pyg, rtol=0, atol=1e-12)


def test_scatter_rejects_an_index_of_the_wrong_length():
    with pytest.raises(ValueError, match="index has 3 entries"):
        scatter(torch.randn(4, 2), torch.tensor([0, 1, 0]))


def test_segment_softmax_sums_to_one_per_destination_and_matches_the_plain_formula():
    logits = torch.randn(40, 1, dtype=torch.float64)
    index = torch.randint(0, 6, (40,))
    alpha = segment_softmax(logits, index, 8)
    z = scatter(logits.exp(), index, dim_size=8)
    torch.testing.assert_close(alpha, logits.exp() / z[index])
    totals = scatter(alpha, index, dim_size=8)[torch.unique(index)]
    torch.testing.assert_close(totals, torch.ones_like(totals))


def test_segment_softmax_is_finite_where_plain_exp_overflows():
    logits = torch.tensor([1000.0, 999.0, -1000.0])
    alpha = segment_softmax(logits, torch.tensor([0, 0, 1]), 2)
    assert not torch.isfinite(logits.exp()).all()
    torch.testing.assert_close(alpha, torch.tensor([1 / (1 + torch.e**-1), 1 / (1 + torch.e), 1.0]))


def test_segment_softmax_weights_the_numerator_and_guards_zero_weights():
    logits = torch.tensor([0.0, 0.0, 50.0, 3.0])
    weight = torch.tensor([1.0, 0.5, 0.0, 0.0])
    alpha = segment_softmax(logits, torch.tensor([0, 0, 0, 1]), 2, weight=weight)
    # Destination 0: the zero-weight edge with the largest logit does not count; destination
    # 1 has only zero weights, so every alpha is 0 instead of 0/0.
    torch.testing.assert_close(alpha, torch.tensor([2 / 3, 1 / 3, 0.0, 0.0]))


def test_segment_softmax_with_log_weights_equals_the_weighted_one():
    logits = torch.randn(50, 3, dtype=torch.float64)
    index = torch.randint(0, 8, (50,))
    weight = torch.rand(50, dtype=torch.float64)
    weight[::7] = 0.0
    torch.testing.assert_close(
        segment_softmax(logits, index, 8, log_weight=weight.log()),
        segment_softmax(logits, index, 8, weight=weight),
    )
    with pytest.raises(ValueError, match="not both"):
        segment_softmax(logits, index, 8, weight=weight, log_weight=weight.log())


def test_segment_softmax_gradients_stay_finite_when_every_weight_underflows():
    # c(r) of a lone neighbour at 0.999 max_radius is exp(-100) ~ 4e-44: subnormal in float32, and
    # the weighted form's backward divides by its square (0). In log form z >= 1.
    logits = torch.zeros(2, requires_grad=True)
    index = torch.tensor([0, 0])
    log_weight = torch.tensor([-100.0, -101.0], requires_grad=True)
    alpha = segment_softmax(logits, index, 1, log_weight=log_weight)
    grads = torch.autograd.grad((alpha * torch.tensor([1.0, 2.0])).sum(), [logits, log_weight])
    assert all(torch.isfinite(g).all() for g in grads)
    (weighted_grad,) = torch.autograd.grad(
        segment_softmax(logits, index, 1, weight=log_weight.detach().exp()).sum(), logits
    )
    assert not torch.isfinite(weighted_grad).all()  # the failure the log form avoids


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_radius_graph_refuses_non_finite_positions_on_both_backends(backend, bad):
    pos = torch.randn(10, 3)
    pos[3, 1] = bad
    with pytest.raises(ValueError, match="pos has non-finite entries"):
        radius_graph(pos, 1.0)


def test_on_cuda_the_radius_graph_is_the_cell_list_unless_a_call_asks(monkeypatch):
    # torch-cluster's CUDA search allocates num_nodes^2 indices to find every neighbour, and a
    # CPU-only build fails on CUDA tensors: the environment variable does not switch it on.
    from se3tutor.graph import _radius_graph_backend

    monkeypatch.setenv("SE3TUTOR_BACKEND", "pyg")
    assert _radius_graph_backend(None, torch.device("cuda")) == "torch"
    monkeypatch.setenv("SE3TUTOR_BACKEND", "torch")
    assert _radius_graph_backend(None, torch.device("cpu")) == "torch"
    if importlib.util.find_spec("torch_cluster"):
        assert _radius_graph_backend("pyg", torch.device("cuda")) == "pyg"  # asked for


@pytest.mark.parametrize("bad_entry", [10, -1], ids=["too large", "negative"])
def test_an_edge_index_out_of_range_is_refused_by_name(bad_entry):
    # A negative index would silently pick a node from the end; one too large fails deep inside.
    from se3tutor import Convolution, SE3Transformer

    pos, f = torch.randn(10, 3), torch.randn(10, 4)
    edge_index = torch.tensor([[0, 1, 2], [1, 2, 3]])
    edge_index[0, 1] = bad_entry
    message = rf"edge_index must hold node indices in \[0, 10\), got {bad_entry}"
    transformer = SE3Transformer("4x0e", "8x0e + 4x1o", "1x0e", max_radius=2.0, num_layers=1)
    with pytest.raises(ValueError, match=message):
        transformer(f, pos, edge_index=edge_index)
    convolution = Convolution("4x0e", "4x0e", "1x0e + 1x1o", 8, max_radius=2.0, num_neighbors=2)
    with pytest.raises(ValueError, match=message):
        convolution(f, pos, edge_index=edge_index)
    edge_index[0, 1] = 9
    assert transformer(f, pos, edge_index=edge_index).shape == (10, 1)  # in range: accepted
