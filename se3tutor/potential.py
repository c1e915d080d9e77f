r"""An interatomic potential from the SE(3)-Transformer (book: Learning an interatomic
potential); :class:`se3tutor.calculator.SE3Calculator` runs it in ase.

.. math:: E = \sum_i \big(s\, \varepsilon_i + e_{Z_i}\big), \qquad
          F_i = -\frac{\partial E}{\partial x_i}

The per-atom energies :math:`\varepsilon_i` are the invariant (``0e``) outputs of an
:class:`se3tutor.SE3Transformer` whose inputs are one-hot species; :math:`e_Z` are per-species
reference energies and :math:`s` a scale (both fitted to the data by
:meth:`EnergyModel.fit_reference`). Because :math:`E` is invariant, the forces, its negative
gradient, rotate with the structure; because the model is smooth at the cutoff, so are they.

:func:`train_energy_model` fits a model to structures with energies and forces (ase ``Atoms``,
e.g. from :func:`se3tutor.data.emt_clusters`); :func:`predict` evaluates it on them. The pieces
of its loop (:func:`fit_reference_energies`, :func:`adam_with_cosine_decay`,
:func:`energy_force_loss`) are those of :mod:`se3tutor.train`, which adds a validation set,
checkpoints and several processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, NamedTuple, Optional

import torch

from se3tutor.data import collate
from se3tutor.graph import scatter
from se3tutor.periodic import pbc_of
from se3tutor.transformer import SE3Transformer

__all__ = [
    "EnergyModel",
    "LossTerms",
    "crystal",
    "adam_with_cosine_decay",
    "energy_force_loss",
    "fit_reference_energies",
    "batches",
    "predict",
    "predicted_batches",
    "steps_per_epoch",
    "train_energy_model",
]


class EnergyModel(torch.nn.Module):
    """Energy (and forces) of structures from their atomic positions and species.

    Args:
        species: the atomic numbers the model knows, e.g. ``[29]`` for copper.
        irreps_hidden, max_radius, num_layers, num_heads, **options: of the
            :class:`se3tutor.SE3Transformer` that gives the per-atom energies.
        transformer: the model class (or a factory with its arguments), e.g. a variant of
            :class:`se3tutor.SE3Transformer` with another radial part.

    ``forward(pos, species_index, batch, num_graphs)`` returns ``(energy [num_graphs],
    forces [N, 3])``; the forces are differentiable (for a force loss) when training. For
    crystals pass ``cell`` (``[num_graphs, 3, 3]`` or ``[3, 3]``, rows the cell vectors) and
    ``pbc`` (default: periodic along all three); with ``stress=True`` it also returns the
    stress ``[num_graphs, 3, 3]`` (eV/Å³ in ase's sign: negative under compression),

    .. math:: \\sigma = \\frac{1}{V} \\frac{\\partial E}{\\partial \\epsilon}\\Big|_{\\epsilon=0}
              \\quad \\text{for} \\quad x \\to x (1 + \\epsilon),\\
              \\mathrm{cell} \\to \\mathrm{cell}\\,(1 + \\epsilon),

    for the structures periodic along all three directions (``V = |det cell|``; NaN for the
    others).

    >>> model = EnergyModel([29], "8x0e + 4x1o", max_radius=4.0, num_layers=1, num_heads=2)
    >>> energy, forces = model(torch.randn(5, 3), torch.zeros(5, dtype=torch.long),
    ...                        torch.zeros(5, dtype=torch.long), num_graphs=1)
    >>> energy.shape, forces.shape
    (torch.Size([1]), torch.Size([5, 3]))
    """

    def __init__(
        self,
        species: Sequence[int],
        irreps_hidden,
        max_radius: float,
        num_layers: int = 2,
        num_heads: int = 2,
        transformer: Callable[..., torch.nn.Module] = SE3Transformer,
        **options,
    ) -> None:
        super().__init__()
        self.species = [int(z) for z in species]
        self.max_radius = max_radius
        self.transformer = transformer(
            f"{len(self.species)}x0e",
            irreps_hidden,
            "1x0e",
            max_radius=max_radius,
            num_layers=num_layers,
            num_heads=num_heads,
            **options,
        )
        self.register_buffer("reference", torch.zeros(len(self.species)))
        self.register_buffer("scale", torch.ones(()))

    def atomic_energies(self, pos, species_index, batch, cell=None, pbc=None) -> torch.Tensor:
        """``[N]``: :math:`s\\, \\varepsilon_i + e_{Z_i}`."""
        one_hot = torch.nn.functional.one_hot(species_index, len(self.species)).to(pos.dtype)
        epsilon = self.transformer(one_hot, pos, batch=batch, cell=cell, pbc=pbc)[:, 0]
        return self.scale * epsilon + self.reference[species_index]

    def forward(
        self, pos, species_index, batch, num_graphs: int, cell=None, pbc=None, stress=False
    ):
        if stress and cell is None:
            raise ValueError("stress needs a cell: pass cell (and pbc)")
        if not pos.requires_grad:
            pos = pos.requires_grad_(True)
        inputs = [pos]
        if stress:
            # Strain each structure, atoms and cell together, by (1 + strain) about the
            # origin: dE/dstrain at strain = 0 is the volume times the stress.
            cell = cell.expand(num_graphs, 3, 3) if cell.dim() == 2 else cell
            strain = torch.zeros_like(cell, requires_grad=True)
            deformation = torch.eye(3, dtype=pos.dtype, device=pos.device) + strain
            volume = torch.linalg.det(cell).abs()
            pos = torch.einsum("nx,nxy->ny", pos, deformation[batch])
            cell = cell @ deformation
            inputs.append(strain)
        energy = self.energy(pos, species_index, batch, num_graphs, cell, pbc)
        gradients = torch.autograd.grad(energy.sum(), inputs, create_graph=self.training)
        if not stress:
            return energy, -gradients[0]
        # Only a cell periodic along all three directions has a volume (and a stress).
        bulk = pbc_of(pbc, num_graphs, pos.device).all(dim=1) & (volume > 0)
        stress = gradients[1] / torch.where(bulk, volume, 1.0)[:, None, None]
        return energy, -gradients[0], torch.where(bulk[:, None, None], stress, float("nan"))

    def energy(self, pos, species_index, batch, num_graphs: int, cell=None, pbc=None):
        """``[num_graphs]``: the energy of each structure, :math:`E = \\sum_i (s\\,
        \\varepsilon_i + e_{Z_i})`."""
        atomic = self.atomic_energies(pos, species_index, batch, cell, pbc)
        return scatter(atomic, batch, dim=0, dim_size=num_graphs)

    @torch.no_grad()
    def fit_reference(self, species_index, batch, energy, num_graphs: int) -> None:
        """Least-squares per-species energies :math:`e_Z` (energy ~ sum of atom counts times
        :math:`e_Z`) and the scale :math:`s` = RMS of what they leave unexplained per atom,
        so that the network learns an order-one correction."""
        # On the CPU in float64 with a rank-revealing solver, whatever the model's device and
        # dtype: float32 lstsq returned one of two values 1 ulp apart from call to call (which
        # broke bit-exact resume), and CUDA's only driver assumes full rank (a fixed
        # composition, or a species seen only in validation, makes the counts rank-deficient).
        energy = energy.detach().cpu().double()
        batch, species_index = batch.cpu(), species_index.cpu()
        counts = energy.new_zeros(num_graphs, len(self.species))
        counts.index_put_((batch, species_index), torch.ones_like(energy[batch]), True)
        reference = torch.linalg.lstsq(counts, energy[:, None], driver="gelsd").solution[:, 0]
        residual = energy - counts @ reference
        atoms_per_graph = counts.sum(dim=1)
        scale = (residual / atoms_per_graph.sqrt()).pow(2).mean().sqrt().clamp(min=1e-3)
        self.reference.copy_(reference)  # into the buffers' device and dtype
        self.scale.copy_(scale)


def fit_reference_energies(model: EnergyModel, structures: Sequence) -> None:
    """:meth:`EnergyModel.fit_reference` on the energies of ``structures``."""
    parameter = next(model.parameters())
    everything = collate(structures, model.species, parameter.dtype, parameter.device)
    model.fit_reference(
        everything["species_index"],
        everything["batch"],
        everything["energy"],
        num_graphs=len(structures),
    )


def crystal(data: dict, stress: bool = False) -> dict:
    """The keywords of :class:`EnergyModel` for a batch from :func:`se3tutor.data.collate`:
    ``cell`` and ``pbc`` when it holds a periodic structure or the ``stress`` is asked for
    (with ``stress=True``), ``{}`` for open structures."""
    if stress:
        return {"cell": data["cell"], "pbc": data["pbc"], "stress": True}
    if "pbc" in data and bool(data["pbc"].any()):
        return {"cell": data["cell"], "pbc": data["pbc"]}
    return {}


def adam_with_cosine_decay(model: torch.nn.Module, lr: float, total_steps: int):
    """Adam on the parameters of ``model``, and a schedule that takes its learning rate from
    ``lr`` to 0 along a cosine in ``total_steps`` calls of ``schedule.step()``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)


