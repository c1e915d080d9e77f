"""se3tutor.dense.SE3Transformer: the se3-transformer-pytorch 0.9.0 interface, keyword by
keyword (its README's examples, at smaller sizes), with behaviour checks, not just runs."""

import functools

import pytest
import torch
from e3nn import o3

from se3tutor.checks import default_dtype
from se3tutor.dense import SE3Transformer, fourier_encode
from se3tutor.variants import GatedScaleLayerNorm, reversible_step

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


def influence(model, feats, coors, mask, node, **kwargs):
    """Which nodes' features the output of ``node`` (batch 0) depends on."""
    feats = feats.detach().requires_grad_(True)
    out = model(feats, coors, mask, **kwargs)
    (grad,) = torch.autograd.grad(out[0, node].sum(), feats)
    return grad[0].abs().sum(dim=1) > 0


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


def chain(n):
    i = torch.arange(n)
    return (i[:, None] - i[None, :]).abs() == 1


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


def test_second_degree_neighbours_are_derived_and_embedded():
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


# ------------------------------------------------------------ variants (se3tutor.variants)

SMALL = dict(dim=8, heads=2, dim_head=4, depth=1, num_degrees=3, output_degrees=3)


def small_model(dtype=torch.float64, **kwargs):
    """Seeded, so that a variant shares the plain model's weights where it has the same ones
    (a variant creates its own parameters after the plain attention's)."""
    torch.manual_seed(0)
    with default_dtype(dtype):
        return SE3Transformer(**{**SMALL, **kwargs})


def num_params(module):
    return sum(p.numel() for p in module.parameters())


def assert_equivariant(model, dtype=torch.float64, **kwargs):
    feats, coors, mask = inputs(dim=8, dtype=dtype)
    errors = equivariance_errors(model, feats, coors, mask, **kwargs)
    assert set(errors) == {"0", "1", "2"} and max(errors.values()) < 1e-9, errors


def edge_keys_values(model):
    """Keys and values of the first layer's edges for random inputs, and that layer's input."""
    feats, coors, mask = inputs(dim=8, dtype=torch.float64)
    captured = {}
    attention = model.net.blocks[0].attention
    attention.register_forward_hook(
        lambda module, args, out: captured.update(kv=module.edge_keys_values(*args), args=args)
    )
    model(feats, coors, mask)
    return captured["kv"], captured["args"]


def test_linear_proj_keys_take_keys_from_the_neighbour_alone_with_fewer_parameters():
    plain, linear = small_model(), small_model(linear_proj_keys=True)
    attention, plain_attention = linear.net.blocks[0].attention, plain.net.blocks[0].attention
    # W_K maps the node's irreps instead of the (larger) messages' irreps.
    assert attention.h_k.irreps_in == attention.irreps_node
    saved = num_params(plain_attention.h_k) - num_params(attention.h_k)
    assert saved > 0 and num_params(plain) - num_params(linear) == saved
    # The keys do not depend on the edges' directions and lengths; the values do.
    (keys, values), (f, edges) = edge_keys_values(linear)
    other_edges = edges._replace(
        edge_sh=torch.randn_like(edges.edge_sh), edge_scalars=torch.randn_like(edges.edge_scalars)
    )
    other_keys, other_values = attention.edge_keys_values(f, other_edges)
    assert torch.equal(other_keys, keys) and (other_values - values).abs().max() > 1e-3
    assert_equivariant(linear)


def test_tie_key_values_makes_keys_equal_to_values_without_a_key_map():
    plain, tied = small_model(), small_model(tie_key_values=True)
    attention = tied.net.blocks[0].attention
    assert not hasattr(attention, "h_k")
    assert num_params(plain) - num_params(tied) == num_params(plain.net.blocks[0].attention.h_k)
    (keys, values), _ = edge_keys_values(tied)
    assert torch.equal(keys, values)
    assert_equivariant(tied)
    with pytest.raises(ValueError, match="exclude"):
        SE3Transformer(**SMALL, tie_key_values=True, linear_proj_keys=True)


