r"""Crystals: neighbours across the faces of a periodic cell (book: Learning an interatomic
potential).

A crystal repeats its cell: with the cell vectors as the rows :math:`a_1, a_2, a_3` of
``cell``, atom :math:`j` has an image at :math:`x_j + n_1 a_1 + n_2 a_2 + n_3 a_3` for every
integer :math:`n_k` along a periodic direction. An edge therefore needs one more piece of data
than in an open structure: which image of the neighbour it goes to, an integer shift
:math:`S_{ij} = (n_1, n_2, n_3)` per edge. In se3tutor's one edge convention (see
:mod:`se3tutor.graph`):

.. math:: x_{ij} = x_j - x_i + S_{ij}\, \mathrm{cell}
          = \texttt{pos[edge\_src] - pos[edge\_dst] + edge\_cell\_shift @ cell},

the convention of ase's ``neighbor_list`` (its ``i``, ``j``, ``S`` are our ``edge_dst``,
``edge_src``, ``edge_cell_shift``). A cell smaller than the cutoff is fine: an atom then sees
several images of the same neighbour, and images of itself.

- :func:`periodic_radius_graph`: ``(edge_index, edge_cell_shift)`` for every image within
  ``max_radius``, for triclinic cells and any mix of periodic and open directions.
- :func:`cell_offsets`: ``edge_cell_shift @ cell`` per edge, the term the models add to the
  edge vectors. It is differentiable in ``cell``, which is how
  :class:`se3tutor.potential.EnergyModel` gets the stress.

The shifts are integers and found once; the geometry (``pos`` and ``cell``) enters only through
the edge vectors, so that energies are differentiable in both.
"""

from __future__ import annotations

import itertools
from typing import Optional

import torch

from se3tutor.graph import _keep_nearest, radius_graph

__all__ = [
    "cell_offsets",
    "check_cell",
    "check_periodic_inputs",
    "num_graphs_of",
    "pbc_of",
    "periodic_radius_graph",
]

# Images whose fractional coordinates lie this far outside the reach of the cutoff are still
# kept, so that rounding can never drop a pair at a distance just below max_radius.
_FRACTIONAL_MARGIN = 1e-9


def pbc_of(pbc, num_graphs: int, device) -> torch.Tensor:
    """``[num_graphs, 3]`` bools from ``None`` (periodic along all three), a bool, ``[3]`` or
    ``[num_graphs, 3]``."""
    pbc = torch.as_tensor(True if pbc is None else pbc, device=device)
    if pbc.dtype != torch.bool:
        raise TypeError(f"pbc must be booleans, got {pbc.dtype}")
    if pbc.shape not in ((), (3,), (num_graphs, 3)):
        raise ValueError(
            f"pbc must be a bool, [3] or [num_graphs, 3] = [{num_graphs}, 3], got "
            f"{tuple(pbc.shape)}"
        )
    return pbc.expand(num_graphs, 3)


def check_cell(cell, pbc, pos: torch.Tensor, num_graphs: int):
    """``(cell [num_graphs, 3, 3], pbc [num_graphs, 3] bool)`` from what a caller gives.

    ``cell``: ``[3, 3]`` (one structure) or ``[num_graphs, 3, 3]``, rows the cell vectors, in
    the dtype and on the device of ``pos``. ``pbc``: ``None`` (periodic along all three), a
    bool, ``[3]`` or ``[num_graphs, 3]``. Raises ``ValueError`` for shapes and non-finite
    entries, ``TypeError`` for dtype and device.
    """
    if not isinstance(cell, torch.Tensor):
        raise TypeError(f"cell must be a torch.Tensor, got {type(cell).__name__}")
    if cell.dtype != pos.dtype or cell.device != pos.device:
        raise TypeError(
            f"cell is {cell.dtype} on {cell.device} but pos is {pos.dtype} on {pos.device}"
        )
    if cell.shape == (3, 3):
        cell = cell.expand(num_graphs, 3, 3)
    if cell.shape != (num_graphs, 3, 3):
        raise ValueError(
            f"cell must have shape [3, 3] or [num_graphs, 3, 3] = [{num_graphs}, 3, 3], "
            f"got {tuple(cell.shape)}"
        )
    pbc = pbc_of(pbc, num_graphs, pos.device)
    if not bool(torch.isfinite(cell).all()):
        raise ValueError("cell has non-finite entries (NaN or inf)")
    return cell, pbc


