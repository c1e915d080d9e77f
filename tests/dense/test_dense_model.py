"""se3tutor.dense.SE3Transformer: the se3-transformer-pytorch 0.9.0 interface, keyword by
keyword (its README's examples, at smaller sizes), with behaviour checks, not just runs."""

import pytest
import torch
from dense_helpers import B, N, chain, equivariance_errors, influence, inputs

from se3tutor.checks import default_dtype
from se3tutor.dense import SE3Transformer, fourier_encode


def test_readme_basic_usage_gives_the_same_shape_and_is_invariant():
    model = SE3Transformer(dim=16, heads=2, depth=2, dim_head=8, num_degrees=4, valid_radius=10)
    feats, coors, mask = inputs()
    assert model(feats, coors, mask).shape == (B, N, 16)
    assert max(equivariance_errors(model, feats, coors, mask).values()) < 1e-4


def test_every_output_degree_is_equivariant_in_float64():
    with default_dtype(torch.float64):
        model = SE3Transformer(
            dim=8, heads=2, dim_head=4, depth=2, input_degrees=2, num_degrees=3,
            output_degrees=3, hidden_fiber_dict=None,
        )  # fmt: skip
    feats = {"0": torch.randn(B, N, 8, 1, dtype=torch.float64)}
    feats["1"] = torch.randn(B, N, 8, 3, dtype=torch.float64)
    _, coors, mask = inputs(dtype=torch.float64)
    out = model(feats, coors, mask)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "0": (B, N, 8), "1": (B, N, 8, 3), "2": (B, N, 8, 5),
    }  # fmt: skip
    errors = equivariance_errors(model, feats, coors, mask)
    assert max(errors.values()) < 1e-9, errors


def test_readme_alphafold2_example_refines_coordinates_equivariantly():
    model = SE3Transformer(
        dim=16, depth=2, input_degrees=1, num_degrees=2, output_degrees=2,
        reduce_dim_out=True, differentiable_coors=True,
    )  # fmt: skip
    feats, coors, mask = inputs()
    refined = coors + model(feats, coors, mask, return_type=1)
    assert refined.shape == (B, N, 3)
    assert equivariance_errors(model, feats, coors, mask, return_type=1)["1"] < 1e-4


def test_differentiable_coors_gradients_reach_the_coordinates():
    # (0.9.0 inverts the flag: with True it detaches the geometry.)
    model = SE3Transformer(
        dim=8, depth=1, num_degrees=2, output_degrees=2, reduce_dim_out=True,
        differentiable_coors=True,
    )  # fmt: skip
    feats, coors, mask = inputs(dim=8)
    coors.requires_grad_(True)
    model(feats, coors, mask, return_type=1).pow(2).sum().backward()
    assert coors.grad is not None and coors.grad.abs().max() > 1e-6


def test_readme_tokens_and_edge_tokens():
    model = SE3Transformer(
        num_tokens=28, dim=16, num_edge_tokens=4, edge_dim=4, depth=2, input_degrees=1,
        num_degrees=3, output_degrees=1, reduce_dim_out=True,
    )  # fmt: skip
    atoms = torch.randint(0, 28, (B, N))
    bonds = torch.randint(0, 4, (B, N, N))
    _, coors, mask = inputs()
    pred = model(atoms, coors, mask, edges=bonds, return_type=0)
    assert pred.shape == (B, N)  # what 0.9.0 returns (its README comment says (2, 32, 1))
    other_bonds = (bonds + 1) % 4
    assert (model(atoms, coors, mask, edges=other_bonds) - pred).abs().max() > 1e-4
    other_atoms = (atoms + 1) % 28
    assert (model(other_atoms, coors, mask, edges=bonds) - pred).abs().max() > 1e-4
    assert equivariance_errors(model, atoms, coors, mask, edges=bonds)["0"] < 1e-4


def test_readme_continuous_edges_with_fourier_encode():
    model = SE3Transformer(
        dim=16, depth=1, attend_self=True, num_degrees=2, output_degrees=2, edge_dim=34
    )
    feats, coors, mask = inputs()
    values = torch.randint(0, 4, (B, N, N, 2)).float()
    edges = fourier_encode(values, num_encodings=8, include_self=True)
    assert edges.shape == (B, N, N, 34)
    out = model(feats, coors, mask, edges=edges, return_type=1)
    assert out.shape == (B, N, 16, 3)
    assert (model(feats, coors, mask, edges=edges.flip(1), return_type=1) - out).abs().max() > 1e-4
    assert equivariance_errors(model, feats, coors, mask, edges=edges, return_type=1)["1"] < 1e-4