class LossTerms(NamedTuple):
    """The loss of a batch and its terms (0-d tensors): ``total = energy + force_weight *
    forces + stress_weight * stress``."""

    total: torch.Tensor
    energy: torch.Tensor
    forces: torch.Tensor
    stress: torch.Tensor


def energy_force_loss(
    model: Callable,
    data: dict,
    force_weight: float = 1.0,
    num_graphs: Optional[int] = None,
    num_atoms: Optional[int] = None,
    stress_weight: float = 1.0,
) -> LossTerms:
    r"""The training loss on one batch, and its energy, force and stress terms.

    .. math:: L = \frac{1}{B} \sum_b \Big(\frac{\hat E_b - E_b}{N_b}\Big)^2
              + \lambda\, \frac{1}{3N} \sum_{i} \|\hat F_i - F_i\|^2
              + \lambda_\sigma \frac{1}{9B} \sum_{b \in \text{stress}}
                \Big\|\frac{V_b}{N_b} (\hat\sigma_b - \sigma_b)\Big\|^2

    ``data`` is a batch from :func:`se3tutor.data.collate` (on the model's device), ``model``
    an :class:`EnergyModel` or a wrapper called the same way (``DistributedDataParallel``),
    :math:`\lambda` = ``force_weight``, :math:`\lambda_\sigma` = ``stress_weight``,
    :math:`N_b` the atoms and :math:`V_b` the volume of structure :math:`b`. The stress term
    sums over the structures that have a stress (crystals; 0 for a batch without any) but, like
    the energy term, divides by all :math:`B` structures, and is in the energy term's units,
    (eV/atom)²: :math:`V \sigma / N` is the virial per atom. (The 9 components of the
    symmetric 3 x 3 stress all count, the off-diagonal ones twice.)

    The loss is written as sums over the batch divided by two counts, :math:`B` =
    ``num_graphs`` structures and :math:`N` = ``num_atoms`` atoms, those of ``data`` by
    default. A process that holds a shard of a larger batch passes the counts of the whole
    batch: then the losses of the shards add up to the loss of the whole batch, however the
    atoms are spread over the shards (a mean per shard would weigh an atom of a small shard
    more than one of a large shard).

    >>> from se3tutor.data import emt_clusters
    >>> model = EnergyModel([29], "8x0e + 4x1o", max_radius=4.0, num_layers=1, num_heads=2)
    >>> structures = emt_clusters(3, shells=(2, 3))
    >>> whole = collate(structures, [29])
    >>> loss = energy_force_loss(model, whole, force_weight=0.1)
    >>> counts = dict(num_graphs=3, num_atoms=len(whole["pos"]))  # of the whole batch
    >>> shards = [collate(structures[:1], [29]), collate(structures[1:], [29])]
    >>> parts = [energy_force_loss(model, shard, 0.1, **counts).total for shard in shards]
    >>> torch.allclose(parts[0] + parts[1], loss.total)
    True
    """
    num_graphs = len(data["energy"]) if num_graphs is None else num_graphs
    num_atoms = len(data["pos"]) if num_atoms is None else num_atoms
    graphs_here = len(data["energy"])
    has_stress = data.get("has_stress")
    with_stress = stress_weight > 0 and has_stress is not None and bool(has_stress.any())
    inputs = (data["pos"], data["species_index"], data["batch"], graphs_here)
    energy, forces, *stress = model(*inputs, **crystal(data, with_stress))
    atoms_per_graph = torch.bincount(data["batch"], minlength=graphs_here)
    energy_term = ((energy - data["energy"]) / atoms_per_graph).pow(2).sum() / num_graphs
    force_term = (forces - data["forces"]).pow(2).sum() / (3 * num_atoms)
    stress_term = torch.zeros_like(energy_term)
    if with_stress:
        volume_per_atom = torch.linalg.det(data["cell"]).abs() / atoms_per_graph
        virial_error = (stress[0] - data["stress"]) * volume_per_atom[:, None, None]
        # Structures without a stress have NaN there (no volume): where() keeps them out of
        # the sum and out of the gradient.
        virial_error = torch.where(has_stress[:, None, None], virial_error, 0.0)
        stress_term = virial_error.pow(2).sum() / (9 * num_graphs)
    total = energy_term + force_weight * force_term + stress_weight * stress_term
    return LossTerms(total, energy_term, force_term, stress_term)