def periodic_radius_graph(
    pos: torch.Tensor,
    max_radius: float,
    cell: torch.Tensor,
    pbc=None,
    batch: Optional[torch.Tensor] = None,
    num_graphs: Optional[int] = None,
    max_num_neighbors: Optional[int] = None,
    backend: Optional[str] = None,
):
    r"""Every pair (atom :math:`i`, image of atom :math:`j`) closer than ``max_radius``.

    .. math:: \{(j, i, S) : \|x_j - x_i + S\,\mathrm{cell}\| < r_{max},\ S \in \mathbb{Z}^3,\
              S_k = 0 \text{ unless pbc}_k,\ (j, S) \ne (i, 0)\}

    How: positions are wrapped into the cell (fractional coordinates in :math:`[0, 1)` along
    the periodic directions). A displacement of length :math:`r` changes the :math:`k`-th
    fractional coordinate by at most :math:`r\,|b_k|`, where :math:`b_k` is the :math:`k`-th
    column of :math:`\mathrm{cell}^{-1}` (:math:`1/|b_k|` is the spacing of the lattice planes),
    so only shifts with :math:`|n_k| \le \lceil r_{max} |b_k| \rceil` can reach the cell, and of
    their images only those within :math:`r_{max} |b_k|` of it. The atoms and those images go
    to :func:`se3tutor.radius_graph` (either backend) as one point cloud; the edges into the
    atoms themselves are kept, and the wrapping is undone in the shifts.

    Args:
        pos: ``[num_nodes, 3]`` positions (anywhere: inside the cell or not).
        max_radius: cutoff radius (> 0); pairs at exactly ``max_radius`` are not connected.
        cell: ``[3, 3]`` or ``[num_graphs, 3, 3]``, the cell vectors as rows. Along an open
            direction the vector may be zero (as ase writes it).
        pbc: periodic directions, ``None`` (all three), ``[3]`` or ``[num_graphs, 3]`` bools.
        batch: ``[num_nodes]`` graph of each node, or ``None`` for one structure.
        num_graphs: number of structures (default: ``cell.shape[0]``, or 1 for a ``[3, 3]``).
        max_num_neighbors: keep only the nearest ones per centre (as in ``radius_graph``).
        backend: of the radius graph, ``"torch"``, ``"pyg"`` or ``None``.

    Returns:
        ``edge_index [2, num_edges]`` and ``edge_cell_shift [num_edges, 3]`` (long).

    Bulk copper, fcc with one atom per cell: its 12 nearest neighbours are all images of itself.

    >>> a = 3.61
    >>> cell = torch.tensor([[0, a / 2, a / 2], [a / 2, 0, a / 2], [a / 2, a / 2, 0]])
    >>> edge_index, shift = periodic_radius_graph(torch.zeros(1, 3), 3.0, cell)
    >>> edge_index.shape[1], bool((edge_index == 0).all())
    (12, True)
    """
    if not (isinstance(max_radius, (int, float)) and 0 < max_radius < float("inf")):
        raise ValueError(f"max_radius must be a positive finite number, got {max_radius!r}")
    if not bool(torch.isfinite(pos).all()):
        raise ValueError("pos has non-finite entries (NaN or inf): no distances to compare")
    if num_graphs is None:
        num_graphs = 1 if cell.dim() == 2 else cell.shape[0]
    cell, pbc = check_cell(cell, pbc, pos, num_graphs)
    if not bool(pbc.any()):  # open structures only (e.g. a batch of clusters): one search
        edge_index = radius_graph(
            pos, max_radius, batch, max_num_neighbors=max_num_neighbors, backend=backend
        )
        return edge_index, edge_index.new_zeros(edge_index.shape[1], 3)
    if batch is None:
        batch = torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device)
    pos, cell = pos.detach().double(), cell.detach().double()
    edge_index, edge_cell_shift = [], []
    for graph in range(num_graphs):
        (nodes,) = torch.nonzero(batch == graph, as_tuple=True)
        if len(nodes) == 0:
            continue
        edges, shifts = _one_structure(
            pos[nodes], max_radius, cell[graph], pbc[graph], max_num_neighbors, backend
        )
        edge_index.append(nodes[edges])
        edge_cell_shift.append(shifts)
    if not edge_index:
        empty = torch.empty(0, dtype=torch.long, device=pos.device)
        return empty.reshape(2, 0), empty.reshape(0, 3)
    return torch.cat(edge_index, dim=1), torch.cat(edge_cell_shift)


