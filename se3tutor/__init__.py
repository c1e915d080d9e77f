"""se3tutor: SE(3)-equivariant convolution, attention and transformers, as the book derives them.

Each module maps to a chapter of the book:

- :mod:`se3tutor.graph`: ``radius_graph``, ``scatter``, segment softmax (all chapters)
- :mod:`se3tutor.radial`: radial embedding, smooth cutoff, radial MLP
- :mod:`se3tutor.conv`: ``Convolution`` (chapter Convolution)
- :mod:`se3tutor.attention`: ``EquivariantAttention`` (chapter Attention)
- :mod:`se3tutor.checks`: the equivariance and gradient checks the book and tests use
"""

from se3tutor.attention import EquivariantAttention
from se3tutor.conv import Convolution
from se3tutor.graph import edge_vectors, radius_graph, scatter, segment_softmax

__version__ = "0.1.0"

__all__ = [
    "Convolution",
    "EquivariantAttention",
    "edge_vectors",
    "radius_graph",
    "scatter",
    "segment_softmax",
]
