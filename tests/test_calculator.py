"""Crystals through the model and the ase calculator: the periodic graph is used, energies
are invariant and extensive, forces and stress are the derivatives of the energy."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from scipy.spatial.transform import Rotation

from se3tutor.calculator import SE3Calculator
from se3tutor.checks import default_dtype
from se3tutor.potential import EnergyModel


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    with default_dtype(torch.float64):
        model = EnergyModel([29], "8x0e + 4x1o + 2x2e", max_radius=4.0, num_layers=2)
    # A reference energy and scale of order one, so that the tests compare real numbers.
    model.reference.fill_(-0.3)
    model.scale.fill_(0.7)
    return model


def copper(*repeat, rattle=0.05, seed=0):
    """Conventional fcc copper (4 atoms per cell), repeated and rattled."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat or (1, 1, 1))
    atoms.rattle(rattle, seed=seed)
    return atoms


def energy(atoms, model):
    atoms.calc = SE3Calculator(model)
    return atoms.get_potential_energy()


def test_a_crystal_is_not_its_open_cluster(model):
    """The bug this module was written for: the cell was ignored."""
    atoms = copper()
    open_cluster = atoms.copy()
    open_cluster.pbc = False
    tripled = atoms.copy()
    tripled.cell = 3 * atoms.cell
    assert abs(energy(atoms, model) - energy(open_cluster, model)) > 1e-3
    assert abs(energy(tripled, model) - energy(open_cluster, model)) < 1e-9


def test_the_energy_is_extensive(model):
    """A 2x2x2 supercell has 8 times the energy of its cell (the same atoms, same graph)."""
    atoms = copper()
    assert energy(atoms.repeat((2, 2, 2)), model) == pytest.approx(8 * energy(atoms, model))


def test_invariant_to_lattice_translations_of_an_atom_and_rotations(model):
    atoms = copper(2, 1, 1)
    reference = energy(atoms, model)
    moved = atoms.copy()
    moved.positions[3] += 2 * atoms.cell[0] - atoms.cell[2]
    assert energy(moved, model) == pytest.approx(reference, abs=1e-10)
    rotation = Rotation.random(random_state=1).as_matrix()
    rotated = atoms.copy()
    rotated.set_cell(atoms.cell[:] @ rotation.T, scale_atoms=False)
    rotated.positions = atoms.positions @ rotation.T
    assert energy(rotated, model) == pytest.approx(reference, abs=1e-10)
    forces = SE3Calculator(model).get_forces(atoms)
    assert np.allclose(SE3Calculator(model).get_forces(rotated), forces @ rotation.T, atol=1e-9)


def test_forces_and_stress_are_derivatives_of_the_energy(model):
    atoms = copper(1, 1, 2)
    atoms.set_cell(atoms.cell[:] @ (np.eye(3) + 0.03 * np.arange(9).reshape(3, 3) / 8), True)
    calc = SE3Calculator(model)
    atoms.calc = calc
    assert np.allclose(calculate_numerical_forces(atoms, 1e-4), atoms.get_forces(), atol=1e-7)
    assert np.allclose(calculate_numerical_stress(atoms, 1e-5), atoms.get_stress(), atol=1e-7)
    assert np.abs(atoms.get_stress()).max() > 1e-3  # not zero by accident


def test_a_slab_open_along_one_direction_has_forces_but_no_stress(model):
    atoms = fcc111("Cu", size=(2, 2, 2), vacuum=4.0, a=3.61)  # pbc = (True, True, False)
    atoms.rattle(0.05, seed=2)
    calc = SE3Calculator(model)
    atoms.calc = calc
    assert np.allclose(calculate_numerical_forces(atoms, 1e-4), atoms.get_forces(), atol=1e-7)
    open_slab = atoms.copy()
    open_slab.pbc = False
    assert abs(atoms.get_potential_energy() - energy(open_slab, model)) > 1e-3
    with pytest.raises(PropertyNotImplementedError, match="periodic along all three"):
        atoms.get_stress()