def batches(structures: Sequence, batch_size: int, generator=None):
    """``structures`` in batches of ``batch_size`` (the last one smaller), shuffled if a
    ``generator`` is given."""
    if generator is None:
        order = torch.arange(len(structures))
    else:
        order = torch.randperm(len(structures), generator=generator)
    for start in range(0, len(structures), batch_size):
        yield [structures[int(i)] for i in order[start : start + batch_size]]


def steps_per_epoch(num_structures: int, batch_size: int) -> int:
    """Batches in one pass over ``num_structures`` (the last one may be smaller)."""
    return (num_structures + batch_size - 1) // batch_size


def predicted_batches(
    model: EnergyModel, structures: Sequence, batch_size: int = 16, stress: bool = False
):
    """``(data, energy, forces)`` of each batch of ``structures`` in order: the batch as
    :func:`se3tutor.data.collate` makes it, on the model's device and in its dtype, and the
    model's energies and forces for it (detached); with ``stress=True`` also the stresses
    ``[batch, 3, 3]`` (NaN for structures not periodic in 3D). Puts the model in eval mode."""
    parameter = next(model.parameters())
    model.eval()
    for batch in batches(structures, batch_size):
        data = collate(batch, model.species, parameter.dtype, parameter.device)
        inputs = (data["pos"], data["species_index"], data["batch"], len(batch))
        outputs = model(*inputs, **crystal(data, stress))
        yield (data, *(output.detach() for output in outputs))


