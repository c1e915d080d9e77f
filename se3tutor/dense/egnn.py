r"""E(n)-equivariant graph network layers on irreps features (book: The SE(3)-Transformer).

The E(n)-GNN (Satorras, Hoogeboom and Welling 2021, "E(n) Equivariant Graph Neural
Networks") moves coordinates along their differences, weighted by an MLP of invariants.
se3-transformer-pytorch's ``use_egnn`` applies that update to every higher-degree feature
channel instead of the coordinates; :class:`EGNNLayer` does the same on e3nn irreps, with
:math:`s` the ``0e`` channels and :math:`x^c` every other channel :math:`c` (any irrep):

.. math::
    m_{ij} &= \phi_e\big(s_i, s_j, \|x^c_i - x^c_j\|_c, e_{ij}\big) \\
    x^c_i &\leftarrow x^c_i + \sum_j c(r_{ij})\, \phi_x(m_{ij})^c\, N_c(x^c_i - x^c_j) \\
    s_i &\leftarrow s_i + \phi_s\big(\mathrm{LN}(s_i), \textstyle\sum_j c(r_{ij}) m_{ij}
          + m_{ii}\big) \\
    x^c_i &\leftarrow \sigma(W_g s_i)^c\, x^c_i

with the edge scalars :math:`e_{ij}` (embedded length and edge features), the smooth cutoff
:math:`c(r)`, the self-message :math:`m_{ii} = \phi_e(s_i, s_i, 0, 0)` (0.9.0 adds each node
to its own neighbours) and :math:`N_c(v) = v / \max(\|v\|, \epsilon)\, (\gamma_c \|v\| +
\beta_c)`. Everything multiplying an :math:`x^c` is invariant, so the layer is equivariant.
:class:`EGNNTransformer` is :class:`se3tutor.SE3Transformer` with such layers as its trunk.
"""

from __future__ import annotations

from typing import Optional

import torch
from e3nn import o3

from se3tutor.graph import scatter
from se3tutor.multihead import EdgeGeometry
from se3tutor.norm import channel_index
from se3tutor.transformer import FeedForward, SE3Transformer, node_layer_norm

__all__ = ["EGNNLayer", "EGNNTransformer"]

# As in 0.9.0: the MLPs' weights start at N(0, INIT_STD^2), so each layer starts close to a
# constant update, and the norms N_c start with gamma = beta = NORM_INIT.
INIT_STD = 1e-3
NORM_INIT = 1e-2
EPS = 1e-8  # below this norm, N_c(v) is linear in v instead of dividing by ~0


def _mlp(*widths: int, final_silu: bool) -> torch.nn.Sequential:
    layers = []
    for i, (width_in, width_out) in enumerate(zip(widths, widths[1:])):
        layers.append(torch.nn.Linear(width_in, width_out))
        if final_silu or i < len(widths) - 2:
            layers.append(torch.nn.SiLU())
    return torch.nn.Sequential(*layers)