def _one_structure(pos, max_radius, cell, pbc, max_num_neighbors, backend):
    """``periodic_radius_graph`` of one structure, in float64."""
    num_atoms = pos.shape[0]
    if not bool(pbc.any()):
        edge_index = radius_graph(
            pos, max_radius, max_num_neighbors=max_num_neighbors, backend=backend
        )
        return edge_index, edge_index.new_zeros(edge_index.shape[1], 3)
    basis = _complete_basis(cell, pbc)
    inverse = torch.linalg.inv(basis)
    fractional = pos @ inverse
    wrap = torch.where(pbc, torch.floor(fractional), torch.zeros_like(fractional))
    fractional = fractional - wrap
    reach = max_radius * inverse.norm(dim=0)  # [3]: max change of each fractional coordinate
    extent = torch.where(pbc, torch.ceil(reach), torch.zeros_like(reach)).long().tolist()
    shifts = torch.tensor(
        list(itertools.product(*(range(-n, n + 1) for n in extent))),
        dtype=pos.dtype,
        device=pos.device,
    )
    shifts = shifts[torch.argsort(shifts.abs().sum(dim=1), stable=True)]  # (0, 0, 0) first
    # Every atom in every shifted cell, then only the images near enough to the cell.
    image_fractional = fractional[None] + shifts[:, None]  # [num_shifts, num_atoms, 3]
    near = (image_fractional > -reach - _FRACTIONAL_MARGIN) & (
        image_fractional < 1 + reach + _FRACTIONAL_MARGIN
    )
    near = (near | ~pbc).all(dim=2)
    near[0] = True  # the atoms themselves (shift 0), in order: point p < num_atoms is atom p
    image_shift, image_atom = torch.nonzero(near, as_tuple=True)
    points = image_fractional[image_shift, image_atom] @ basis

    edge_src, edge_dst = radius_graph(points, max_radius, backend=backend)
    into_atoms = edge_dst < num_atoms
    edge_src, edge_dst = edge_src[into_atoms], edge_dst[into_atoms]
    if max_num_neighbors is not None:
        edge_src, edge_dst = _keep_nearest(
            torch.stack([edge_src, edge_dst]), points, max_num_neighbors, num_atoms
        )
    atom_src = image_atom[edge_src]
    # x_src + s cell - x_dst on wrapped positions = pos[src] - pos[dst] + (s - w_src + w_dst) cell
    edge_cell_shift = (shifts[image_shift[edge_src]] - wrap[atom_src] + wrap[edge_dst]).long()
    return torch.stack([atom_src, edge_dst]), edge_cell_shift


def _complete_basis(cell, pbc):
    """``cell`` with its open directions' vectors replaced, when the cell is singular (ase
    writes zero vectors there), by an orthonormal basis of the complement of the periodic
    ones. Any basis serves: along open directions there are no images."""
    periodic = cell[pbc]
    lengths = periodic.norm(dim=1)
    gram = periodic @ periodic.T
    if bool((lengths == 0).any()) or float(torch.linalg.det(gram)) <= 1e-12 * float(
        lengths.prod() ** 2
    ):
        raise ValueError(
            "cell is singular along its periodic directions (a zero or linearly dependent "
            f"cell vector): cell = {cell.tolist()}, pbc = {pbc.tolist()}"
        )
    volume = abs(float(torch.linalg.det(cell)))
    if volume > 1e-6 * float(cell.norm(dim=1).prod()):
        return cell
    _, _, vh = torch.linalg.svd(periodic, full_matrices=True)
    basis = cell.clone()
    basis[~pbc] = vh[len(periodic) :]
    return basis


def cell_offsets(
    edge_cell_shift: torch.Tensor,
    cell: torch.Tensor,
    edge_dst: torch.Tensor,
    batch: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""``[num_edges, 3]``: :math:`S_{ij}\, \mathrm{cell}_{b(i)}`, what an edge's image adds to
    ``pos[edge_src] - pos[edge_dst]`` (differentiable in ``cell``).

    ``cell`` is ``[3, 3]`` or ``[num_graphs, 3, 3]``; ``batch`` gives each node's structure.

    >>> cell = 2.0 * torch.eye(3)
    >>> cell_offsets(torch.tensor([[1, 0, -1]]), cell, torch.tensor([0]))
    tensor([[ 2.,  0., -2.]])
    """
    shift = edge_cell_shift.to(cell.dtype)
    if cell.dim() == 2:
        return shift @ cell
    graph = edge_dst.new_zeros(edge_dst.shape) if batch is None else batch[edge_dst]
    return torch.einsum("ek,ekx->ex", shift, cell[graph])


def num_graphs_of(cell: torch.Tensor, batch: Optional[torch.Tensor]) -> int:
    """Structures in the batch: one cell each, or one cell for all (a device sync)."""
    if cell.dim() == 3:
        return cell.shape[0]
    return 1 if batch is None or batch.numel() == 0 else int(batch.max()) + 1


def check_periodic_inputs(pos, batch, edge_index, cell, pbc, edge_cell_shift) -> None:
    """The cell and the shifts of a crystal: both or neither with an ``edge_index``."""
    if cell is None:
        if pbc is not None or edge_cell_shift is not None:
            raise ValueError("pbc and edge_cell_shift need the cell they refer to: pass cell")
        return
    check_cell(cell, pbc, pos, num_graphs_of(cell, batch))
    if edge_index is None:
        if edge_cell_shift is not None:
            raise ValueError("edge_cell_shift needs the edge_index its rows belong to")
        return
    if edge_cell_shift is None:
        raise ValueError(
            "with a cell and your own edge_index, pass edge_cell_shift [num_edges, 3] (which "
            "image of edge_src each edge goes to), or leave both out for the periodic radius graph"
        )
    if edge_cell_shift.shape != (edge_index.shape[1], 3):
        raise ValueError(
            f"edge_cell_shift must have shape [num_edges, 3] = [{edge_index.shape[1]}, 3], "
            f"got {tuple(edge_cell_shift.shape)}"
        )
    if edge_cell_shift.is_floating_point() or edge_cell_shift.device != pos.device:
        raise TypeError(f"edge_cell_shift must be an integer tensor on {pos.device}")