def predict(model: EnergyModel, structures: Sequence, batch_size: int = 16, stress=False):
    """The model's energies ``[len(structures)]`` (eV) and forces ``[num_atoms, 3]`` (eV/Å),
    the atoms of all structures one after the other, as float64 tensors on the CPU; with
    ``stress=True`` also the stresses ``[len(structures), 3, 3]`` (eV/Å³, NaN for structures
    not periodic in 3D).

    >>> from se3tutor.data import emt_clusters
    >>> model = EnergyModel([29], "8x0e + 4x1o", max_radius=4.0, num_layers=1, num_heads=2)
    >>> energy, forces = predict(model, emt_clusters(3, shells=(2,)))
    >>> energy.shape, forces.shape
    (torch.Size([3]), torch.Size([39, 3]))
    """
    results = [[], [], []] if stress else [[], []]
    for _, *outputs in predicted_batches(model, structures, batch_size, stress):
        for result, output in zip(results, outputs):
            result.append(output.double().cpu())
    return tuple(torch.cat(result) for result in results)


def train_energy_model(
    model: EnergyModel,
    structures: Sequence,
    epochs: int,
    batch_size: int = 8,
    lr: float = 5e-3,
    force_weight: float = 1.0,
    seed: int = 0,
    stress_weight: float = 1.0,
) -> list:
    r"""Fit ``model`` to the energies and forces (and stresses) of ``structures`` (book: Learning an
    interatomic potential); returns the mean training loss of every epoch.

    First :meth:`EnergyModel.fit_reference` on all of ``structures``; then Adam, ``epochs``
    passes over the shuffled structures (``seed``), the learning rate decaying from ``lr`` to
    0 along a cosine, on

    .. math:: L = \frac{1}{B} \sum_b \Big(\frac{\hat E_b - E_b}{N_b}\Big)^2
              + \lambda\, \frac{1}{3N} \sum_{i} \|\hat F_i - F_i\|^2

    (eV²/atom² and eV²/Å², :math:`\lambda` = ``force_weight``), with :math:`N_b` the atoms
    of structure :math:`b`, plus ``stress_weight`` times a stress term for the crystals that
    have a stress (see :func:`energy_force_loss`). Deterministic for a given ``seed`` on the
    CPU with one thread.

    >>> from se3tutor.data import emt_clusters
    >>> model = EnergyModel([29], "8x0e + 4x1o", max_radius=4.0, num_layers=1, num_heads=2)
    >>> losses = train_energy_model(model, emt_clusters(4, shells=(2,)), epochs=2)
    >>> len(losses)
    2
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"need epochs >= 1 and batch_size >= 1, got {epochs}, {batch_size}")
    parameter = next(model.parameters())
    fit_reference_energies(model, structures)
    total_steps = epochs * steps_per_epoch(len(structures), batch_size)
    optimizer, schedule = adam_with_cosine_decay(model, lr, total_steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(epochs):
        total = 0.0
        for batch in batches(structures, batch_size, generator):
            data = collate(batch, model.species, parameter.dtype, parameter.device)
            loss = energy_force_loss(model, data, force_weight, stress_weight=stress_weight).total
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.detach() * len(batch)
        losses.append(float(total) / len(structures))
    model.eval()
    return losses
