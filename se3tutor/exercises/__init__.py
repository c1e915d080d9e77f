"""Checkers for the exercises of the book (``book/exercises/``, one notebook per chapter).

Each checker runs the reader's function on seeded random inputs, compares it with the
reference implementation in se3tutor, and either prints a message starting with a check mark
or raises :class:`ExerciseError` (an ``AssertionError``) whose message says what is wrong:
a shape (expected and got), a value (where, by how much), a normalisation (the second moment
measured, and which missing constant would explain it), equivariance (which transformation
breaks it, in which block of irreps), a sign convention, a NaN gradient. Typical mistakes are
recognised by name (in the two layer exercises, also two at once). Every message is wrapped
at 80 columns, the width of the book's page.

========================================  =============================================
exercise (notebook)                        checker
========================================  =============================================
radial embedding (convolution)             :func:`check_radial_embedding`
the convolution's forward (convolution)    :func:`check_convolution`
softmax per centre (attention)             :func:`check_segment_softmax`
the attention's forward (attention)        :func:`check_attention`
second moment per irrep (normalization)    :func:`check_second_moment_per_irrep`
the missing normalisation (normalization)  :func:`check_normalization`
an equivariant layer norm (normalization)  :func:`check_layer_norm`
a smooth cutoff (smoothness)               :func:`check_smooth_cutoff`
a smooth convolution (smoothness)          :func:`check_smooth_layer`
a pre-norm block (transformer)             :func:`check_transformer_block`
make a model equivariant (transformer)     :func:`check_equivariant`
energies and forces (potential)            :func:`check_forces`
========================================  =============================================

Every checker takes ``device=`` (default CPU) for the tensors it gives the reader's function.

>>> check_segment_softmax(lambda logits, edge_dst, num_nodes: logits.exp())
... # doctest: +ELLIPSIS
Traceback (most recent call last):
...
se3tutor.exercises.ExerciseError: segment_softmax is not right yet.
With random logits, the alphas of each centre should sum to 1; yours sum to
...
Hint: the numerators exp(logits) still need dividing by their sum per centre.
"""

from se3tutor.exercises._common import ExerciseError
from se3tutor.exercises.attention import check_attention, check_segment_softmax
from se3tutor.exercises.convolution import check_convolution, check_radial_embedding
from se3tutor.exercises.normalization import (
    check_layer_norm,
    check_normalization,
    check_second_moment_per_irrep,
)
from se3tutor.exercises.potential import check_forces
from se3tutor.exercises.smoothness import check_smooth_cutoff, check_smooth_layer
from se3tutor.exercises.transformer import check_equivariant, check_transformer_block

__all__ = [
    "ExerciseError",
    "check_attention",
    "check_convolution",
    "check_equivariant",
    "check_forces",
    "check_layer_norm",
    "check_normalization",
    "check_radial_embedding",
    "check_second_moment_per_irrep",
    "check_segment_softmax",
    "check_smooth_cutoff",
    "check_smooth_layer",
    "check_transformer_block",
]