def test_one_headed_key_values_share_one_key_and_value_head_between_all_query_heads():
    plain, shared = small_model(), small_model(one_headed_key_values=True)
    attention, plain_attention = shared.net.blocks[0].attention, plain.net.blocks[0].attention
    heads = attention.num_heads
    for name in ("h_k", "h_v", "h_k_self", "h_v_self"):  # attend_self is on by default
        assert num_params(getattr(plain_attention, name)) == heads * num_params(
            getattr(attention, name)
        )
    (keys, values), _ = edge_keys_values(shared)
    assert keys.shape[1] == attention.irreps_head.dim  # one head's keys per edge
    # Every query head reads the same keys: the slices of every block, head by head, agree.
    expanded = attention.expand_heads(keys)
    for (mul, ir), block in zip(attention.irreps_heads, attention.irreps_heads.slices()):
        per_head = expanded[:, block].reshape(len(keys), heads, mul // heads * ir.dim)
        torch.testing.assert_close(per_head, per_head[:, :1].expand_as(per_head))
    assert_equivariant(shared)
    assert_equivariant(small_model(one_headed_key_values=True, linear_proj_keys=True))


def test_use_null_kv_adds_a_learned_invariant_key_and_value_to_attend_to():
    plain, null = small_model(), small_model(use_null_kv=True)
    attention = null.net.blocks[0].attention
    # Learned constants of type 0e only: a weight per 0e channel of the keys, and of the values.
    assert num_params(null) - num_params(plain) == 2 * attention.irreps_kv.count("0e")
    one = torch.ones(1, 1, dtype=torch.float64)
    irreps = attention.irreps_kv
    scalar = torch.cat([torch.full((ir.dim * mul,), ir == o3.Irrep("0e")) for mul, ir in irreps])
    for constant in (attention.h_k_null(one), attention.h_v_null(one)):
        assert constant[0, ~scalar].abs().max() == 0 and constant[0, scalar].abs().min() > 0
    feats, coors, mask = inputs(dim=8, dtype=torch.float64)
    assert (null(feats, coors, mask)["1"] - plain(feats, coors, mask)["1"]).abs().max() > 1e-3
    assert_equivariant(null)
    # A node with nobody to attend to (no neighbour in the radius) gets the null value.
    lonely = small_model(use_null_kv=True, attend_self=False, valid_radius=1.0)
    attention = lonely.net.blocks[0].attention
    captured = []
    attention.register_forward_hook(lambda module, args, out: captured.append(out))
    lonely(feats, coors * 100, mask)
    null_value = attention.h_o(attention.expand_heads(attention.h_v_null(one)))
    torch.testing.assert_close(captured[0], null_value.expand_as(captured[0]))
    assert null_value.abs().max() > 1e-3


def test_global_feats_reach_every_node_and_keep_it_equivariant():
    plain, model = small_model(), small_model(global_feats_dim=5)
    attention = model.net.blocks[0].attention
    assert num_params(model) - num_params(plain) == 2 * 5 * attention.irreps_kv.count("0e")
    feats, coors, mask = inputs(dim=8, dtype=torch.float64)
    global_feats = torch.randn(B, 3, 5, dtype=torch.float64)
    out = model(feats, coors, mask, return_type=1, global_feats=global_feats)
    changed = global_feats.clone()
    changed[0] += 1.0  # graph 0's global features: all of graph 0 changes, graph 1 does not
    other = model(feats, coors, mask, return_type=1, global_feats=changed)
    assert (other[0] - out[0]).flatten(1).abs().max(dim=1).values.min() > 1e-6
    torch.testing.assert_close(other[1], out[1])
    assert_equivariant(model, global_feats=global_feats)
    with pytest.raises(ValueError, match="global_feats"):
        model(feats, coors, mask)
    with pytest.raises(ValueError, match=r"\[2, m, 5\]"):
        model(feats, coors, mask, global_feats=global_feats[..., :4])


def test_num_conv_layers_convolve_before_the_attention_and_widen_the_receptive_field():
    def seen_by_node_5(**kwargs):
        model = small_model(
            dtype=torch.float32, num_neighbors=0, attend_sparse_neighbors=True, **kwargs
        )
        return influence(model, *inputs(dim=8), 5, adj_mat=chain(N), return_type=1)

    assert seen_by_node_5().nonzero().flatten().tolist() == [4, 5, 6]
    assert seen_by_node_5(num_conv_layers=2).nonzero().flatten().tolist() == [2, 3, 4, 5, 6, 7, 8]
    model = small_model(num_conv_layers=2)
    assert len(model.net.stem) == 2 and num_params(model) > num_params(small_model())
    assert_equivariant(model)


def test_norm_gated_scale_scales_each_channel_by_a_function_of_the_nodes_norms():
    plain, gated = small_model(norm_out=True), small_model(norm_out=True, norm_gated_scale=True)
    norms = [m for m in gated.modules() if isinstance(m, GatedScaleLayerNorm)]
    assert len(norms) == 4  # before attention, before feed-forward, at the end, norm_out
    assert num_params(gated) - num_params(plain) == sum(m.gate.numel() for m in norms)
    feats, coors, mask = inputs(dim=8, dtype=torch.float64)
    gated.load_state_dict(plain.state_dict(), strict=False)  # all but the gates
    with torch.no_grad():
        for m in norms:
            m.gate.zero_()  # a zero gate is the plain norm ...
    torch.testing.assert_close(gated(feats, coors, mask), plain(feats, coors, mask))
    with torch.no_grad():
        for m in norms:
            m.gate.uniform_(-0.1, 0.1)  # ... a learned one rescales channels
    assert (gated(feats, coors, mask)["1"] - plain(feats, coors, mask)["1"]).abs().max() > 1e-3
    assert_equivariant(gated)


def trunk_with_autograd(model, f, edges):
    """The reversible blocks' equations with plain autograd: every activation stored."""
    x1 = x2 = f
    for block in model.net.blocks:
        x1, x2 = reversible_step(block, x1, x2, edges)
    return (x1 + x2) / 2


def outputs_and_gradients(model, feats, coors, mask):
    feats, coors = feats.clone().requires_grad_(), coors.clone().requires_grad_()
    model.zero_grad()
    out = model(feats, coors, mask)
    (out["0"].pow(2).sum() + out["1"].sin().sum()).backward()
    return [out["0"], out["1"], feats.grad, coors.grad] + [p.grad for p in model.parameters()]


def saved_for_backward_mb(model, num_nodes=40):
    """Memory that autograd keeps for the backward pass after a forward pass (distinct
    storages, in MB): what grows with the graph and the depth, and the peak of a plain model.
    (The resident set size of a fresh process shows the same effect, but depends on how the
    allocator reuses freed memory: too noisy for a test.)"""
    feats, coors = torch.randn(1, num_nodes, model.dim), torch.randn(1, num_nodes, 3)
    storages = {}

    def keep(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        out = model(feats, coors)
    out.sum().backward()  # and the backward pass works
    return sum(storages.values()) / 2**20


def test_splits_and_reversible_keep_less_memory_for_the_backward_pass():
    # Measured with 40 nodes: splits 5.1 -> 0.6 MB; depth 12, 23.6 -> 0.1 MB (100 nodes:
    # 31.5 -> 3.2 MB and 147 -> 0.8 MB). Peak resident memory of a fresh process, 100 nodes:
    # splits about 90 -> 50 MB, reversible about 140 -> 30 MB.
    splits = dict(dim=16, heads=1, dim_head=4, depth=1, num_degrees=2)
    one_piece = saved_for_backward_mb(SE3Transformer(**splits))  # the default 4: one piece
    assert saved_for_backward_mb(SE3Transformer(**splits, splits=8)) < 0.25 * one_piece
    model = SE3Transformer(dim=4, heads=1, dim_head=4, depth=12, num_degrees=2, reversible=True)
    reversible = saved_for_backward_mb(model)
    model.net.trunk = functools.partial(trunk_with_autograd, model)
    assert reversible < 0.05 * saved_for_backward_mb(model)


def test_splits_compute_the_same_outputs_and_gradients_in_chunks():
    one_piece, chunked = small_model(), small_model(splits=3)  # the default 4: one piece
    assert num_params(one_piece) == num_params(chunked)
    feats, coors, mask = inputs(dim=8, dtype=torch.float64)
    for a, b in zip(
        outputs_and_gradients(one_piece, feats, coors, mask),
        outputs_and_gradients(chunked, feats, coors, mask),
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # no checkpointing without gradients
        torch.testing.assert_close(chunked(feats, coors, mask), one_piece(feats, coors, mask))


def test_reversible_gives_the_outputs_and_gradients_of_its_equations_without_storing_them():
    model = small_model(depth=3, output_degrees=2, reversible=True)
    feats, coors, mask = inputs(dim=8, dtype=torch.float64)
    recomputed = outputs_and_gradients(model, feats, coors, mask)
    model.net.trunk = functools.partial(trunk_with_autograd, model)
    stored = outputs_and_gradients(model, feats, coors, mask)
    assert all(g is not None for g in recomputed)
    for a, b in zip(recomputed, stored):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert_equivariant(small_model(depth=2, reversible=True))
    with pytest.raises(ValueError, match="exclude"):
        SE3Transformer(**SMALL, reversible=True, global_feats_dim=4)


def test_rotary_position_makes_the_output_depend_on_relative_order_and_stay_equivariant():
    plain, rotary = small_model(), small_model(rotary_position=True)
    assert num_params(rotary) == num_params(plain)  # rotations, no parameters
    feats, coors, mask = inputs(dim=8, dtype=torch.float64)
    out = rotary(feats, coors, mask)
    perm = torch.randperm(N)
    permuted = rotary(feats[:, perm], coors[:, perm], mask)
    assert (permuted["1"] - out["1"][:, perm]).abs().max() > 1e-3  # not just permuted
    # Only j - i matters: a masked node in front moves every position up by one.
    front = lambda x: torch.cat([torch.zeros_like(x[:, :1]), x], dim=1)  # noqa: E731
    shifted = rotary(front(feats), front(coors), front(mask))
    for degree in out:
        torch.testing.assert_close(shifted[degree][:, 1:], out[degree])
    assert_equivariant(rotary)


def test_rotary_rel_dist_changes_the_output_and_keeps_it_permutation_and_rotation_equivariant():
    plain, rotary = small_model(), small_model(rotary_rel_dist=True)
    feats, coors, mask = inputs(dim=8, dtype=torch.float64)
    out = rotary(feats, coors, mask)
    assert (out["1"] - plain(feats, coors, mask)["1"]).abs().max() > 1e-3
    perm = torch.randperm(N)
    torch.testing.assert_close(rotary(feats[:, perm], coors[:, perm], mask)["1"], out["1"][:, perm])
    assert_equivariant(rotary)
    assert_equivariant(small_model(rotary_position=True, rotary_rel_dist=True, dim_head=8))
    with pytest.raises(ValueError, match="0e block of at least 4"):  # 2 0e channels per head
        small_model(rotary_position=True, rotary_rel_dist=True)


def egnn_model(**kwargs):
    """An EGNN model whose layers have random weights of order 1 (they start at 1e-3)."""
    model = small_model(use_egnn=True, **kwargs)
    with torch.no_grad():
        for p in model.net.layers.parameters():
            p.normal_()
    return model


def test_use_egnn_runs_egnn_layers_on_every_degree_equivariantly():
    model = egnn_model()
    assert len(model.net.layers) == SMALL["depth"] and len(model.net.blocks) == 0
    feats, coors, mask = inputs(dim=8, dtype=torch.float64)
    out = model(feats, coors, mask)
    assert min(value.abs().max() for value in out.values()) > 1e-3
    assert_equivariant(model)


def test_egnn_weights_clamp_value_bounds_the_weights_of_the_feature_updates():
    feats, coors, mask = inputs(dim=8, dtype=torch.float64)

    def output(bias, **kwargs):
        model = egnn_model(**kwargs)
        with torch.no_grad():  # phi_x(m_ij) = bias: all weights at the clamp, or far beyond
            model.net.layers[0].weight_mlp[-1].weight.zero_()
            model.net.layers[0].weight_mlp[-1].bias.fill_(bias)
        return model(feats, coors, mask)["1"]

    torch.testing.assert_close(
        output(1.0, egnn_weights_clamp_value=1.0), output(50.0, egnn_weights_clamp_value=1.0)
    )
    assert (output(1.0) - output(50.0)).abs().max() > 1e-3


def test_egnn_feedforward_adds_a_feed_forward_block_after_every_layer():
    plain, model = egnn_model(depth=2), egnn_model(depth=2, egnn_feedforward=True)
    assert len(model.net.feed_forwards) == 2 and len(plain.net.feed_forwards) == 0
    assert num_params(model) - num_params(plain) == num_params(model.net.feed_forwards)
    feats, coors, mask = inputs(dim=8, dtype=torch.float64)
    assert (model(feats, coors, mask)["1"] - plain(feats, coors, mask)["1"]).abs().max() > 1e-6
    assert_equivariant(model)


def test_egnn_hidden_dim_is_the_width_of_the_messages():
    for hidden in (8, 16):
        layer = small_model(use_egnn=True, egnn_hidden_dim=hidden).net.layers[0]
        assert layer.edge_mlp[-2].out_features == hidden == layer.weight_mlp[0].in_features
        assert layer.node_mlp[0].in_features == layer.node_norm.normalized_shape[0] + hidden
