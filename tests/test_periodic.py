"""The periodic radius graph against ase's neighbour list, and its refusals."""

import numpy as np
import pytest
import torch

from se3tutor.periodic import cell_offsets, periodic_radius_graph

ase_neighborlist = pytest.importorskip("ase.neighborlist")
from ase import Atoms  # noqa: E402


def edge_set(edge_index, shift):
    return {(int(j), int(i), *map(int, s)) for (j, i), s in zip(edge_index.T, shift)}


def ase_edge_set(positions, cell, pbc, cutoff):
    atoms = Atoms("H" * len(positions), positions=positions, cell=cell, pbc=pbc)
    i, j, shift = ase_neighborlist.neighbor_list("ijS", atoms, cutoff)
    return {(int(b), int(a), *map(int, s)) for a, b, s in zip(i, j, shift)}


def random_cell(rng, scale):
    """A triclinic cell: the identity, sheared and stretched at random (well conditioned)."""
    return scale * (np.eye(3) + 0.4 * rng.uniform(-1, 1, (3, 3)))


@pytest.mark.parametrize(
    "pbc",
    [(True, True, True), (True, False, True), (False, False, True), (False, False, False)],
)
@pytest.mark.parametrize("scale", [1.5, 4.0])  # 1.5: cells smaller than the cutoff
def test_same_edges_as_ase(backend, pbc, scale):
    rng = np.random.default_rng(hash((pbc, scale)) % 2**32)
    for _ in range(3):
        cell = random_cell(rng, scale)
        # Positions inside and outside the cell: the graph must not care.
        positions = rng.uniform(-0.5, 1.5, (7, 3)) @ cell
        cutoff = 2.5
        edge_index, shift = periodic_radius_graph(
            torch.tensor(positions), cutoff, torch.tensor(cell), torch.tensor(pbc), backend=backend
        )
        assert edge_set(edge_index, shift) == ase_edge_set(positions, cell, pbc, cutoff)
        vec = (
            torch.tensor(positions)[edge_index[0]]
            - torch.tensor(positions)[edge_index[1]]
            + cell_offsets(shift, torch.tensor(cell), edge_index[1])
        )
        assert float(vec.norm(dim=1).max()) < cutoff


def test_open_direction_with_a_zero_cell_vector():
    """ase writes a zero vector along an open direction (a slab, a wire): still a graph."""
    rng = np.random.default_rng(1)
    cell = np.array([[3.0, 0.0, 0.0], [1.0, 2.5, 0.0], [0.0, 0.0, 0.0]])
    positions = rng.uniform(0, 3, (6, 3))
    pbc = (True, True, False)
    edge_index, shift = periodic_radius_graph(
        torch.tensor(positions), 3.5, torch.tensor(cell), torch.tensor(pbc)
    )
    assert edge_set(edge_index, shift) == ase_edge_set(positions, cell, pbc, 3.5)
    assert bool((shift[:, 2] == 0).all())


def test_batch_of_structures_each_with_its_own_cell():
    rng = np.random.default_rng(2)
    cells = [random_cell(rng, 3.0), random_cell(rng, 2.0)]
    pbcs = [(True, True, True), (True, False, False)]
    positions = [rng.uniform(0, 1, (5, 3)) @ cells[0], rng.uniform(0, 1, (4, 3)) @ cells[1]]
    batch = torch.tensor([0] * 5 + [1] * 4)
    edge_index, shift = periodic_radius_graph(
        torch.tensor(np.concatenate(positions)),
        2.8,
        torch.tensor(np.stack(cells)),
        torch.tensor(pbcs),
        batch=batch,
    )
    assert bool((batch[edge_index[0]] == batch[edge_index[1]]).all())
    first = edge_index[1] < 5
    assert edge_set(edge_index[:, first], shift[first]) == ase_edge_set(
        positions[0], cells[0], pbcs[0], 2.8
    )
    second = ~first
    assert edge_set(edge_index[:, second] - 5, shift[second]) == ase_edge_set(
        positions[1], cells[1], pbcs[1], 2.8
    )