def test_valid_radius_and_num_neighbors_keep_the_nearest_within_the_radius():
    model = SE3Transformer(
        dim=8, heads=2, dim_head=4, depth=1, num_degrees=2, valid_radius=1.5, num_neighbors=3,
        attend_self=False,
    )  # fmt: skip
    feats, coors, mask = inputs(dim=8, n=20)
    distance = (coors[0] - coors[0, 0]).norm(dim=1)
    nearest = distance.argsort()[1:4]
    expected = torch.zeros(20, dtype=torch.bool)
    expected[nearest[distance[nearest] < 1.5]] = True
    expected[0] = True  # the residual connection
    assert torch.equal(influence(model, feats, coors, mask, 0), expected)


def test_attend_self_lets_a_node_attend_to_itself():
    feats, coors, mask = inputs(dim=8)
    coors = coors * 100  # nobody within valid_radius: only the node itself to attend to
    for attend_self in (False, True):
        model = SE3Transformer(
            dim=8, heads=2, dim_head=4, depth=1, num_degrees=2, valid_radius=1.0,
            attend_self=attend_self,
        )  # fmt: skip
        captured = []
        attention = model.net.blocks[0].attention
        attention.register_forward_hook(lambda module, args, out, seen=captured: seen.append(out))
        model(feats, coors, mask)
        assert (captured[0].abs().max() > 1e-3) == attend_self


def test_sparse_neighbors_alone_connect_only_adjacent_nodes():
    model = SE3Transformer(
        dim=8, heads=2, dim_head=4, depth=1, num_degrees=2, valid_radius=10,
        attend_sparse_neighbors=True, num_neighbors=0, max_sparse_neighbors=8,
    )  # fmt: skip
    feats, coors, mask = inputs(dim=8)
    seen = influence(model, feats, coors, mask, 5, adj_mat=chain(N))
    expected = torch.zeros(N, dtype=torch.bool)
    expected[[4, 5, 6]] = True
    assert torch.equal(seen, expected)


def test_second_degree_neighbors_are_derived_and_embedded():
    model = SE3Transformer(
        dim=8, heads=2, dim_head=4, depth=1, attend_self=True, num_degrees=2, output_degrees=2,
        num_neighbors=0, attend_sparse_neighbors=True, num_adj_degrees=2, adj_dim=4,
    )  # fmt: skip
    feats, coors, mask = inputs(dim=8)
    seen = influence(model, feats, coors, mask, 5, adj_mat=chain(N), return_type=1)
    expected = torch.zeros(N, dtype=torch.bool)
    expected[[3, 4, 5, 6, 7]] = True
    assert torch.equal(seen, expected)
    degrees = model._adjacency(chain(N), 1, N, "cpu")[0, 5]
    assert degrees[[3, 4, 6, 7]].tolist() == [2, 1, 1, 2] and degrees[[0, 5, 9]].tolist() == [0] * 3


def test_neighbor_mask_removes_the_masked_pairs():
    model = SE3Transformer(
        dim=8, heads=2, dim_head=4, depth=1, num_degrees=2, num_neighbors=8, attend_self=True
    )
    feats, coors, mask = inputs(dim=8)
    neighbor_mask = torch.ones(B, N, N, dtype=torch.bool)
    neighbor_mask[:, 0, 1:6] = False  # node 0 may not attend to nodes 1..5
    seen = influence(model, feats, coors, mask, 0, neighbor_mask=neighbor_mask)
    assert not seen[1:6].any() and seen[6:].sum() == 6  # 8 nearest of the 6 allowed: all


def test_causal_outputs_do_not_depend_on_later_nodes():
    model = SE3Transformer(
        dim=8, heads=2, dim_head=4, depth=2, num_degrees=2, valid_radius=10, causal=True
    )
    feats, coors, mask = inputs(dim=8)
    out = model(feats, coors, mask)
    changed_feats, changed_coors = feats.clone(), coors.clone()
    changed_feats[:, 7:] += 1.0
    changed_coors[:, 7:] += 0.5
    changed = model(changed_feats, changed_coors, mask)
    torch.testing.assert_close(changed[:, :7], out[:, :7])
    assert (changed[:, 7:] - out[:, 7:]).abs().max() > 1e-4


def test_masked_nodes_have_no_influence_and_zero_output():
    model = SE3Transformer(dim=8, heads=2, dim_head=4, depth=2, num_degrees=2)
    feats, coors, mask = inputs(dim=8)
    mask[:, -3:] = False
    out = model(feats, coors, mask)
    assert torch.equal(out[:, -3:], torch.zeros_like(out[:, -3:]))
    changed = feats.clone()
    changed[:, -3:] = 100.0
    torch.testing.assert_close(model(changed, coors, mask), out)


