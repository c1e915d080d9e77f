"""The structures of a training run: read or made, checked, and split (used by
:mod:`se3tutor.train.loop`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from se3tutor.data import check_structures, emt_bulk, emt_clusters
from se3tutor.train.config import SetupError, TrainConfig

__all__ = ["load_structures", "split"]


def load_structures(config: TrainConfig) -> list:
    """The structures of ``config.data``, checked (:class:`SetupError` names a bad one)."""
    if config.data == "emt":
        structures = emt_clusters(config.num_structures, shells=config.shells, seed=config.seed)
        if config.crystals > 0:
            structures += emt_bulk(config.crystals, seed=config.seed)
    else:
        from ase.io import read

        path = Path(config.data)
        if path.is_dir():
            raise SetupError(f"{path} is a directory: give a file of structures, or emt")
        if not path.exists():
            raise SetupError(f"{path}: no such file (a file of structures, or emt)")
        try:
            structures = read(config.data, ":")
        except Exception as error:  # ase raises many kinds, for files it cannot parse
            raise SetupError(
                f"cannot read {config.data} as structures with energies and forces "
                f"(ase.io.read: {type(error).__name__}: {error})"
            ) from None
    try:
        check_structures(structures)
    except ValueError as error:
        raise SetupError(f"{config.data}: {error}") from None
    return structures


def split(structures: Sequence, validation_fraction: float, seed: int) -> tuple:
    """``(training, validation)``: a seeded random choice of ``round(fraction * n)``
    structures for validation; each part keeps the structures in their original order."""
    num_validation = round(validation_fraction * len(structures))
    if not 0 <= num_validation < len(structures):
        raise SetupError(
            f"validation_fraction={validation_fraction} of {len(structures)} structures "
            "leaves none to train on"
        )
    chosen = torch.randperm(len(structures), generator=torch.Generator().manual_seed(seed))
    held_out = set(chosen[:num_validation].tolist())
    training = [atoms for i, atoms in enumerate(structures) if i not in held_out]
    validation = [atoms for i, atoms in enumerate(structures) if i in held_out]
    return training, validation
