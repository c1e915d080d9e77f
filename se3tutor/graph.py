r"""Graphs on point clouds: neighbour search, scatter and segment softmax (book: every chapter).

Edge convention, used everywhere in se3tutor
--------------------------------------------
``edge_index`` has shape ``[2, num_edges]``. Row 0 is ``edge_src`` (the neighbour :math:`j`),
row 1 is ``edge_dst`` (the centre :math:`i` that receives the message), as in PyTorch Geometric
and torch-cluster. The edge vector points from the centre to the neighbour,

.. math:: x_{ij} = x_j - x_i = \texttt{pos[edge\_src] - pos[edge\_dst]},

which is what :func:`edge_vectors` returns. (e3nn's convolution guide uses the opposite sign;
the Convolution chapter shows when that matters.)

Backends
--------
:func:`radius_graph` and :func:`scatter` call the compiled torch-cluster / torch-scatter when
they are installed (``pip install se3tutor[pyg]``) and pure-torch code otherwise. Choose per
call with ``backend="torch"`` or ``"pyg"``, or for a whole process with the environment
variable ``SE3TUTOR_BACKEND=torch|pyg``. Both give the same edge sets and the same sums. On
CUDA the radius graph is the cell list unless a call asks for ``backend="pyg"`` (see
:func:`available_backends`: torch-cluster's CUDA search needs memory quadratic in the points).

(Over 400 lines, on purpose: the edge convention, the neighbour search that produces it on
both backends and the scatter that consumes it are one idea; the pure-torch cell list is most
of the length.)
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Optional

import torch

__all__ = [
    "available_backends",
    "edge_vectors",
    "radius_graph",
    "scatter",
    "segment_softmax",
]

BACKENDS = ("torch", "pyg")

# Cells are made a hair larger than max_radius so that floating-point rounding in
# floor(pos / cell) can never put two points closer than max_radius two cells apart.
_CELL_MARGIN = 1e-6
# Upper bound on candidate pairs handled at once by the pure-torch search (bounds memory:
# about 40 bytes per candidate, so about 0.7 GB at this size).
_MAX_CANDIDATES_PER_CHUNK = 1 << 24


def _have_pyg(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def available_backends(device="cpu") -> dict:
    """Which backend each operation would use by default on ``device``:
    ``{"radius_graph": ..., "scatter": ...}``.

    >>> sorted(available_backends())
    ['radius_graph', 'scatter']
    >>> available_backends("cuda")["radius_graph"]  # the cell list, whatever is installed
    'torch'
    """
    return {
        "radius_graph": _radius_graph_backend(None, torch.device(device)),
        "scatter": _resolve_backend(None, "torch_scatter"),
    }


def _radius_graph_backend(backend: Optional[str], device: torch.device) -> str:
    """The radius graph's backend for tensors on ``device``. On CUDA the cell list, unless a
    call asks for ``backend="pyg"`` itself: torch-cluster's CUDA kernel is brute force and
    allocates ``num_nodes * max_num_neighbors`` indices, and finding every neighbour needs
    ``max_num_neighbors = num_nodes`` (16 N^2 bytes: 14 GB at 3e4 points); a CPU-only build
    of torch-cluster fails on CUDA tensors altogether. SE3TUTOR_BACKEND does not change this."""
    if device.type == "cuda" and backend is None:
        return "torch"
    return _resolve_backend(backend, "torch_cluster")


def _resolve_backend(backend: Optional[str], module: str) -> str:
    if backend is None:
        backend = os.environ.get("SE3TUTOR_BACKEND") or None
    if backend is None:
        return "pyg" if _have_pyg(module) else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "pyg" and not _have_pyg(module):
        raise ImportError(
            f"backend='pyg' needs {module}, which is not installed: "
            "pip install --no-build-isolation torch-scatter torch-cluster"
        )
    return backend


# --------------------------------------------------------------------------- neighbour search


def radius_graph(
    pos: torch.Tensor,
    max_radius: float,
    batch: Optional[torch.Tensor] = None,
    loop: bool = False,
    max_num_neighbors: Optional[int] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    r"""All pairs of points closer than ``max_radius``, as ``edge_index = [edge_src, edge_dst]``.

    .. math:: \{(j, i) : \|x_j - x_i\| < r_{max},\ \mathrm{batch}_j = \mathrm{batch}_i,\
              j \ne i \text{ unless loop}\}

    The semantics of ``torch_cluster.radius_graph`` (flow source to target), with one
    difference: ``max_num_neighbors=None`` (the default) means *no cap*. torch-cluster's default
    cap of 32 silently drops edges in dense clouds. With a cap, both backends keep each
    centre's ``max_num_neighbors`` *nearest* neighbours (torch-cluster's own cap keeps an
    arbitrary subset, in the order of its k-d tree search).

    The pure-torch backend is a cell list: points are sorted into cubes of side
    ``max_radius / CELLS_PER_RADIUS`` and each pair is looked for once, among the cubes within
    ``max_radius`` on one side of a point, so the work and memory are linear in the number of points
    at fixed density (no ``N x N`` distance matrix).

    Args:
        pos: ``[num_nodes, 3]`` positions.
        max_radius: cutoff radius (> 0); pairs at distance exactly ``max_radius`` are not connected.
        batch: ``[num_nodes]`` integer graph index of each node, or ``None`` for one graph.
        loop: include self-loops ``(i, i)``.
        max_num_neighbors: cap on the number of neighbours of each centre, or ``None``.
        backend: ``"torch"``, ``"pyg"`` or ``None`` (see module docstring).

    Returns:
        ``edge_index``: ``[2, num_edges]`` long tensor (edges in no particular order).

    >>> pos = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [2.0, 0.0, 0.0]])
    >>> radius_graph(pos, 1.0, backend="torch")
    tensor([[1, 0],
            [0, 1]])
    """
    _check_positions(pos)
    if not bool(torch.isfinite(pos).all()):  # (a device sync, like the batch check below)
        raise ValueError("pos has non-finite entries (NaN or inf): no distances to compare")
    if not (isinstance(max_radius, (int, float)) and 0 < max_radius < float("inf")):
        raise ValueError(f"max_radius must be a positive finite number, got {max_radius!r}")
    batch = _check_batch(batch, pos)
    if batch is not None and batch.numel() > 0 and bool(batch.min() < 0):
        raise ValueError("batch entries must be >= 0")  # (a device sync: not in forward)
    if max_num_neighbors is not None and (
        not isinstance(max_num_neighbors, int) or max_num_neighbors < 0
    ):
        raise ValueError(
            f"max_num_neighbors must be None or an integer >= 0, got {max_num_neighbors!r}"
        )
    if _radius_graph_backend(backend, pos.device) == "pyg":
        return _radius_graph_pyg(pos, max_radius, batch, loop, max_num_neighbors)
    return _radius_graph_cells(pos, float(max_radius), batch, loop, max_num_neighbors)


def _radius_graph_pyg(pos, max_radius, batch, loop, max_num_neighbors):
    import torch_cluster

    num_nodes = pos.shape[0]
    if num_nodes == 0:
        return torch.empty(2, 0, dtype=torch.long, device=pos.device)
    if batch is not None and num_nodes > 1 and bool((batch[1:] < batch[:-1]).any()):
        # torch-cluster assumes nodes sorted by graph; sort, search, and map back.
        order = torch.argsort(batch, stable=True)
        edge_index = _radius_graph_pyg(
            pos[order], max_radius, batch[order], loop, max_num_neighbors
        )
        return order[edge_index]
    # No cap inside torch-cluster: it would keep an arbitrary subset (the order of its k-d tree
    # search, and with loop=False sometimes one neighbour too many). The nearest are kept below.
    edge_index = torch_cluster.radius_graph(
        pos,
        max_radius,
        batch=batch,
        loop=loop,
        max_num_neighbors=num_nodes,
        flow="source_to_target",
    )
    if max_num_neighbors is not None:
        edge_index = _keep_nearest(edge_index, pos, max_num_neighbors, num_nodes)
    return edge_index


# Cells have side max_radius / CELLS_PER_RADIUS, so a point's neighbours lie in the cells at most
# CELLS_PER_RADIUS steps away along each axis. Smaller cells waste fewer candidate pairs
# (the searched volume is (2k+1)^3 / k^3 max_radius^3: 27 for k = 1, 15.6 for k = 2) at the price
# of more ranges to look up per point; k = 2 is the faster on CPU (bench/radius_graph.py).
CELLS_PER_RADIUS = 2


def _forward_columns(k: int) -> list:
    """Half of the neighbouring cell columns (dx, dy) within k steps: the others are their
    negations, so a pair of points in different columns is found exactly once, from the point
    whose column is "behind". A pair inside one column is found from the point that comes
    first in sorted order."""
    return [(0, dy) for dy in range(1, k + 1)] + [
        (dx, dy) for dx in range(1, k + 1) for dy in range(-k, k + 1)
    ]


def _radius_graph_cells(pos, max_radius, batch, loop, max_num_neighbors):
    device = pos.device
    num_nodes = pos.shape[0]
    if num_nodes == 0:
        return torch.empty(2, 0, dtype=torch.long, device=device)
    pos = original_pos = pos.detach()

    # Integer cell of each point, shifted by k so that every neighbour cell index is >= 0.
    # Cell coordinates are computed in float64: float32 would lose whole cells far from 0.
    k = CELLS_PER_RADIUS
    pos64 = pos.double()
    cell_size = max_radius * (1 + _CELL_MARGIN) / k
    cell = torch.floor((pos64 - pos64.min(dim=0).values) / cell_size).long() + k
    nx, ny, nz = (int(n) + k + 1 for n in cell.max(dim=0).values.tolist())  # k empty layers
    graph = torch.zeros_like(cell[:, 0]) if batch is None else batch
    if (int(graph.max()) + 1) * nx * ny * nz >= 2**62:
        raise ValueError(
            f"radius_graph: max_radius={max_radius} is too small for the extent of pos "
            f"({nx} x {ny} x {nz} cells); rescale the positions or use a larger max_radius"
        )
    # One integer key per (graph, cell), ordered x, y, z: the cells z-k .. z+k of a column
    # have consecutive keys, so after sorting they hold one contiguous run of points.
    key = ((graph * nx + cell[:, 0]) * ny + cell[:, 1]) * nz + cell[:, 2]
    order = torch.argsort(key)
    key = key[order]
    pos = pos[order]

    # For each point (in sorted order), ranges of sorted positions hold its candidates: its
    # own column from the next point up to k cells above, and the z-runs of the forward
    # columns. Ranges are looked up once per occupied cell, then shared by its points.
    cell_key, point_cell = torch.unique_consecutive(key, return_inverse=True)
    columns = _forward_columns(k)
    column_step = torch.tensor([dx * ny * nz + dy * nz for dx, dy in columns], device=device)
    column_key = cell_key[:, None] + column_step
    first = torch.empty(num_nodes, 1 + len(columns), dtype=torch.long, device=device)
    last = torch.empty_like(first)
    first[:, 0] = torch.arange(1, num_nodes + 1, device=device)
    last[:, 0] = torch.searchsorted(key, cell_key + k, right=True)[point_cell]
    first[:, 1:] = torch.searchsorted(key, column_key - k)[point_cell]
    last[:, 1:] = torch.searchsorted(key, column_key + k, right=True)[point_cell]
    count = last - first

    edge_src, edge_dst = [], []
    for chunk in _chunks_by_work(count.sum(dim=1)):
        src, dst = _expand_ranges(chunk, first[chunk], count[chunk])
        dist2 = (pos.index_select(0, src) - pos.index_select(0, dst)).pow(2).sum(dim=1)
        keep = dist2 < max_radius * max_radius
        edge_src.append(src[keep])
        edge_dst.append(dst[keep])
    pair_a, pair_b = torch.cat(edge_src), torch.cat(edge_dst)
    # Each pair was found once: add both directions, and the self-loops if asked for.
    sources = [pair_a, pair_b]
    targets = [pair_b, pair_a]
    if loop:
        everyone = torch.arange(num_nodes, device=device)
        sources.append(everyone)
        targets.append(everyone)
    edge_index = order[torch.stack([torch.cat(sources), torch.cat(targets)])]
    if max_num_neighbors is not None:
        edge_index = _keep_nearest(edge_index, original_pos, max_num_neighbors, num_nodes)
    return edge_index


def _chunks_by_work(work: torch.Tensor):
    """Split ``arange(len(work))`` into consecutive chunks of at most ~_MAX_CANDIDATES work."""
    total = torch.cumsum(work, dim=0)
    num_chunks = int(total[-1]) // _MAX_CANDIDATES_PER_CHUNK + 1
    if num_chunks == 1:
        yield torch.arange(len(work), device=work.device)
        return
    bounds = torch.searchsorted(
        total, torch.arange(1, num_chunks, device=work.device) * _MAX_CANDIDATES_PER_CHUNK
    ).tolist()
    for start, stop in zip([0, *bounds], [*bounds, len(work)]):
        if stop > start:
            yield torch.arange(start, stop, device=work.device)


def _expand_ranges(point, first, count):
    """All pairs ``(s, point[p])`` with ``first[p, c] <= s < first[p, c] + count[p, c]``.

    Returns ``(s, point)`` as two ``[sum(count)]`` tensors. Written as running sums of
    increments (``cumsum``) rather than ``repeat_interleave`` and gathers: two passes over the
    output instead of about eight, and this is the innermost loop of the neighbour search.
    """
    num_ranges_per_point = first.shape[1]
    count = count.reshape(-1)
    nonempty = count > 0
    first = first.reshape(-1)[nonempty]
    count = count[nonempty]
    owner = point.repeat_interleave(num_ranges_per_point)[nonempty]
    if len(count) == 0:
        return first, owner
    start = torch.cumsum(count, dim=0) - count  # where each range begins in the output
    total = int(start[-1] + count[-1])
    # s increases by 1 inside a range and jumps from the last of one range to the first of
    # the next; the owner point changes only where a range begins.
    s_step = torch.ones(total, dtype=torch.long, device=point.device)
    s_step[start] = first - torch.cat([first.new_zeros(1), (first + count - 1)[:-1]])
    owner_step = torch.zeros(total, dtype=torch.long, device=point.device)
    owner_step[start] = owner - torch.cat([owner.new_zeros(1), owner[:-1]])
    return torch.cumsum(s_step, dim=0), torch.cumsum(owner_step, dim=0)


def _keep_nearest(edge_index, pos, k, num_nodes):
    """Keep the ``k`` shortest edges of each ``edge_dst`` (ties: the earlier edge wins)."""
    edge_src, edge_dst = edge_index
    dist2 = (pos[edge_src] - pos[edge_dst]).pow(2).sum(dim=1)
    order = torch.argsort(dist2, stable=True)
    order = order[torch.argsort(edge_dst[order], stable=True)]
    edge_src, edge_dst = edge_src[order], edge_dst[order]
    degree = torch.bincount(edge_dst, minlength=num_nodes)
    first_of_dst = torch.cumsum(degree, dim=0) - degree
    rank = torch.arange(len(edge_dst), device=pos.device) - first_of_dst[edge_dst]
    keep = rank < k
    return torch.stack([edge_src[keep], edge_dst[keep]])


def edge_vectors(pos: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
    r"""Edge vectors :math:`x_{ij} = x_j - x_i` = ``pos[edge_src] - pos[edge_dst]``, ``[E, 3]``.

    They point from the centre (``edge_dst``) to the neighbour (``edge_src``).

    >>> pos = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    >>> edge_vectors(pos, torch.tensor([[1], [0]]))  # neighbour 1 seen from centre 0
    tensor([[1., 0., 0.]])
    """
    edge_src, edge_dst = edge_index
    return pos[edge_src] - pos[edge_dst]


# --------------------------------------------------------------------------- scatter

_REDUCTIONS = ("sum", "add", "mean", "max", "min", "mul")


def scatter(
    src: torch.Tensor,
    index: torch.Tensor,
    dim: int = 0,
    dim_size: Optional[int] = None,
    reduce: str = "sum",
    backend: Optional[str] = None,
) -> torch.Tensor:
    r"""Reduce the slices of ``src`` along ``dim`` that share an ``index`` (as torch-scatter).

    .. math:: \mathrm{out}_i = \bigoplus_{e : \mathrm{index}_e = i} \mathrm{src}_e

    with :math:`\oplus` one of sum (or "add"), mean, max, min, mul. Empty slots are 0 (1 for
    mul), as in torch-scatter. The pure-torch backend exists so that the package needs no
    compiled extension; its sum is ``torch.Tensor.index_add_``, as fast as torch-scatter's.

    Args:
        src: tensor whose dimension ``dim`` runs over the items (edges, usually).
        index: ``[src.shape[dim]]`` integer slot of each item.
        dim_size: number of slots (default ``index.max() + 1``; pass it to avoid a sync).

    >>> scatter(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 0]), dim_size=3)
    tensor([4., 2., 0.])
    """
    if reduce not in _REDUCTIONS:
        raise ValueError(f"reduce must be one of {_REDUCTIONS}, got {reduce!r}")
    dim = dim % src.dim() if src.dim() > 0 else 0
    if index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"index must be a 1-d integer tensor, got shape {tuple(index.shape)} "
            f"and dtype {index.dtype}"
        )
    if index.shape[0] != src.shape[dim]:
        raise ValueError(
            f"index has {index.shape[0]} entries but src has {src.shape[dim]} along dim={dim}"
        )
    if index.device != src.device:
        raise TypeError(f"index is on {index.device} but src is on {src.device}")
    if dim_size is None:
        dim_size = int(index.max()) + 1 if index.numel() > 0 else 0
    # Under torch.compile the pure-torch scatter: dynamo cannot trace torch-scatter's kernels.
    compiling = torch.compiler.is_compiling()
    if not compiling and _resolve_backend(backend, "torch_scatter") == "pyg":
        import torch_scatter

        return torch_scatter.scatter(src, index.long(), dim, dim_size=dim_size, reduce=reduce)
    return _scatter_torch(src, index.long(), dim, dim_size, reduce)


def _scatter_torch(src, index, dim, dim_size, reduce):
    shape = list(src.shape)
    shape[dim] = dim_size
    if reduce in ("sum", "add", "mean"):
        out = src.new_zeros(shape).index_add_(dim, index, src)
        if reduce == "mean":
            count = torch.bincount(index, minlength=dim_size).clamp_(min=1)
            out = out / count.view([-1 if d == dim else 1 for d in range(src.dim())]).to(src.dtype)
        return out
    # max / min / mul: scatter_reduce_ on a broadcast index; empty slots stay at the fill value.
    view = [-1 if d == dim else 1 for d in range(src.dim())]
    full_index = index.view(view).expand_as(src)
    fill = 1.0 if reduce == "mul" else 0.0
    torch_reduce = {"max": "amax", "min": "amin", "mul": "prod"}[reduce]
    out = src.new_full(shape, fill)
    return out.scatter_reduce_(dim, full_index, src, reduce=torch_reduce, include_self=False)


def segment_softmax(
    logits: torch.Tensor,
    index: torch.Tensor,
    dim_size: int,
    weight: Optional[torch.Tensor] = None,
    log_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""Softmax over the edges that share a destination, computed stably.

    .. math:: \alpha_e = \frac{w_e\, e^{s_e - m_i}}{\sum_{e' \to i} w_{e'}\, e^{s_{e'} - m_i}},
              \quad m_i = \max_{e' \to i,\, w_{e'} > 0} s_{e'}

    Subtracting each destination's largest logit :math:`m_i` leaves :math:`\alpha` unchanged
    and keeps ``exp`` from overflowing. ``weight`` (e.g. a smooth cutoff, >= 0) multiplies the
    numerator; a destination whose weights are all 0 gets :math:`\alpha = 0` (the ``z == 0``
    guard of the Attention chapter).

    ``log_weight`` gives the same weights as logarithms (:math:`-\infty` for 0), added to the
    logits before the shift: the form to use when weights can be tiny. With ``weight``, a
    destination whose weights are all below ~3e-39 (float32: one over its largest number, such
    as :math:`c(r)` on a thin shell just inside the cutoff) has so small a sum :math:`z` that
    the backward pass, which divides :math:`\alpha` by :math:`z`, overflows and gives NaN
    gradients; such tiny (subnormal) weights also cost :math:`\alpha` digits. With
    ``log_weight`` the largest term is :math:`e^0 = 1`, so :math:`z \ge 1` (book: Attention,
    *A softmax that cannot overflow*).

    Args:
        logits: ``[num_edges]`` or ``[num_edges, k]``; index: ``[num_edges]`` destination of
        each edge; weight or log_weight (not both): ``[num_edges]`` or ``None``.

    >>> segment_softmax(torch.tensor([0.0, 0.0, 5.0]), torch.tensor([0, 0, 1]), 2)
    tensor([0.5000, 0.5000, 1.0000])
    >>> segment_softmax(torch.zeros(3), torch.tensor([0, 0, 1]), 2,
    ...                 log_weight=torch.tensor([0.0, -float("inf"), -100.0]))
    tensor([1., 0., 1.])
    """
    if weight is not None and log_weight is not None:
        raise ValueError("segment_softmax: give weight or log_weight, not both")
    scores = logits if log_weight is None else logits + _bcast(log_weight, logits)
    # Edges that do not count (weight 0, log weight -inf) must not set the shift either.
    counted = (
        scores if weight is None else scores.masked_fill(_bcast(weight, logits) == 0, -math.inf)
    )
    shift = scatter(counted.detach(), index, dim=0, dim_size=dim_size, reduce="max")
    shift = shift.nan_to_num(neginf=0.0)  # destinations without any counted edge
    # Counted edges have scores <= shift; the cap only touches zero-weight edges, whose exp
    # could otherwise overflow to inf and give 0 * inf = nan. Not .clamp(max=0): since torch
    # 2.14 its gradient at the bound is 0, and the largest score of every destination sits there.
    shifted = scores - shift[index]
    numerator = torch.exp(torch.where(shifted > 0, torch.zeros_like(shifted), shifted))
    if weight is not None:
        numerator = _bcast(weight, logits) * numerator
    z = scatter(numerator, index, dim=0, dim_size=dim_size)
    z = torch.where(z == 0, torch.ones_like(z), z)  # 0/0 when no edge counts
    return numerator / z[index]


