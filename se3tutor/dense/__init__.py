"""The front end for users of se3-transformer-pytorch 0.9.0 (book: The SE(3)-Transformer).

``from se3tutor.dense import SE3Transformer`` takes that library's constructor keywords and
its ``forward(feats, coors, mask, ...)`` call, and computes them with the graph-level model
:class:`se3tutor.SE3Transformer`. The core modules of the package know nothing of this
subpackage: what only the front end needs is composed onto the core here.

- :mod:`se3tutor.dense.model`: ``SE3Transformer``, the dense interface (what maps to what,
  and what differs on purpose, is in its docstring)
- :mod:`se3tutor.dense.neighbors`: that library's neighbour rules as an ``edge_index``, and
  the invariant edge features
- :mod:`se3tutor.dense.variants`: attention variants (linear, tied, one-headed, null and
  global keys, chunked edges), reversible blocks, the gated-scale norm, a convolution stem
- :mod:`se3tutor.dense.rotary`: rotary embeddings of relative positions on the keys
- :mod:`se3tutor.dense.egnn`: E(n)-GNN layers in place of the attention blocks
"""

from se3tutor.dense.model import SE3Transformer
from se3tutor.dense.neighbors import fourier_encode

__all__ = ["SE3Transformer", "fourier_encode"]
