r"""The attention layer of the SE(3)-Transformer paper, as the paper and its code write it
(book: The original SE(3)-Transformer layer).

Fuchs et al., "SE(3)-Transformers", NeurIPS 2020 (arXiv:2006.10503), Sec. 3, equation numbers of
the NeurIPS version; official code: ``equivariant_attention/modules.py`` of
github.com/FabianFuchsML/se3-transformer-public. For node :math:`i` with neighbourhood
:math:`\mathcal N_i` (:func:`knn_graph` by default; Sec. 3.1 also allows a given graph):

.. math::
    f'_i = \mathrm{SI}\Big(\sum_{j \in \mathcal N_i} \alpha_{ij}\, v_{ij} \;\oplus\; f_i\Big),
    \qquad
    \alpha_{ij} = \frac{\exp(q_i \cdot k_{ij} / \sqrt{d})}
                       {\sum_{j' \in \mathcal N_i} \exp(q_i \cdot k_{ij'} / \sqrt{d})}

- keys :math:`k_{ij} = W_K(x_{ij}) f_j` and values :math:`v_{ij} = W_V(x_{ij}) f_j` are tensor
  field network messages (Eqs. 8, 10, 11; :class:`TFNKernel`); queries
  :math:`q_i = W_Q f_i` (Eq. 11); :math:`d` is the keys' total size, all heads together
  (official ``GMABSE3``);
- the values are weighted by :math:`\alpha_{ij}` (not :math:`\sqrt{\alpha_{ij}}`), with no
  cutoff weight in the softmax;
- SI, the self-interaction, acts on the attention output concatenated with :math:`f_i` (the
  official ``GSE3Res``; Eq. (10)'s term :math:`W_V^{\ell\ell} f_i`): linear (``o3.Linear``, the
  official default ``'1x1'``) or attentive (:class:`AttentiveSelfInteraction`, Eqs. 12-13);
- between layers, the norm nonlinearity :class:`NormNonlinearity`.

**No parity.** The paper's features have a degree and no parity: its layers are equivariant
to rotations, and a mirror image is just another input. Here degree :math:`\ell` is the e3nn
irrep ``"{l}e"`` and the harmonic :math:`Y^J` is ``"{J}e"`` (:func:`so3_irreps`,
:func:`so3_harmonics`), so that e3nn allows every path of Eq. (8): the paper's SO(3) kernel.
The labels are bookkeeping: the layer is not inversion-equivariant (the tests check that).

Conventions: :math:`x_{ij} = x_j - x_i` = ``pos[edge_src] - pos[edge_dst]``, the paper's sign
(the official N-body and QM9 loaders store :math:`x_i - x_j`, which flips the odd-:math:`J`
kernels; the learned radial functions absorb the sign); the radial networks read the embedded
length (``number_of_basis`` smooth bumps, no cutoff), the official ones the raw distance.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Optional

import torch
from e3nn import o3

from se3tutor.graph import check_graph_inputs, edge_vectors, radius_graph, scatter, segment_softmax
from se3tutor.radial import embed_edge_length

__all__ = [
    "AttentiveSelfInteraction", "NormNonlinearity", "OriginalAttention", "OriginalSE3Transformer",
    "TFNKernel", "knn_graph", "radial_network", "so3_harmonics", "so3_irreps",
]  # fmt: skip


def so3_irreps(mul: int, lmax: int) -> o3.Irreps:
    """``mul`` channels of every degree ``0..lmax``, without parity (each labelled even): the
    paper's features. ``so3_irreps(4, 2)`` is ``4x0e+4x1e+4x2e``."""
    return o3.Irreps([(mul, (l, 1)) for l in range(lmax + 1)])


def so3_harmonics(lmax: int) -> o3.Irreps:
    r"""The harmonics :math:`Y^J` that Eq. (8) needs for features up to degree ``lmax``:
    :math:`J = 0, \ldots, 2 \cdot` ``lmax`` (the largest :math:`k + \ell`), labelled even:
    ``so3_harmonics(1)`` is ``1x0e+1x1e+1x2e`` (as far as the official ``get_basis`` goes)."""
    return so3_irreps(1, 2 * lmax)


