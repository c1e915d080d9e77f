"""se3tutor: SE(3)-equivariant convolution, attention and transformers, as the book derives them.

The chapters' modules, each named as the book names it:

- :mod:`se3tutor.graph`: ``radius_graph``, ``scatter``, segment softmax, the edge convention
  (every chapter)
- :mod:`se3tutor.radial`: radial embedding, smooth cutoff, radial MLP (Convolution, Smoothness)
- :mod:`se3tutor.conv`: ``Convolution`` (Convolution)
- :mod:`se3tutor.attention`: ``EquivariantAttention`` (Attention)
- :mod:`se3tutor.norm`: second moments, equivariant layer norm, gated nonlinearity
  (Normalization)
- :mod:`se3tutor.checks`: the equivariance, smoothness and gradient checks the book and the
  tests use (every chapter; Smoothness)
- :mod:`se3tutor.tensor_product`: the depthwise tensor product, on e3nn or cuEquivariance
  (The SE(3)-Transformer)
- :mod:`se3tutor.multihead`: multi-head attention and the edge geometry it reads
  (The SE(3)-Transformer)
- :mod:`se3tutor.transformer`: ``SE3Transformer``, the full model (The SE(3)-Transformer)
- :mod:`se3tutor.original`: the layer of the SE(3)-Transformer paper, built from e3nn pieces
  for comparison (The original SE(3)-Transformer layer)
- :mod:`se3tutor.shapes`: the tetracubes and ``ShapeClassifier`` (Shapes)
- :mod:`se3tutor.data`, :mod:`se3tutor.periodic`, :mod:`se3tutor.potential`,
  :mod:`se3tutor.calculator`: atomistic data, the periodic graph of crystals, ``EnergyModel``
  and its training, the ase calculator (Learning an interatomic potential)
- :mod:`se3tutor.nbody`, :mod:`se3tutor.dynamics`: the charged N-body benchmark of EGNN's
  Table 2 (the data, generated), ``NBodyTransformer`` and the training loop ``fit``

Two subpackages for two other audiences, and one for students:

- :mod:`se3tutor.dense`: the front end for se3-transformer-pytorch users
  (``from se3tutor.dense import SE3Transformer``); the core modules never import it
- :mod:`se3tutor.train`: ``python -m se3tutor.train``, training potentials with
  checkpoints, logs and ``torchrun``
- :mod:`se3tutor.exercises`: the checkers of the exercises, one module per chapter
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