def _bcast(weight, like):
    return weight.view(-1, *([1] * (like.dim() - 1)))


# --------------------------------------------------------------------------- input checks


def _check_positions(pos) -> None:
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"pos must be a torch.Tensor, got {type(pos).__name__}")
    if pos.dim() != 2 or pos.shape[1] != 3:
        raise ValueError(f"pos must have shape [num_nodes, 3], got {tuple(pos.shape)}")
    if not pos.is_floating_point():
        raise TypeError(f"pos must be a floating-point tensor, got {pos.dtype}")


def _check_batch(batch, pos) -> Optional[torch.Tensor]:
    if batch is None:
        return None
    if not isinstance(batch, torch.Tensor) or batch.dtype not in (torch.int32, torch.int64):
        raise TypeError("batch must be an integer torch.Tensor of shape [num_nodes]")
    if batch.shape != (pos.shape[0],):
        raise ValueError(
            f"batch must have shape [num_nodes] = [{pos.shape[0]}], got {tuple(batch.shape)}"
        )
    if batch.device != pos.device:
        raise TypeError(f"batch is on {batch.device} but pos is on {pos.device}")
    return batch.long()


def check_graph_inputs(
    module: torch.nn.Module,
    irreps_in,
    f: torch.Tensor,
    pos: torch.Tensor,
    edge_index: Optional[torch.Tensor],
    batch: Optional[torch.Tensor],
) -> None:
    """Validate the inputs of a graph layer's ``forward`` before any computation.

    Checks ``f: [num_nodes, irreps_in.dim]``, ``pos: [num_nodes, 3]``, ``edge_index:
    [2, num_edges]`` (integer), ``batch: [num_nodes]``, and that all live on one device with
    the dtype of the module's parameters, and that every entry of ``edge_index`` is a node,
    in ``[0, num_nodes)``. Raises ``ValueError`` for a wrong shape or value and ``TypeError``
    for a wrong dtype or device (the one type for both everywhere in se3tutor), naming the
    argument. The range check costs one reduction and one device sync (``SE3Transformer``
    runs these checks eagerly, outside what ``torch.compile`` traces; in a layer compiled as
    a whole, the sync is a graph break).
    """
    if not isinstance(f, torch.Tensor):
        raise TypeError(f"f must be a torch.Tensor, got {type(f).__name__}")
    _check_positions(pos)
    if f.dim() != 2 or f.shape[1] != irreps_in.dim:
        raise ValueError(
            f"f must have shape [num_nodes, {irreps_in.dim}] for irreps_in="
            f"{irreps_in}, got {tuple(f.shape)}"
        )
    if f.shape[0] != pos.shape[0]:
        raise ValueError(f"f has {f.shape[0]} nodes but pos has {pos.shape[0]}")
    if f.device != pos.device:
        raise TypeError(f"f is on {f.device} but pos is on {pos.device}")
    if f.dtype != pos.dtype:
        raise TypeError(f"f is {f.dtype} but pos is {pos.dtype}; use one dtype")
    parameter = next(module.parameters(), None)
    if parameter is not None and (parameter.dtype, parameter.device) != (f.dtype, f.device):
        raise TypeError(
            f"the module's parameters are {parameter.dtype} on {parameter.device} but f is "
            f"{f.dtype} on {f.device}; move one of them (e.g. module.to(f))"
        )
    _check_batch(batch, pos)
    if edge_index is not None:
        if not isinstance(edge_index, torch.Tensor) or edge_index.dtype not in (
            torch.int32,
            torch.int64,
        ):
            raise TypeError("edge_index must be an integer torch.Tensor of shape [2, num_edges]")
        if edge_index.dim() != 2 or edge_index.shape[0] != 2:
            raise ValueError(
                f"edge_index must have shape [2, num_edges], got {tuple(edge_index.shape)}"
            )
        if edge_index.device != pos.device:
            raise TypeError(f"edge_index is on {edge_index.device} but pos is on {pos.device}")
        if edge_index.numel() > 0:
            # A negative index would silently take a node from the end; one too large would
            # fail deep inside, with an IndexError that names no argument.
            low, high = torch.stack(torch.aminmax(edge_index)).tolist()  # one sync
            if low < 0 or high >= pos.shape[0]:
                raise ValueError(
                    f"edge_index must hold node indices in [0, {pos.shape[0]}), got "
                    f"{low if low < 0 else high}"
                )
