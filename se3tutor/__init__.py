"""se3tutor: SE(3)-equivariant convolution, attention and transformers, as the book derives them.

Each module maps to a chapter of the book:

- :mod:`se3tutor.graph`: ``radius_graph``, ``scatter``, segment softmax (all chapters)
- :mod:`se3tutor.radial`: radial embedding, smooth cutoff, radial MLP
- :mod:`se3tutor.conv`: ``Convolution`` (chapter Convolution)
- :mod:`se3tutor.attention`: ``EquivariantAttention`` (chapter Attention)
- :mod:`se3tutor.norm`: second moments, equivariant layer norm, gated nonlinearity
  (chapter Normalization)
- :mod:`se3tutor.transformer`: ``SE3Transformer``, the full model (chapter The SE(3)-Transformer)
- :mod:`se3tutor.checks`: the equivariance, smoothness and gradient checks the book and tests use
"""

from se3tutor.attention import EquivariantAttention
from se3tutor.conv import Convolution
from se3tutor.graph import edge_vectors, radius_graph, scatter, segment_softmax
from se3tutor.transformer import SE3Transformer

__version__ = "0.1.0"

__all__ = [
    "Convolution",
    "EquivariantAttention",
    "SE3Transformer",
    "edge_vectors",
    "radius_graph",
    "scatter",
    "segment_softmax",
]