def test_return_pooled_is_the_masked_mean():
    model = SE3Transformer(dim=8, depth=1, num_degrees=2, output_degrees=2)
    feats, coors, mask = inputs(dim=8)
    mask[1, 4:] = False
    nodes = model(feats, coors, mask, return_type=1)
    pooled = model(feats, coors, mask, return_type=1, return_pooled=True)
    assert pooled.shape == (B, 8, 3)
    torch.testing.assert_close(pooled[1], nodes[1, :4].mean(dim=0))


def test_dim_in_dim_out_out_fiber_and_norm_out_shape_the_output():
    model = SE3Transformer(dim=8, dim_in=5, depth=1, num_degrees=2, output_degrees=2, dim_out=3)
    feats, coors, mask = inputs(dim=5)
    assert {k: tuple(v.shape) for k, v in model(feats, coors, mask).items()} == {
        "0": (B, N, 3), "1": (B, N, 3, 3),
    }  # fmt: skip
    model = SE3Transformer(
        dim=8, depth=1, num_degrees=2, out_fiber_dict={0: 4, 1: 2}, norm_out=True
    )
    out = model(torch.randn(B, N, 8), coors, mask)
    assert tuple(out["0"].shape) == (B, N, 4) and tuple(out["1"].shape) == (B, N, 2, 3)
    node_moment = torch.cat([out["0"], out["1"].flatten(2)], dim=2).pow(2).mean(dim=2)
    torch.testing.assert_close(node_moment, torch.ones(B, N), atol=1e-3, rtol=0)


def test_num_positions_breaks_permutation_invariance_on_purpose():
    model = SE3Transformer(dim=8, depth=1, num_degrees=2, num_positions=N)
    feats, coors, mask = inputs(dim=8)
    perm = torch.randperm(N)
    permuted = model(feats[:, perm], coors[:, perm], mask)
    assert (permuted - model(feats, coors, mask)[:, perm]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="num_positions"):
        model(*inputs(dim=8, n=N + 1))


def test_unknown_keywords_raise_instead_of_being_ignored():
    with pytest.raises(TypeError, match="unexpected keyword"):
        SE3Transformer(dim=8, num_degrees=2, heads_per_layer=3)
    SE3Transformer(dim=8, num_degrees=2, reversible=False, splits=4)  # defaults are fine


