"""se3tutor.data, se3tutor.potential and se3tutor.calculator: EMT data, checks that reject
bad structures by name, the energy model's forces, and the ase calculator."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from e3nn import o3

from se3tutor.calculator import SE3Calculator
from se3tutor.checks import default_dtype
from se3tutor.data import check_structures, collate, emt_clusters, fingerprint
from se3tutor.potential import EnergyModel, fit_reference_energies, predict, train_energy_model
from se3tutor.transformer import SE3Transformer


def small_model(dtype=torch.float32):
    with default_dtype(dtype):
        return EnergyModel([29, 78], "8x0e + 4x1o", max_radius=4.0, num_layers=1, num_heads=2)


def test_emt_clusters_are_seeded_labelled_and_different():
    first, second = emt_clusters(3, seed=1), emt_clusters(3, seed=1)
    assert all(np.array_equal(a.positions, b.positions) for a, b in zip(first, second))
    assert {len(atoms) for atoms in emt_clusters(12, seed=2)} == {13, 55}
    energies = [atoms.get_potential_energy() for atoms in first]
    assert len(set(energies)) == 3
    # EMT forces of a free cluster sum to zero (no external field).
    for atoms in first:
        assert np.abs(atoms.get_forces().sum(axis=0)).max() < 1e-8


def labelled(positions, energy=1.0, forces=None):
    atoms = Atoms("Cu" * len(positions), positions=positions)
    forces = np.zeros((len(positions), 3)) if forces is None else forces
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    return atoms


def with_numbers(atoms, numbers):
    atoms.numbers = numbers
    return atoms


def test_the_data_fingerprint_sees_every_change_and_nothing_else():
    structures = emt_clusters(3, shells=(2,), seed=0)

    def copy(shift=0.0):
        copies = []
        for atoms in structures:
            energy, forces = atoms.get_potential_energy(), atoms.get_forces()
            atoms = atoms.copy()
            atoms.positions[4, 2] += shift
            atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
            copies.append(atoms)
        return copies

    assert fingerprint(copy()) == fingerprint(structures)
    assert fingerprint(copy(shift=1e-9)) != fingerprint(structures)
    assert fingerprint(structures[:2]) != fingerprint(structures)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda: labelled([[0, 0, 0]]), "structure 1 .* 1 atom"),
        (lambda: labelled([[0, 0, 0], [np.nan, 0, 0]]), "structure 1 .*non-finite positions"),
        (lambda: labelled([[0, 0, 0], [1, 0, 0]], energy=np.inf), "structure 1 .*energy"),
        (lambda: labelled([[0, 0, 0], [1, 0, 0]], forces=np.zeros((3, 3))), "structure 1 .*forces"),
        (lambda: Atoms("Cu2", positions=[[0, 0, 0], [1, 0, 0]]), "structure 1 .*no energy"),
        (lambda: labelled([[0, 0, 0], [1, 0, 0], [1, 0, 0]]), "structure 1 .*atoms 1 and 2 on one"),
        (lambda: with_numbers(labelled([[0, 0, 0], [1, 0, 0]]), [29, 0]), "atomic number 0"),
    ],
)
def test_bad_structures_are_rejected_naming_the_structure(bad, message):
    good = labelled([[0, 0, 0], [2, 0, 0]])
    with pytest.raises(ValueError, match=message):
        check_structures([good, bad()])
    with pytest.raises(ValueError, match="empty"):
        check_structures([])


def test_collate_flattens_a_batch_and_rejects_unknown_species():
    structures = emt_clusters(2, shells=(2,), seed=3)
    batch = collate(structures, species=[29])
    assert batch["pos"].shape == (26, 3) and batch["forces"].shape == (26, 3)
    assert batch["batch"].tolist() == [0] * 13 + [1] * 13
    torch.testing.assert_close(
        batch["energy"].double(), torch.tensor([a.get_potential_energy() for a in structures])
    )
    with pytest.raises(ValueError, match=r"\[29\] are not in species"):
        collate(structures, species=[78])


def test_forces_are_minus_the_gradient_and_rotate_with_the_structure():
    model = small_model(torch.float64)
    batch = collate(emt_clusters(2, element="Cu", shells=(2,), seed=4), [29, 78], torch.float64)
    pos, species, graph = batch["pos"], batch["species_index"], batch["batch"]
    energy, forces = model(pos, species, graph, num_graphs=2)
    rotation = o3.rand_matrix(dtype=torch.float64)
    energy_rotated, forces_rotated = model(pos @ rotation.T + 1.0, species, graph, num_graphs=2)
    torch.testing.assert_close(energy_rotated, energy, rtol=0, atol=1e-10)
    torch.testing.assert_close(forces_rotated, forces @ rotation.T, rtol=0, atol=1e-10)
    # Finite differences of the energy along one coordinate give the force.
    step = torch.zeros_like(pos)
    step[3, 1] = 1e-5
    e_plus, _ = model(pos + step, species, graph, num_graphs=2)
    e_minus, _ = model(pos - step, species, graph, num_graphs=2)
    slope = (e_plus[0] - e_minus[0]) / 2e-5
    torch.testing.assert_close(-slope, forces[3, 1], rtol=1e-5, atol=1e-8)


def test_fit_reference_explains_the_mean_energy_per_atom():
    model = small_model()
    batch = collate(emt_clusters(8, seed=5), [29, 78])
    model.fit_reference(batch["species_index"], batch["batch"], batch["energy"], 8)
    atoms_per_graph = torch.bincount(batch["batch"]).float()
    predicted = model.reference[0] * atoms_per_graph
    assert (predicted - batch["energy"]).abs().mean() < batch["energy"].abs().mean()
    assert model.scale > 0


def test_the_calculator_runs_ase_dynamics_on_the_model():
    from ase.md.verlet import VelocityVerlet

    atoms = emt_clusters(1, shells=(2,), seed=6)[0]
    atoms.calc = SE3Calculator(small_model())
    forces = atoms.get_forces()
    assert forces.shape == (13, 3) and np.isfinite(forces).all()
    VelocityVerlet(atoms, timestep=1.0).run(3)
    assert np.isfinite(atoms.positions).all()
    atoms.numbers[0] = 1  # hydrogen: not a species of the model
    with pytest.raises(ValueError, match="unknown to the model"):
        atoms.get_potential_energy()


def test_training_lowers_the_loss_and_repeats_for_a_seed():
    structures = emt_clusters(6, shells=(2,), seed=7)

    def train():
        torch.manual_seed(0)
        model = small_model()
        return model, train_energy_model(model, structures, epochs=3, batch_size=2, lr=1e-2)

    model, losses = train()
    _, losses_again = train()
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert losses == losses_again
    assert not model.training  # left ready for evaluation
    with pytest.raises(ValueError, match="epochs >= 1"):
        train_energy_model(model, structures, epochs=0)


def test_predict_gives_each_structure_what_the_model_gives_it_alone():
    structures = emt_clusters(3, shells=(2, 3), seed=8)
    model = small_model()
    energy, forces = predict(model, structures, batch_size=2)
    assert energy.dtype == forces.dtype == torch.float64
    assert forces.shape == (sum(len(atoms) for atoms in structures), 3)
    first = 0
    for index, atoms in enumerate(structures):
        alone = collate([atoms], [29, 78])
        e, f = model(alone["pos"], alone["species_index"], alone["batch"], num_graphs=1)
        torch.testing.assert_close(energy[index], e[0].double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            forces[first : first + len(atoms)], f.double(), rtol=1e-4, atol=1e-5
        )
        first += len(atoms)


def test_energy_model_builds_the_transformer_it_is_given():
    class Variant(SE3Transformer):
        pass

    model = EnergyModel([29], "8x0e", max_radius=4.0, num_layers=1, transformer=Variant)
    assert type(model.transformer) is Variant
    assert type(small_model().transformer) is SE3Transformer


def test_reference_energies_of_a_rank_deficient_fit_are_finite_and_repeatable():
    # One fixed composition (every structure Cu13) and a species that never appears: the
    # counts matrix has rank 1 of 2. A rank-revealing fit in float64 on the CPU gives the
    # minimum-norm solution, the same bits every time, whatever the model's dtype.
    structures = emt_clusters(4, shells=(2,), seed=0)
    fits = []
    for dtype in (torch.float32, torch.float32, torch.float64):
        with default_dtype(dtype):
            model = EnergyModel([29, 78], "4x0e", max_radius=4.0, num_layers=1, num_heads=1)
        fit_reference_energies(model, structures)
        fits.append(model.reference.double())
    assert torch.isfinite(fits[0]).all() and fits[0][1] == 0  # the absent species: 0
    assert torch.equal(fits[0], fits[1])
    assert torch.allclose(fits[0], fits[2], rtol=1e-6)
