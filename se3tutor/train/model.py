"""The model of a training run: built from the options, saved and loaded, compiled for
evaluation, and evaluated (used by :mod:`se3tutor.train.loop`)."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from se3tutor.checks import default_dtype
from se3tutor.data import stress_of
from se3tutor.graph import available_backends
from se3tutor.potential import EnergyModel, predicted_batches
from se3tutor.tensor_product import prepare_tensor_products
from se3tutor.train import distributed
from se3tutor.train.config import DTYPES, SetupError, TrainConfig

__all__ = ["build_model", "compile_for_inference", "evaluate", "load_model", "model_options"]


def model_options(config: TrainConfig, species: list) -> dict:
    return dict(
        species=species,
        irreps_hidden=config.irreps_hidden,
        max_radius=config.max_radius,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
    )


def build_model(options: dict, dtype: str) -> EnergyModel:
    with default_dtype(DTYPES[dtype]):  # e3nn builds its constants in the default dtype
        return EnergyModel(**options)


def load_model(path) -> EnergyModel:
    """The trained model that :func:`fit` saved in ``path`` (its ``model.pt``, or the file)."""
    path = Path(path)
    file = path / "model.pt" if path.is_dir() else path
    saved = torch.load(file, map_location="cpu", weights_only=True)  # trained on a GPU or not
    model = build_model(saved["options"], saved["dtype"])
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def compile_for_inference(model: EnergyModel) -> EnergyModel:
    """A copy of ``model`` whose transformer blocks are compiled by ``torch.compile``, for
    evaluation (energies and forces, ``model.eval()``). Copy the parameters in before use
    (``compiled.load_state_dict(model.state_dict())``): that recompiles nothing.

    Not for training: the force loss differentiates the forces, a gradient, once more, and
    torch.compile (AOTAutograd) cannot differentiate a compiled backward twice. torch-scatter has no
    fake-tensor kernels that torch.compile could trace, so the pure-torch backend is needed
    (``SE3TUTOR_BACKEND=torch``).
    """
    if available_backends()["scatter"] != "torch":
        raise SetupError("torch.compile needs the pure-torch backend: SE3TUTOR_BACKEND=torch")
    compiled = prepare_tensor_products(copy.deepcopy(model).eval())
    for block in compiled.transformer.blocks:
        block.compile()
    return compiled


def evaluate(model: EnergyModel, structures: Sequence, batch_size: int = 16, processes=None):
    """Errors of ``model`` on ``structures``: ``energy_mae_per_atom`` (eV/atom, the mean over
    structures of :math:`|\\hat E_b - E_b| / N_b`), ``force_mae`` and ``force_rmse`` (eV/Å, over
    force components), and, when some structures have a stress, ``stress_mae`` (eV/Å³, over
    their stress components). Several ``processes`` share the structures and sum their errors."""
    parameter = next(model.parameters())
    processes = processes or distributed.Processes(0, 1, parameter.device)
    was_training = model.training
    stresses = sum(stress_of(atoms) is not None for atoms in structures)
    # |dE|/N, |dF|, dF^2, |d sigma|
    sums = torch.zeros(4, dtype=torch.float64, device=parameter.device)
    mine = distributed.shard(structures, processes)
    for data, energy, forces, *stress in predicted_batches(
        model, mine, batch_size, stress=stresses > 0
    ):
        atoms_per_graph = torch.bincount(data["batch"], minlength=len(energy))
        energy_error = ((energy - data["energy"]) / atoms_per_graph).double()
        force_error = (forces - data["forces"]).double()
        stress_error = energy_error.new_zeros(())
        if stress:
            has_stress = data["has_stress"][:, None, None]
            difference = (stress[0] - data["stress"]).double().abs()
            stress_error = torch.where(has_stress, difference, 0.0).sum()
        sums += torch.stack(
            [
                energy_error.abs().sum(),
                force_error.abs().sum(),
                force_error.pow(2).sum(),
                stress_error,
            ]
        )
    model.train(was_training)
    if processes.world_size > 1:  # each process evaluated its share
        sums = distributed.all_sum(sums)
    energy_sum, force_sum, force_square_sum, stress_sum = sums.tolist()
    num_components = 3 * sum(len(atoms) for atoms in structures)
    errors = {
        "energy_mae_per_atom": energy_sum / len(structures),
        "force_mae": force_sum / num_components,
        "force_rmse": math.sqrt(force_square_sum / num_components),
    }
    if stresses:
        errors["stress_mae"] = stress_sum / (9 * stresses)
    return errors