class EGNNLayer(torch.nn.Module):
    r"""One E(n)-GNN layer on irreps (module docstring). ``hidden_dim``: width of the messages
    :math:`m_{ij}`; ``weights_clamp_value``: :math:`\phi_x(m_{ij})` clamped to
    :math:`\pm` that value (0.9.0's ``egnn_weights_clamp_value``).

    Shapes: ``f [num_nodes, irreps_node.dim] -> [num_nodes, irreps_node.dim]``.
    """

    def __init__(
        self,
        irreps_node,
        number_of_edge_scalars: int,
        hidden_dim: int = 32,
        weights_clamp_value: Optional[float] = None,
    ) -> None:
        super().__init__()
        self.irreps_node = o3.Irreps(irreps_node)
        self.weights_clamp_value = weights_clamp_value
        is_scalar = torch.cat(
            [torch.full((mul * ir.dim,), ir == o3.Irrep("0e")) for mul, ir in self.irreps_node]
        )
        others = [(mul, ir) for mul, ir in self.irreps_node if ir != o3.Irrep("0e")]
        num_scalars = self.irreps_node.count("0e")
        num_channels = sum(mul for mul, _ in others)
        if num_scalars == 0:
            raise ValueError(f"irreps_node needs 0e channels, got {self.irreps_node}")
        self.register_buffer("scalars", is_scalar.nonzero()[:, 0], persistent=False)
        self.register_buffer("others", (~is_scalar).nonzero()[:, 0], persistent=False)
        # channel_of[c]: the channel of the non-0e component c.
        self.register_buffer("channel_of", channel_index(others), persistent=False)
        edge_in = 2 * num_scalars + num_channels + number_of_edge_scalars
        self.edge_mlp = _mlp(edge_in, 2 * edge_in, hidden_dim, final_silu=True)  # phi_e
        self.weight_mlp = _mlp(hidden_dim, 4 * hidden_dim, num_channels, final_silu=False)
        self.node_norm = torch.nn.LayerNorm(num_scalars)
        self.node_mlp = _mlp(
            num_scalars + hidden_dim, 2 * num_scalars, num_scalars, final_silu=False
        )
        self.gate = torch.nn.Linear(num_scalars, num_channels)
        self.norm_scale = torch.nn.Parameter(torch.full((num_channels,), NORM_INIT))  # gamma
        self.norm_bias = torch.nn.Parameter(torch.full((num_channels,), NORM_INIT))  # beta
        for module in self.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=INIT_STD)

    def channel_norms(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., others] -> [..., num_channels]``: the norm of every non-0e channel."""
        squares = x.new_zeros(*x.shape[:-1], self.norm_scale.shape[0])
        return squares.index_add(-1, self.channel_of, x.pow(2)).clamp(min=EPS**2).sqrt()

    def forward(self, f: torch.Tensor, edges: EdgeGeometry) -> torch.Tensor:
        src, dst = edges.edge_src, edges.edge_dst
        s, x = f[:, self.scalars], f[:, self.others]  # [num_nodes, 0e], [num_nodes, others]
        difference = x[dst] - x[src]  # [num_edges, others]: x_i - x_j
        distance = self.channel_norms(difference)  # [num_edges, num_channels]
        messages = self.edge_mlp(torch.cat([s[dst], s[src], distance, edges.edge_scalars], 1))
        weights = self.weight_mlp(messages)  # [num_edges, num_channels]
        if self.weights_clamp_value is not None:
            weights = weights.clamp(-self.weights_clamp_value, self.weights_clamp_value)
        cutoff = edges.edge_log_weight.exp()[:, None]  # c(r)
        # N_c(v) = v * (gamma_c + beta_c / max(|v|, eps)): an invariant times v.
        scale = weights * cutoff * (self.norm_scale + self.norm_bias / distance)
        x = x + scatter(difference * scale[:, self.channel_of], dst, dim=0, dim_size=len(f))

        zeros = f.new_zeros(len(f), distance.shape[1] + edges.edge_scalars.shape[1])
        self_messages = self.edge_mlp(torch.cat([s, s, zeros], dim=1))  # m_ii
        total = scatter(cutoff * messages, dst, dim=0, dim_size=len(f)) + self_messages
        s = s + self.node_mlp(torch.cat([self.node_norm(s), total], dim=1))
        x = x * self.gate(s).sigmoid()[:, self.channel_of]
        return f.index_copy(1, self.scalars, s).index_copy(1, self.others, x)


class EGNNTransformer(SE3Transformer):
    r""":class:`se3tutor.SE3Transformer` whose trunk is ``num_layers`` :class:`EGNNLayer`,
    each followed, with ``feed_forward``, by a pre-norm residual feed-forward block
    :math:`f \leftarrow f + F(N f)` (0.9.0's ``egnn_feedforward``). Same arguments as
    :class:`~se3tutor.transformer.SE3Transformer` (the attention's are unused), and
    ``hidden_dim``, ``weights_clamp_value`` of :class:`EGNNLayer`.
    """

    def __init__(
        self,
        *args,
        num_layers: int = 2,
        hidden_dim: int = 32,
        weights_clamp_value: Optional[float] = None,
        feed_forward: bool = False,
        norm=node_layer_norm,
        **kwargs,
    ) -> None:
        super().__init__(*args, num_layers=0, norm=norm, **kwargs)
        irreps, edge_scalars = self.irreps_hidden, self.number_of_basis + self.edge_attr_dim
        self.layers = torch.nn.ModuleList(
            EGNNLayer(irreps, edge_scalars, hidden_dim, weights_clamp_value)
            for _ in range(num_layers)
        )
        inner = [(2 * mul, ir) for mul, ir in irreps]
        self.feed_forwards = torch.nn.ModuleList(
            torch.nn.Sequential(norm(irreps), FeedForward(irreps, inner))
            for _ in range(num_layers if feed_forward else 0)
        )

    def trunk(self, f: torch.Tensor, edges: EdgeGeometry) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            f = layer(f, edges)
            if self.feed_forwards:
                f = f + self.feed_forwards[i](f)
        return f