def test_no_basis_cache_is_needed_and_its_variables_are_harmless(monkeypatch, tmp_path):
    monkeypatch.setenv("CLEAR_CACHE", "1")
    monkeypatch.setenv("CACHE_PATH", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = SE3Transformer(dim=8, depth=1, num_degrees=2)
    feats, coors, mask = inputs(dim=8)
    out = model(feats, coors, mask)
    monkeypatch.delenv("CLEAR_CACHE")
    torch.manual_seed(0)
    torch.testing.assert_close(
        SE3Transformer(dim=8, depth=1, num_degrees=2)(feats, coors, mask), out
    )
    assert not (tmp_path / "cache").exists()


def test_bad_inputs_are_rejected_with_a_message():
    model = SE3Transformer(dim=8, depth=1, num_degrees=2)
    feats, coors, mask = inputs(dim=8)
    with pytest.raises(ValueError, match=r"degree 0 features must be \[b, n, 8, 1\]"):
        model(feats[..., :5], coors, mask)
    with pytest.raises(ValueError, match="coors"):
        model(feats, coors[..., :2], mask)
    with pytest.raises(ValueError, match="mask"):
        model(feats, coors, mask[:, :3])
    with pytest.raises(ValueError, match="adj_mat"):
        SE3Transformer(dim=8, num_degrees=2, attend_sparse_neighbors=True)(feats, coors, mask)
    with pytest.raises(ValueError, match="edge_dim"):
        SE3Transformer(dim=8, num_degrees=2, num_edge_tokens=4)
    with pytest.raises(ValueError, match="causal"):
        SE3Transformer(dim=8, num_degrees=2, causal=True, attend_self=False)


def test_masked_nodes_may_have_nan_coordinates():
    # Padding behind the mask with NaN (as users of se3-transformer-pytorch do) changes
    # nothing for the real nodes, and the padded nodes' outputs are 0.
    model = SE3Transformer(dim=8, heads=2, dim_head=4, depth=1, num_degrees=2, num_neighbors=4)
    feats, coors, mask = inputs(dim=8)
    mask[:, -3:] = False
    padded = coors.clone()
    padded[:, -3:] = float("nan")
    out, expected = model(feats, padded, mask), model(feats, coors, mask)
    assert torch.isfinite(out).all() and (out[:, -3:] == 0).all()
    torch.testing.assert_close(out, expected)


def test_edges_given_per_node_are_the_neighbours_as_in_0_9_0():
    # 0.9.0 broadcasts edges [1, n] against its [1, n, n] pair mask, so that the edge i <- j
    # carries node j's token (for b > 1 it fails); here [b, n] reads so for every b, and
    # continuous values [b, n, edge_dim] likewise.
    feats, coors, mask = inputs(dim=8)
    tokens = SE3Transformer(dim=8, depth=1, num_degrees=2, num_edge_tokens=4, edge_dim=3)
    node_tokens = torch.randint(0, 4, (B, N))
    expected = tokens(feats, coors, mask, edges=node_tokens[:, None, :].expand(B, N, N))
    torch.testing.assert_close(tokens(feats, coors, mask, edges=node_tokens), expected)
    values = SE3Transformer(dim=8, depth=1, num_degrees=2, edge_dim=3)
    node_values = torch.randn(B, N, 3)
    expected = values(feats, coors, mask, edges=node_values[:, None].expand(B, N, N, 3))
    torch.testing.assert_close(values(feats, coors, mask, edges=node_values), expected)


@pytest.mark.parametrize(
    "keywords, edges, message",
    [
        ({"num_edge_tokens": 4}, torch.zeros(B, N + 1, dtype=torch.long), r"\[b, n\] = \[2, 12\]"),
        ({"num_edge_tokens": 4}, torch.zeros(B, N, N, 3, dtype=torch.long), r"\[b, n, n\]"),
        ({"num_edge_tokens": 4}, torch.zeros(B, N, N), "integer token ids"),
        (
            {},
            torch.zeros(B, N, N, 2),
            r"\[b, n, n, 3\] = \[2, 12, 12, 3\] or, per node, \[b, n, 3\]",
        ),
    ],
    ids=["tokens per node, n wrong", "tokens with a value axis", "float tokens", "values"],
)
def test_edges_of_other_shapes_are_refused_naming_the_shapes_expected(keywords, edges, message):
    model = SE3Transformer(dim=8, depth=1, num_degrees=2, edge_dim=3, **keywords)
    feats, coors, mask = inputs(dim=8)
    error = TypeError if message == "integer token ids" else ValueError
    with pytest.raises(error, match=f"edges must be .*{message}"):
        model(feats, coors, mask, edges=edges)


@pytest.mark.parametrize(
    "keywords, message",
    [
        (dict(num_degrees="2"), "num_degrees must be an integer >= 1, got '2'"),
        (dict(num_degrees=0), "num_degrees must be an integer >= 1, got 0"),
        (dict(dim=0), "dim must be an integer >= 1, got 0"),
        (dict(dim=8.5), "dim must be an integer >= 1, got 8.5"),
        (dict(dim_head=0), "dim_head must be an integer >= 1"),
        (dict(input_degrees=0), "input_degrees must be an integer >= 1"),
        (dict(output_degrees=0), "output_degrees must be an integer >= 1"),
        (dict(dim_out=0), "dim_out must be an integer >= 1"),
        (dict(dim_in=(8, "4"), input_degrees=2), r"dim_in must be .*got \(8, '4'\)"),
        (
            dict(hidden_fiber_dict={0: 8, 1: "4"}),
            r"hidden_fiber_dict must map .*got \{0: 8, 1: '4'\}",
        ),
        (dict(hidden_fiber_dict={"0": 8}), "hidden_fiber_dict must map degrees"),
        (dict(out_fiber_dict={1: -2}), "out_fiber_dict must map degrees"),
    ],
)
def test_malformed_sizes_and_degrees_are_refused_naming_the_keyword(keywords, message):
    # (e3nn's or Python's own errors, which named no keyword, before)
    with pytest.raises(ValueError, match=message):
        SE3Transformer(**{**dict(dim=8, heads=2, dim_head=4, depth=1, num_degrees=2), **keywords})


def test_type_1_outputs_move_atoms_by_a_fraction_of_a_unit_at_initialisation():
    # The README's refinement, coors + model(...): a fresh model should nudge the atoms, not
    # throw them about. Measured with the same keywords and inputs on 5 seeds: 0.9.0 moves an
    # atom by 0.51 on average, e3nn's readout initialisation alone 1.9.
    displacements = []
    for seed in range(5):
        torch.manual_seed(seed)
        model = SE3Transformer(
            dim=64, depth=2, input_degrees=1, num_degrees=2, output_degrees=2, reduce_dim_out=True
        )
        feats, coors, mask = inputs(dim=64, n=32)
        with torch.no_grad():
            displacements.append(model(feats, coors, mask, return_type=1).norm(dim=-1).mean())
    assert 0.05 < float(torch.stack(displacements).mean()) < 0.3
