r"""Small data sets made in code, and turning structures into model inputs
(book: Learning an interatomic potential).

Structures are ase ``Atoms`` with an energy and forces attached (a single-point calculator),
so that a user's own list of ``Atoms`` works the same way as the generated ones. ase is an
optional dependency of se3tutor (``pip install ase``), imported only here.

- :func:`emt_clusters`: rattled and strained Cu/Pt/... icosahedral clusters with energies and
  forces from ase's EMT potential (about a millisecond per structure).
- :func:`emt_bulk`: rattled and strained periodic fcc crystals, with energies, forces and
  stress from EMT.
- :func:`check_structures`: rejects bad data before any training, naming the structure.
- :func:`collate`: a list of structures -> flat tensors with a ``batch`` vector (and the cells,
  periodicity and stress of crystals).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
from scipy.spatial import cKDTree

__all__ = ["check_structures", "collate", "emt_bulk", "emt_clusters", "fingerprint"]


def emt_clusters(
    num_structures: int,
    element: str = "Cu",
    shells: Sequence[int] = (2, 3),
    rattle: float = 0.15,
    strain: float = 0.05,
    seed: int = 0,
) -> list:
    r"""Icosahedral clusters of ``element`` (13 atoms for 2 shells, 55 for 3), each randomly
    strained (lattice scaled by :math:`1 + U(-\text{strain}, \text{strain})`), rattled (every
    coordinate plus :math:`N(0, \sigma^2)` with :math:`\sigma \sim U(0, \text{rattle})` Å) and
    rotated, labelled with the EMT energy (eV) and forces (eV/Å).

    >>> structures = emt_clusters(3, shells=(2,))
    >>> len(structures), len(structures[0]), structures[0].get_forces().shape
    (3, 13, (13, 3))
    """
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.cluster import Icosahedron
    from scipy.spatial.transform import Rotation

    if num_structures < 1:
        raise ValueError(f"num_structures must be >= 1, got {num_structures}")
    rng = np.random.default_rng(seed)
    structures = []
    for _ in range(num_structures):
        atoms = Icosahedron(element, noshells=int(rng.choice(shells)))
        atoms.center()
        positions = atoms.positions - atoms.positions.mean(axis=0)
        positions *= 1 + rng.uniform(-strain, strain)
        positions += rng.normal(0.0, rng.uniform(0.0, rattle), positions.shape)
        positions = positions @ Rotation.random(random_state=rng).as_matrix().T
        atoms.positions = positions
        atoms.calc = EMT()
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        structures.append(atoms)
    return structures


def emt_bulk(
    num_structures: int,
    element: str = "Cu",
    lattice_constant: float = 3.61,
    repeat: Sequence[int] = (2, 2, 2),
    rattle: float = 0.1,
    strain: float = 0.05,
    shear: float = 0.02,
    seed: int = 0,
) -> list:
    r"""Periodic fcc crystals of ``element``: the cubic cell (4 atoms) repeated ``repeat`` times,
    deformed by :math:`(1 + u) I + (A + A^T)/2` with :math:`u \sim U(-\text{strain},
    \text{strain})` and the entries of :math:`A` from :math:`U(-\text{shear}, \text{shear})`
    (a random symmetric strain on top of the scaling: each axis changes by up to
    ``strain + shear``), and rattled as
    :func:`emt_clusters` does; labelled with the EMT energy (eV), forces (eV/Å) and stress
    (eV/Å³, ase's Voigt order and sign).

    >>> crystal = emt_bulk(1)[0]
    >>> len(crystal), bool(crystal.pbc.all()), crystal.get_stress().shape
    (32, True, (6,))
    """
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    if num_structures < 1:
        raise ValueError(f"num_structures must be >= 1, got {num_structures}")
    rng = np.random.default_rng(seed)
    structures = []
    for _ in range(num_structures):
        atoms = bulk(element, "fcc", a=lattice_constant, cubic=True).repeat(tuple(repeat))
        deformation = np.eye(3) * (1 + rng.uniform(-strain, strain))
        random_shear = rng.uniform(-shear, shear, (3, 3))
        deformation += (random_shear + random_shear.T) / 2
        atoms.set_cell(atoms.cell[:] @ deformation, scale_atoms=True)
        atoms.positions += rng.normal(0.0, rng.uniform(0.0, rattle), atoms.positions.shape)
        atoms.calc = EMT()
        energy, forces, stress = (
            atoms.get_potential_energy(),
            atoms.get_forces(),
            atoms.get_stress(),
        )
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces, stress=stress)
        structures.append(atoms)
    return structures


# Atoms closer than this (Å) are on one spot: the edge between them has no direction.
COINCIDENT = 1e-6


def fingerprint(structures: Sequence) -> str:
    """SHA-256 of everything training reads from ``structures`` (atomic numbers, positions,
    energies, forces, cells and periodicity, stresses, in order): equal for the same data
    under any file name, different when a structure changes, is added or is removed.

    >>> fingerprint(emt_clusters(2, shells=(2,))) == fingerprint(emt_clusters(2, shells=(2,)))
    True
    """
    digest = hashlib.sha256()
    for atoms in structures:
        digest.update(np.array([len(atoms)]).tobytes())
        for array in (atoms.numbers, atoms.positions, atoms.get_forces(), atoms.cell[:]):
            digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
        digest.update(np.array([atoms.get_potential_energy(), *atoms.pbc], float).tobytes())
        stress = stress_of(atoms)
        if stress is not None:
            digest.update(np.ascontiguousarray(stress, dtype=np.float64).tobytes())
    return digest.hexdigest()


def stress_of(atoms) -> Optional[np.ndarray]:
    """The ``[3, 3]`` stress (eV/Å³) attached to ``atoms``, or ``None`` if it has none."""
    from ase.calculators.calculator import PropertyNotImplementedError

    try:
        return atoms.get_stress(voigt=False)
    except (PropertyNotImplementedError, RuntimeError, AttributeError):
        return None


def check_structures(structures: Sequence) -> None:
    """Raise ``ValueError`` naming the first bad structure: an empty list, an open structure
    of fewer than two atoms (a crystal may have one), an atomic number that is no element,
    non-finite positions, two atoms (or an atom and an image) on one spot, a singular or
    non-finite cell along a periodic direction, a missing or non-finite energy, forces of the
    wrong shape, a stress that is not finite or on a structure not periodic in 3D."""
    if len(structures) == 0:
        raise ValueError("no structures: the list is empty")
    for index, atoms in enumerate(structures):
        where = f"structure {index} ({atoms.get_chemical_formula()})"
        periodic = bool(atoms.pbc.any())
        if len(atoms) < (1 if periodic else 2):
            raise ValueError(f"{where} has {len(atoms)} atom(s); a graph needs at least 2")
        if not (atoms.numbers >= 1).all():
            raise ValueError(f"{where} has atomic number {atoms.numbers.min()}: not an element")
        if not np.isfinite(atoms.positions).all():
            raise ValueError(f"{where} has non-finite positions")
        if periodic:
            _check_cell_of(atoms, where)
        coincident = _coincident_pair(atoms)
        if coincident is not None:
            i, j = coincident
            what = f"atoms {i} and {j}" if i != j else f"atom {i} and its own image"
            raise ValueError(f"{where} has {what} on one spot (no direction between)")
        try:
            energy = atoms.get_potential_energy()
            forces = atoms.get_forces()
        except Exception as error:  # no calculator, or one that cannot answer
            raise ValueError(f"{where} has no energy and forces attached ({error})") from None
        if not math.isfinite(energy):
            raise ValueError(f"{where} has a non-finite energy {energy}")
        if forces.shape != (len(atoms), 3) or not np.isfinite(forces).all():
            raise ValueError(
                f"{where}: forces must be finite and of shape {(len(atoms), 3)}, got {forces.shape}"
            )
        stress = stress_of(atoms)
        if stress is not None:
            if not atoms.pbc.all():
                raise ValueError(
                    f"{where} has a stress but pbc = {atoms.pbc.tolist()}: a stress needs a "
                    "cell periodic along all three directions"
                )
            if not np.isfinite(stress).all():
                raise ValueError(f"{where} has a non-finite stress")


def _check_cell_of(atoms, where: str) -> None:
    cell = atoms.cell[:]
    if not np.isfinite(cell).all():
        raise ValueError(f"{where} has a non-finite cell")
    periodic = cell[atoms.pbc]
    if np.linalg.matrix_rank(periodic, tol=1e-6 * max(1.0, np.abs(periodic).max())) < len(periodic):
        raise ValueError(
            f"{where} has a singular cell along its periodic directions "
            f"(pbc = {atoms.pbc.tolist()}, cell = {cell.tolist()})"
        )


def _coincident_pair(atoms):
    """The first pair of atoms closer than COINCIDENT (images included), or ``None``."""
    if not atoms.pbc.any():
        pairs = cKDTree(atoms.positions).query_pairs(COINCIDENT)
        return tuple(sorted(min(pairs))) if pairs else None
    from ase.neighborlist import neighbor_list

    first, second = neighbor_list("ij", atoms, COINCIDENT, self_interaction=False)
    if len(first) == 0:
        return None
    return tuple(sorted((int(first[0]), int(second[0]))))


def collate(
    structures: Sequence,
    species: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> dict:
    """Flat tensors for a list of structures (PyTorch Geometric convention).

    ``species`` lists the atomic numbers the model knows; ``species_index`` gives each atom's
    position in it. Returns ``pos [N, 3]``, ``species_index [N]``, ``batch [N]``,
    ``energy [B]``, ``forces [N, 3]``, ``cell [B, 3, 3]`` (rows the cell vectors; ase's zeros
    for open structures), ``pbc [B, 3]`` (bool), ``stress [B, 3, 3]`` (eV/Å³; zeros where a
    structure has none) and ``has_stress [B]`` (bool), on ``device`` (default: the CPU).

    >>> batch = collate(emt_clusters(2, shells=(2,)), species=[29])
    >>> batch["pos"].shape, batch["batch"].tolist()[::13], batch["energy"].shape
    (torch.Size([26, 3]), [0, 1], torch.Size([2]))
    >>> batch["pbc"].any().item(), batch["has_stress"].tolist()
    (False, [False, False])
    """
    check_structures(structures)
    lookup = {int(z): i for i, z in enumerate(species)}
    numbers = np.concatenate([atoms.numbers for atoms in structures])
    unknown = sorted(set(numbers.tolist()) - set(lookup))
    if unknown:
        raise ValueError(f"atomic numbers {unknown} are not in species={list(species)}")
    sizes = torch.tensor([len(atoms) for atoms in structures])
    stresses = [stress_of(atoms) for atoms in structures]
    batch = {
        "pos": torch.tensor(np.concatenate([a.positions for a in structures]), dtype=dtype),
        "species_index": torch.tensor([lookup[int(z)] for z in numbers]),
        "batch": torch.arange(len(structures)).repeat_interleave(sizes),
        "energy": torch.tensor([a.get_potential_energy() for a in structures], dtype=dtype),
        "forces": torch.tensor(np.concatenate([a.get_forces() for a in structures]), dtype=dtype),
        "cell": torch.tensor(np.stack([a.cell[:] for a in structures]), dtype=dtype),
        "pbc": torch.tensor(np.stack([a.pbc for a in structures])),
        "stress": torch.tensor(
            np.stack([np.zeros((3, 3)) if s is None else s for s in stresses]), dtype=dtype
        ),
        "has_stress": torch.tensor([s is not None for s in stresses]),
    }
    return {key: value.to(device) for key, value in batch.items()}