def knn_graph(
    pos: torch.Tensor, num_neighbors: int, max_radius: float, batch: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Each node's ``num_neighbors`` nearest others within ``max_radius`` (same ``batch``),
    ``[edge_src, edge_dst]``: se3-transformer-pytorch's ``num_neighbors``, ``valid_radius``.
    A radius beyond every distance gives a pure nearest-neighbour graph. Not smooth: a
    neighbourhood changes at once when another node becomes nearer than its farthest one.

    >>> edge_src, edge_dst = knn_graph(torch.randn(6, 3), num_neighbors=2, max_radius=100.0)
    >>> torch.bincount(edge_dst).tolist()
    [2, 2, 2, 2, 2, 2]
    """
    return radius_graph(pos, max_radius, batch=batch, max_num_neighbors=num_neighbors)


def radial_network(number_of_basis: int, radial_hidden: int, num_outputs: int) -> torch.nn.Module:
    """The official code's radial network (``RadialFunc``): two hidden layers of ``radial_hidden``
    units with layer norm and ReLU, biases, Kaiming-uniform weights; not zero at any radius."""
    nn = torch.nn
    layers = [nn.Linear(number_of_basis, radial_hidden), nn.LayerNorm(radial_hidden), nn.ReLU()]
    layers += [nn.Linear(radial_hidden, radial_hidden), nn.LayerNorm(radial_hidden), nn.ReLU()]
    layers += [nn.Linear(radial_hidden, num_outputs)]
    for layer in layers[::3]:
        nn.init.kaiming_uniform_(layer.weight)
    return nn.Sequential(*layers)


class TFNKernel(torch.nn.Module):
    r"""The message :math:`W(x_{ij}) f_j` of a tensor field network (paper Eq. 8), an
    ``o3.TensorProduct`` of the neighbour's features with the edge's spherical harmonics.

    .. math:: (W(x) f)^{\ell}_{c'} = \sum_{k} \sum_{J=|k-\ell|}^{k+\ell} \sum_c
              \varphi^{\ell k}_{J, c'c}(\|x\|)\, \big(f^{k}_c \otimes Y^{J}(\hat x)\big)^{\ell}

    Every path :math:`(k, J \to \ell)` that ``irreps_sh`` and the Clebsch-Gordan rules allow
    (with :func:`so3_harmonics`, all of Eq. 8), fully connected in the channels (``"uvw"``): one
    radial function per path and channel pair. As in the official code (``PairwiseConv``), the
    radial functions of one pair of input and output irreps (all their :math:`J` and channels)
    come from one :func:`radial_network`: ``radial[g]`` serves ``pairs[g] = (i_in, i_out)``.

    Shapes: ``f_src [num_edges, irreps_in.dim]``, ``edge_sh [num_edges, irreps_sh.dim]``,
    ``edge_length_embedded [num_edges, number_of_basis]`` -> ``[num_edges, irreps_out.dim]``.
    """

    def __init__(
        self, irreps_in, irreps_sh, irreps_out, number_of_basis: int, radial_hidden: int
    ) -> None:
        super().__init__()
        irreps_in, irreps_sh, irreps_out = map(o3.Irreps, (irreps_in, irreps_sh, irreps_out))
        paths = sorted(  # grouped by (input irrep, output irrep): one radial network per group
            (i_in, i_out, i_sh)
            for i_in, (_, ir_in) in enumerate(irreps_in)
            for i_sh, (_, ir_sh) in enumerate(irreps_sh)
            for i_out, (_, ir_out) in enumerate(irreps_out)
            if ir_out in ir_in * ir_sh
        )
        instructions = [(i_in, i_sh, i_out, "uvw", True) for i_in, i_out, i_sh in paths]
        self.tp = o3.TensorProduct(
            irreps_in, irreps_sh, irreps_out, instructions, shared_weights=False,
            internal_weights=False,
        )  # fmt: skip
        numels = [ins.path_shape for ins in self.tp.instructions]
        self.pairs, sizes = [], []
        for pair, group in itertools.groupby(zip(paths, numels), key=lambda p: p[0][:2]):
            self.pairs.append(pair)
            sizes.append(sum(math.prod(shape) for _, shape in group))
        self.radial = torch.nn.ModuleList(
            radial_network(number_of_basis, radial_hidden, size) for size in sizes
        )

    def forward(self, f_src, edge_sh, edge_length_embedded) -> torch.Tensor:
        # The groups' weights, side by side, are the product's weights in instruction order.
        weight = torch.cat([net(edge_length_embedded) for net in self.radial], dim=1)
        return self.tp(f_src, edge_sh, weight)


def _blocks_by_irrep(irreps_in: o3.Irreps, irreps_out: o3.Irreps, name: str) -> list:
    """Per block of ``irreps_out`` (each irrep once): slices and multiplicities of its inputs."""
    if len({ir for _, ir in irreps_out}) != len(irreps_out):
        raise ValueError(f"{name}: each irrep may appear once in irreps_out, got {irreps_out}")
    blocks = []
    for _, ir in irreps_out:
        found = [(s, mul) for (mul, ir_in), s in zip(irreps_in, irreps_in.slices()) if ir_in == ir]
        if not found:
            raise ValueError(f"{name}: irreps_out has {ir}, which irreps_in ({irreps_in}) lacks")
        blocks.append(found)
    return blocks


class AttentiveSelfInteraction(torch.nn.Module):
    r"""Attentive self-interaction (paper Eqs. 12-13, official ``GAttentiveSelfInt``): per node
    and irrep, with the node's ``m`` input channels :math:`f_c` of that irrep,

    .. math:: G_{c'c} = f_{c'} \cdot f_c, \qquad
              w = \mathrm{softmax}_c\, \mathrm{MLP}(G), \qquad
              f'_{o} = \sum_{c=1}^{m} w_{oc}\, f_c .

    :math:`G` is ``[m, m]`` (rotations leave dot products unchanged), the MLP (official: layer
    norm, leaky ReLU, linear with bias) maps its :math:`m^2` entries to the ``[m_out, m]``
    weights :math:`w`. Eq. (13) makes the weights an MLP of the dot products; the softmax over
    :math:`c` is the official code's, so every output channel is a weighted mean of the input
    channels. Parameters per irrep: :math:`2 m^2` (layer norm) :math:`+ (m^2 + 1)\, m_{out} m`.

    Shapes: ``f [num_nodes, irreps_in.dim] -> [num_nodes, irreps_out.dim]``.

    >>> si = AttentiveSelfInteraction("3x0e + 2x1e", "2x0e + 1x1e")
    >>> f = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 2.0, 0.0, 0.0, 2.0]])
    >>> si(f).detach()  # equal channels in, the same out: each row of weights sums to 1
    tensor([[1.0000, 1.0000, 0.0000, 0.0000, 2.0000]])
    """

    def __init__(self, irreps_in, irreps_out) -> None:
        super().__init__()
        self.irreps_in, self.irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
        self.blocks = _blocks_by_irrep(self.irreps_in, self.irreps_out, "AttentiveSelfInteraction")
        self.nets = torch.nn.ModuleList()
        for (mul_out, _), found in zip(self.irreps_out, self.blocks):
            mul_in = sum(mul for _, mul in found)
            net = torch.nn.Sequential(
                torch.nn.LayerNorm(mul_in**2), torch.nn.LeakyReLU(),
                torch.nn.Linear(mul_in**2, mul_out * mul_in),
            )  # fmt: skip
            torch.nn.init.kaiming_uniform_(net[2].weight)
            self.nets.append(net)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        num_nodes, out = f.shape[0], []
        for (mul_out, ir), found, net in zip(self.irreps_out, self.blocks, self.nets):
            x = torch.cat([f[:, s].reshape(num_nodes, mul, ir.dim) for s, mul in found], dim=1)
            gram = torch.einsum("nci,ndi->ncd", x, x).flatten(1)  # [num_nodes, m^2]
            w = net(gram).view(num_nodes, mul_out, x.shape[1]).softmax(dim=-1)
            out.append(torch.einsum("noc,nci->noi", w, x).flatten(1))  # [num_nodes, m_out * dim]
        return torch.cat(out, dim=1)


class NormNonlinearity(torch.nn.Module):
    r"""The norm nonlinearity of the paper's models (official ``GNormSE3``): per irrep block,
    with the norms :math:`n_c = \|f_c\|` of its ``m`` channels, a layer norm over :math:`c`
    then a ReLU gives each channel a new length and keeps its direction:

    .. math:: f'_c = \mathrm{ReLU}\big(\mathrm{LN}(n_1, \ldots, n_m)_c\big)\, f_c / n_c.

    The direction :math:`f_c / n_c` jumps where :math:`f_c` passes through 0, and the layer
    norm, which divides by the spread of the norms, makes tiny norms as large as big ones.

    Shapes: ``[num_nodes, irreps.dim] -> [num_nodes, irreps.dim]``.
    """

    EPS = 1e-12  # the official code's floor on the norms (its gradients explode otherwise)

    def __init__(self, irreps) -> None:
        super().__init__()
        self.irreps = o3.Irreps(irreps)
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(mul) for mul, _ in self.irreps)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        out = []
        for (mul, ir), s, layer_norm in zip(self.irreps, self.irreps.slices(), self.norms):
            x = f[:, s].reshape(-1, mul, ir.dim)
            norm = x.norm(dim=-1, keepdim=True).clamp_min(self.EPS)
            length = layer_norm(norm[..., 0]).relu()[..., None]
            out.append((length * x / norm).flatten(1))
        return torch.cat(out, dim=1)


def _head_of(irreps: o3.Irreps, num_heads: int, name: str) -> torch.Tensor:
    """``head_of[c]``: the head that owns component ``c`` (head h owns the h-th group of
    channels of every block, the official ``fiber2head`` layout)."""
    if any(mul % num_heads for mul, _ in irreps):
        raise ValueError(f"the multiplicities of {name} ({irreps}) must divide by {num_heads}")
    return torch.cat(
        [torch.arange(num_heads).repeat_interleave(mul // num_heads * ir.dim) for mul, ir in irreps]
    )


class OriginalAttention(torch.nn.Module):
    r"""One attention layer of the SE(3)-Transformer paper, Eqs. 8, 10-13 (book: The original
    SE(3)-Transformer layer; the module docstring has the formula and its sources).

    Args:
        irreps_in, irreps_out: node features, degrees without parity (:func:`so3_irreps`; each
            irrep once in ``irreps_out``). max_radius: the neighbourhood reaches no farther
            (``valid_radius``), the embedding spans ``[0, max_radius]``. num_neighbors: size of
            the neighbourhood (:func:`knn_graph`). number_of_basis: of the length embedding.
            num_heads: the multiplicities of keys and values must divide by it.
        irreps_sh: default :func:`so3_harmonics` of the largest degree in or out (every J).
        irreps_value: default ``irreps_out`` (the official ``div`` divides its multiplicities);
            irreps_key: default the value irreps that ``irreps_in`` has (official code).
        radial_hidden: width of the radial networks (the official 32).
        self_interaction: ``o3.Linear`` (default) or :class:`AttentiveSelfInteraction`, built
            from ``(irreps_value + irreps_in, irreps_out)``.

    Float64: build under ``se3tutor.checks.default_dtype(torch.float64)``; to copy a float32
    layer, copy its parameters, not its state dict (which holds e3nn's Clebsch-Gordan tables).

    Shapes: ``f [num_nodes, irreps_in.dim]``, ``pos [num_nodes, 3]``, ``edge_index [2,
    num_edges]`` (default :func:`knn_graph`), ``batch [num_nodes]`` ->
    ``[num_nodes, irreps_out.dim]``.

    >>> layer = OriginalAttention("2x0e + 2x1e", "2x0e + 2x1e", number_of_basis=4,
    ...                           max_radius=3.0, num_neighbors=3)
    >>> layer.irreps_sh, layer(layer.irreps_in.randn(5, -1), torch.randn(5, 3)).shape
    (1x0e+1x1e+1x2e, torch.Size([5, 8]))
    """

    def __init__(
        self,
        irreps_in,
        irreps_out,
        *,
        max_radius: float,
        num_neighbors: int,
        number_of_basis: int = 10,
        num_heads: int = 1,
        irreps_sh=None,
        irreps_value=None,
        irreps_key=None,
        radial_hidden: int = 32,
        self_interaction: Callable[..., torch.nn.Module] = o3.Linear,
    ) -> None:
        super().__init__()
        self.irreps_in, self.irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
        lmax = max(ir.l for _, ir in self.irreps_in + self.irreps_out)
        self.irreps_sh = o3.Irreps(irreps_sh or so3_harmonics(lmax))
        self.irreps_value = o3.Irreps(irreps_value or self.irreps_out)
        if irreps_key is None:  # queries are a linear map of f: only irreps that f has
            have = {ir for _, ir in self.irreps_in}
            irreps_key = [(mul, ir) for mul, ir in self.irreps_value if ir in have]
        self.irreps_key = o3.Irreps(irreps_key)
        names = ("irreps_in", "irreps_out", "irreps_sh", "irreps_value", "irreps_key")
        if odd := [name for name in names if any(ir.p != 1 for _, ir in getattr(self, name))]:
            raise ValueError(f"{', '.join(odd)}: odd irreps; the paper's degrees have no parity")
        self.number_of_basis, self.max_radius = number_of_basis, max_radius
        self.num_neighbors, self.num_heads = num_neighbors, num_heads

        self.h_q = o3.Linear(self.irreps_in, self.irreps_key)  # W_Q
        self.w_k = TFNKernel(
            self.irreps_in, self.irreps_sh, self.irreps_key, number_of_basis, radial_hidden
        )
        self.w_v = TFNKernel(
            self.irreps_in, self.irreps_sh, self.irreps_value, number_of_basis, radial_hidden
        )
        self.self_interaction = self_interaction(self.irreps_value + self.irreps_in, irreps_out)

        key_head_of = _head_of(self.irreps_key, num_heads, "irreps_key")
        # Logits of all heads as one product; 1/sqrt(d), d the keys' total size (GMABSE3).
        head_sum = torch.nn.functional.one_hot(key_head_of, num_heads) / self.irreps_key.dim**0.5
        self.register_buffer("head_sum", head_sum.to(torch.get_default_dtype()), persistent=False)
        value_head_of = _head_of(self.irreps_value, num_heads, "irreps_value")
        self.register_buffer("value_head_of", value_head_of, persistent=False)

    def forward(
        self, f: torch.Tensor, pos: torch.Tensor, edge_index: Optional[torch.Tensor] = None,
        batch: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:  # fmt: skip
        check_graph_inputs(self, self.irreps_in, f, pos, edge_index, batch)
        if edge_index is None:
            edge_index = knn_graph(pos, self.num_neighbors, self.max_radius, batch)
        alpha, v = self.attention_weights_and_values(f, pos, edge_index)
        # Eq. (10): the values weighted by alpha itself (each head's alpha on its channels)
        z = scatter(alpha[:, self.value_head_of] * v, edge_index[1], dim=0, dim_size=len(f))
        return self.self_interaction(torch.cat([z, f], dim=1))  # [num_nodes, irreps_out.dim]

    def attention_weights_and_values(
        self, f: torch.Tensor, pos: torch.Tensor, edge_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`\alpha_{ij}` of every edge and head ``[num_edges, num_heads]`` and the values
        :math:`v_{ij}` ``[num_edges, irreps_value.dim]`` (Eq. 11 and Eq. 10's messages)."""
        edge_src, edge_dst = edge_index
        edge_vec = edge_vectors(pos, edge_index)  # x_j - x_i, as the paper writes it
        edge_sh = o3.spherical_harmonics(  # the degrees J only: their labels are bookkeeping
            [ir.l for _, ir in self.irreps_sh], edge_vec, normalize=True, normalization="component"
        )
        embedded = embed_edge_length(
            edge_vec.norm(dim=1), self.max_radius, self.number_of_basis, cutoff=False
        )
        q = self.h_q(f)  # [num_nodes, irreps_key.dim]
        k = self.w_k(f[edge_src], edge_sh, embedded)  # [num_edges, irreps_key.dim]
        v = self.w_v(f[edge_src], edge_sh, embedded)  # [num_edges, irreps_value.dim]
        logits = (q[edge_dst] * k) @ self.head_sum  # [num_edges, num_heads], with the 1/sqrt(d)
        return segment_softmax(logits, edge_dst, len(f)), v  # a plain softmax: no cutoff


class OriginalSE3Transformer(torch.nn.Module):
    r"""A stack of the paper's layers, laid out as the official models (book: The original
    SE(3)-Transformer layer): ``num_layers`` times :class:`OriginalAttention` (linear
    self-interaction, value multiplicities divided by ``div``) then :class:`NormNonlinearity`,
    as the QM9 model's ``GSE3Res`` + ``GNormSE3`` (N-body: ``GNormBias``); then one
    :class:`OriginalAttention` to ``irreps_out`` with attentive self-interaction, ``div=1``, one
    head, as the N-body model's last layer (``siend='att'``; QM9 ends with a convolution and
    pooling). ``options`` go to every layer. One graph (:func:`knn_graph`) per forward pass.

    Shapes: ``f [num_nodes, irreps_in.dim]``, ``pos [num_nodes, 3]``, ``batch [num_nodes]``
    -> ``[num_nodes, irreps_out.dim]``.

    >>> model = OriginalSE3Transformer("1x0e", so3_irreps(4, 1), "2x0e", num_layers=2,
    ...                                max_radius=3.0, num_neighbors=3)
    >>> model(torch.ones(5, 1), torch.randn(5, 3)).shape
    torch.Size([5, 2])
    """

    def __init__(
        self, irreps_in, irreps_hidden, irreps_out, *, num_layers: int, max_radius: float,
        num_neighbors: int, num_heads: int = 1, div: int = 1, **options,
    ) -> None:  # fmt: skip
        super().__init__()
        self.irreps_in, self.irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
        irreps_hidden = o3.Irreps(irreps_hidden)
        irreps_value = o3.Irreps([(mul // div, ir) for mul, ir in irreps_hidden])
        lmax = max(ir.l for _, ir in self.irreps_in + irreps_hidden + self.irreps_out)
        options.setdefault("irreps_sh", so3_harmonics(lmax))  # one basis for all layers
        self.num_neighbors, self.max_radius = num_neighbors, max_radius
        graph = dict(max_radius=max_radius, num_neighbors=num_neighbors)
        self.layers, irreps = torch.nn.ModuleList(), self.irreps_in
        for _ in range(num_layers):
            hidden = dict(irreps_value=irreps_value, num_heads=num_heads, **graph, **options)
            self.layers.append(OriginalAttention(irreps, irreps_hidden, **hidden))
            self.layers.append(NormNonlinearity(irreps_hidden))
            irreps = irreps_hidden
        last = dict(self_interaction=AttentiveSelfInteraction, **graph, **options)
        self.layers.append(OriginalAttention(irreps, self.irreps_out, **last))

    def forward(
        self, f: torch.Tensor, pos: torch.Tensor, batch: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        check_graph_inputs(self, self.irreps_in, f, pos, None, batch)
        edge_index = knn_graph(pos, self.num_neighbors, self.max_radius, batch)
        for layer in self.layers:
            f = layer(f, pos, edge_index) if isinstance(layer, OriginalAttention) else layer(f)
        return f