def test_fcc_copper_has_twelve_nearest_neighbours_all_images_of_itself():
    a = 3.61
    cell = torch.tensor([[0, a / 2, a / 2], [a / 2, 0, a / 2], [a / 2, a / 2, 0]])
    edge_index, shift = periodic_radius_graph(torch.zeros(1, 3), 3.0, cell)
    vec = cell_offsets(shift, cell, edge_index[1])
    assert edge_index.shape[1] == 12
    assert torch.allclose(vec.norm(dim=1), torch.full((12,), a / 2**0.5))


def test_max_num_neighbors_keeps_the_nearest_images():
    cell = torch.diag(torch.tensor([2.0, 3.0, 5.0]))
    edge_index, shift = periodic_radius_graph(torch.zeros(1, 3), 5.5, cell, max_num_neighbors=2)
    # The two nearest images of the atom are its neighbours at +-a_1 (length 2).
    assert sorted(shift.tolist()) == [[-1, 0, 0], [1, 0, 0]]


def test_refusals_name_the_problem():
    pos = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="singular"):
        periodic_radius_graph(pos, 1.0, torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [0, 0, 1.0]]))
    with pytest.raises(ValueError, match="non-finite"):
        periodic_radius_graph(pos, 1.0, torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError, match="pos has non-finite"):
        periodic_radius_graph(torch.full((2, 3), float("inf")), 1.0, torch.eye(3))
    with pytest.raises(ValueError, match="cell must have shape"):
        periodic_radius_graph(pos, 1.0, torch.eye(2))
    with pytest.raises(TypeError, match="cell is torch.float64"):
        periodic_radius_graph(pos, 1.0, torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="pbc must be"):
        periodic_radius_graph(pos, 1.0, torch.eye(3), torch.tensor([True, False]))


def crystal_model_and_inputs():
    from se3tutor.checks import default_dtype
    from se3tutor.transformer import SE3Transformer, hidden_irreps

    torch.manual_seed(0)
    with default_dtype(torch.float64):
        model = SE3Transformer("2x0e", hidden_irreps(4, 1), "1x0e + 1x1o", max_radius=2.5)
    cell = torch.tensor(random_cell(np.random.default_rng(5), 2.2))
    pos = torch.rand(5, 3, dtype=torch.float64) @ cell
    return model, torch.randn(5, 2, dtype=torch.float64), pos, cell


def test_transformer_on_a_crystal_is_equivariant_and_takes_its_own_graph():
    from scipy.spatial.transform import Rotation

    model, f, pos, cell = crystal_model_and_inputs()
    out = model(f, pos, cell=cell)
    edge_index, shift = periodic_radius_graph(pos, 2.5, cell)
    assert torch.allclose(
        model(f, pos, edge_index=edge_index, cell=cell, edge_cell_shift=shift), out
    )
    rotation = torch.tensor(Rotation.random(random_state=3).as_matrix())
    rotated = model(f, pos @ rotation.T, cell=cell @ rotation.T)
    assert torch.allclose(rotated[:, 0], out[:, 0], atol=1e-9)
    assert torch.allclose(rotated[:, 1:], out[:, 1:] @ rotation.T, atol=1e-9)
    # An atom moved by a lattice vector is the same crystal.
    moved = pos.clone()
    moved[2] += cell[0] - 2 * cell[1]
    assert torch.allclose(model(f, moved, cell=cell), out, atol=1e-9)
    assert not torch.allclose(model(f, pos), out, atol=1e-3)  # the images matter


def test_transformer_refuses_half_a_crystal():
    model, f, pos, cell = crystal_model_and_inputs()
    edge_index, shift = periodic_radius_graph(pos, 2.5, cell)
    with pytest.raises(ValueError, match="pass edge_cell_shift"):
        model(f, pos, edge_index=edge_index, cell=cell)
    with pytest.raises(ValueError, match="need the cell"):
        model(f, pos, edge_index=edge_index, edge_cell_shift=shift)
    with pytest.raises(ValueError, match="edge_cell_shift must have shape"):
        model(f, pos, edge_index=edge_index, cell=cell, edge_cell_shift=shift[:-1])
    with pytest.raises(TypeError, match="integer"):
        model(f, pos, edge_index=edge_index, cell=cell, edge_cell_shift=shift.double())
    with pytest.raises(TypeError, match="cell is torch.float32"):
        model(f, pos, cell=cell.float())