def test_the_model_gives_a_batch_of_crystals_what_it_gives_each_alone(model):
    structures = [copper(seed=1), copper(1, 1, 2, seed=2)]
    pos = torch.tensor(np.concatenate([a.positions for a in structures]))
    batch = torch.tensor([0] * 4 + [1] * 8)
    cell = torch.tensor(np.stack([a.cell[:] for a in structures]))
    energies, forces, stress = model(
        pos, torch.zeros(12, dtype=torch.long), batch, 2, cell=cell, stress=True
    )
    for index, atoms in enumerate(structures):
        atoms.calc = SE3Calculator(model)
        assert float(energies[index].detach()) == pytest.approx(atoms.get_potential_energy())
        assert np.allclose(forces[batch == index].detach().numpy(), atoms.get_forces())
        voigt = stress[index].detach().numpy()[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
        assert np.allclose(voigt, atoms.get_stress())


def test_device_moves_the_model(model, device):
    calc = SE3Calculator(model, device=device)
    assert next(calc.model.parameters()).device.type == device.type
    atoms = copper()
    atoms.calc = calc
    assert atoms.get_potential_energy() == pytest.approx(energy(copper(), model.cpu()))


def test_emt_bulk_is_periodic_labelled_and_collated_beside_clusters():
    from se3tutor.data import collate, emt_bulk, emt_clusters

    crystals = emt_bulk(2, seed=3)
    assert crystals[0].pbc.all() and len(crystals[0]) == 32
    assert not np.allclose(crystals[0].cell[:], crystals[1].cell[:])  # strained differently
    data = collate([emt_clusters(1, shells=(2,))[0], *crystals], [29], torch.float64)
    assert data["pbc"].tolist() == [[False] * 3, [True] * 3, [True] * 3]
    assert data["has_stress"].tolist() == [False, True, True]
    assert np.allclose(data["stress"][2].numpy(), crystals[1].get_stress(voigt=False))
    assert np.allclose(data["cell"][1].numpy(), crystals[0].cell[:])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Atoms("Cu", cell=[2.0, 2.0, 2.0], pbc=True), None),  # one atom: a crystal
        (lambda: Atoms("Cu", cell=[2.0, 2.0, 2.0], pbc=False), "at least 2"),
        (
            lambda: Atoms("Cu2", [[0, 0, 0], [2.0, 0, 0]], cell=[2.0, 3.0, 3.0], pbc=True),
            "atoms 0 and 1 on one spot",
        ),
        (
            lambda: Atoms(
                "Cu2", [[0, 0, 0], [1, 1, 1]], cell=[[1, 0, 0], [2, 0, 0], [0, 0, 3]], pbc=True
            ),
            "singular cell",
        ),
    ],
)
def test_crystals_are_checked_with_their_images(make, message):
    from ase.calculators.singlepoint import SinglePointCalculator

    from se3tutor.data import check_structures

    atoms = make()
    atoms.calc = SinglePointCalculator(atoms, energy=0.0, forces=np.zeros((len(atoms), 3)))
    if message is None:
        check_structures([atoms])
    else:
        with pytest.raises(ValueError, match=message):
            check_structures([atoms])


def test_a_stress_on_an_open_structure_is_refused():
    from ase.calculators.singlepoint import SinglePointCalculator

    from se3tutor.data import check_structures

    atoms = Atoms("Cu2", [[0, 0, 0], [2.0, 0, 0]])
    atoms.calc = SinglePointCalculator(
        atoms, energy=0.0, forces=np.zeros((2, 3)), stress=np.zeros(6)
    )
    with pytest.raises(ValueError, match="a stress needs a cell periodic"):
        check_structures([atoms])


def test_the_stress_term_is_the_squared_virial_error_per_atom_over_all_structures(model):
    """0 against the model's own stress; for an error D on one crystal of V/N volume per
    atom, in a batch of B structures (one a cluster without stress): |D|^2 (V/N)^2 / (9 B)."""
    from se3tutor.data import collate, emt_bulk, emt_clusters
    from se3tutor.potential import energy_force_loss

    structures = [*emt_bulk(1, repeat=(1, 1, 1), seed=4), *emt_clusters(1, shells=(2,), seed=4)]
    data = collate(structures, [29], torch.float64)
    inputs = (data["pos"], data["species_index"], data["batch"], 2)
    _, _, own = model(*inputs, cell=data["cell"], pbc=data["pbc"], stress=True)
    data["stress"] = torch.where(data["has_stress"][:, None, None], own.detach(), 0.0)
    assert float(energy_force_loss(model, data).stress) == pytest.approx(0, abs=1e-20)
    error = torch.tensor([[1.0, 2.0, 0.0], [2.0, -1.0, 0.5], [0.0, 0.5, 3.0]]) * 1e-3
    data["stress"][0] += error
    volume_per_atom = structures[0].get_volume() / len(structures[0])
    expected = error.pow(2).sum() * volume_per_atom**2 / (9 * 2)
    terms = energy_force_loss(model, data, stress_weight=2.0)
    assert float(terms.stress) == pytest.approx(float(expected), rel=1e-6)  # own: to rounding
    unweighted = terms.energy + terms.forces  # force_weight 1 by default
    assert float(terms.total) == pytest.approx(float(unweighted + 2.0 * terms.stress), rel=1e-12)
