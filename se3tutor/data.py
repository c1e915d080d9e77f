r"""Small data sets made in code, and turning structures into model inputs
(book: Learning an interatomic potential).

Structures are ase ``Atoms`` with an energy and forces attached (a single-point calculator),
so that a user's own list of ``Atoms`` works the same way as the generated ones. ase is an
optional dependency of se3tutor (``pip install ase``), imported only here.

- :func:`emt_clusters`: rattled and strained Cu/Pt/... icosahedral clusters with energies and
  forces from ase's EMT potential (about a millisecond per structure).
- :func:`check_structures`: rejects bad data before any training, naming the structure.
- :func:`collate`: a list of structures -> flat tensors with a ``batch`` vector.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
from scipy.spatial import cKDTree

__all__ = ["check_structures", "collate", "emt_clusters", "fingerprint"]


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


# Atoms closer than this (Å) are on one spot: the edge between them has no direction.
COINCIDENT = 1e-6


def fingerprint(structures: Sequence) -> str:
    """SHA-256 of everything training reads from ``structures`` (atomic numbers, positions,
    energies, forces, cells and periodicity, in order): equal for the same data under any
    file name, different when a structure changes, is added or is removed.

    >>> fingerprint(emt_clusters(2, shells=(2,))) == fingerprint(emt_clusters(2, shells=(2,)))
    True
    """
    digest = hashlib.sha256()
    for atoms in structures:
        digest.update(np.array([len(atoms)]).tobytes())
        for array in (atoms.numbers, atoms.positions, atoms.get_forces(), atoms.cell[:]):
            digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
        digest.update(np.array([atoms.get_potential_energy(), *atoms.pbc], float).tobytes())
    return digest.hexdigest()


def check_structures(structures: Sequence) -> None:
    """Raise ``ValueError`` naming the first bad structure: an empty list, fewer than two
    atoms, an atomic number that is no element, non-finite positions, two atoms on one spot,
    a missing or non-finite energy, forces of the wrong shape."""
    if len(structures) == 0:
        raise ValueError("no structures: the list is empty")
    for index, atoms in enumerate(structures):
        where = f"structure {index} ({atoms.get_chemical_formula()})"
        if len(atoms) < 2:
            raise ValueError(f"{where} has {len(atoms)} atom(s); a graph needs at least 2")
        if not (atoms.numbers >= 1).all():
            raise ValueError(f"{where} has atomic number {atoms.numbers.min()}: not an element")
        if not np.isfinite(atoms.positions).all():
            raise ValueError(f"{where} has non-finite positions")
        coincident = cKDTree(atoms.positions).query_pairs(COINCIDENT)
        if coincident:
            i, j = sorted(min(coincident))
            raise ValueError(f"{where} has atoms {i} and {j} on one spot (no direction between)")
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


def collate(
    structures: Sequence,
    species: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> dict:
    """Flat tensors for a list of structures (PyTorch Geometric convention).

    ``species`` lists the atomic numbers the model knows; ``species_index`` gives each atom's
    position in it. Returns ``pos [N, 3]``, ``species_index [N]``, ``batch [N]``,
    ``energy [B]`` and ``forces [N, 3]``, on ``device`` (default: the CPU).

    >>> batch = collate(emt_clusters(2, shells=(2,)), species=[29])
    >>> batch["pos"].shape, batch["batch"].tolist()[::13], batch["energy"].shape
    (torch.Size([26, 3]), [0, 1], torch.Size([2]))
    """
    check_structures(structures)
    lookup = {int(z): i for i, z in enumerate(species)}
    numbers = np.concatenate([atoms.numbers for atoms in structures])
    unknown = sorted(set(numbers.tolist()) - set(lookup))
    if unknown:
        raise ValueError(f"atomic numbers {unknown} are not in species={list(species)}")
    sizes = torch.tensor([len(atoms) for atoms in structures])
    batch = {
        "pos": torch.tensor(np.concatenate([a.positions for a in structures]), dtype=dtype),
        "species_index": torch.tensor([lookup[int(z)] for z in numbers]),
        "batch": torch.arange(len(structures)).repeat_interleave(sizes),
        "energy": torch.tensor([a.get_potential_energy() for a in structures], dtype=dtype),
        "forces": torch.tensor(np.concatenate([a.get_forces() for a in structures]), dtype=dtype),
    }
    return {key: value.to(device) for key, value in batch.items()}
