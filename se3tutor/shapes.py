r"""The tetris shapes, and a classifier that recognises them in any orientation (book: Shapes).

The eight *tetracubes*, the shapes made of four unit cubes joined face to face, are the toy
problem of Tensor Field Networks (Thomas et al., 2018): learn the shape from one orientation,
recognise it in every other. Two of them, the screws, are mirror images of each other and no
rotation turns one into the other, so a classifier must tell left from right.

- :func:`tetris`: the cube centres of the eight shapes, with labels and a ``batch`` vector.
- :class:`ShapeClassifier`: an :class:`se3tutor.SE3Transformer` whose per-point outputs are
  scalars and pseudoscalars, averaged over each shape: class scores that do not change under
  rotations, translations or a reordering of the points, and whose pseudoscalar part changes
  sign under a mirror.
"""

from __future__ import annotations

from typing import Optional

import torch
from e3nn import o3

from se3tutor.graph import scatter
from se3tutor.transformer import SE3Transformer

__all__ = ["SHAPE_NAMES", "ShapeClassifier", "tetris"]

SHAPE_NAMES = ("screw (right)", "screw (left)", "square", "line", "tripod", "L", "T", "zigzag")

# Integer coordinates of the four cubes of each shape, in the order of SHAPE_NAMES. The screws
# are a path of three steps along x, y and +z or -z: the triple product of the steps,
# e_x . (e_y x (+-e_z)) = +-1, is their handedness. Every other shape is its own mirror image.
_CUBES = (
    ((0, 0, 0), (1, 0, 0), (1, 1, 0), (1, 1, 1)),
    ((0, 0, 0), (1, 0, 0), (1, 1, 0), (1, 1, -1)),
    ((0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)),
    ((0, 0, 0), (1, 0, 0), (2, 0, 0), (3, 0, 0)),
    ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)),
    ((0, 0, 0), (1, 0, 0), (2, 0, 0), (2, 1, 0)),
    ((0, 0, 0), (1, 0, 0), (2, 0, 0), (1, 1, 0)),
    ((0, 0, 0), (1, 0, 0), (1, 1, 0), (2, 1, 0)),
)


def tetris(
    dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The eight tetracubes: cube centres, in units of the cube's edge, each shape centred at
    the origin (so that a rotation about the origin turns every shape in place).

    Returns ``pos [32, 3]`` (shape ``s`` in rows ``4s`` to ``4s + 3``), ``labels [8]`` (shape
    ``s`` has label ``s``, named ``SHAPE_NAMES[s]``) and ``batch [32]`` (the shape of each point).

    >>> pos, labels, batch = tetris()
    >>> pos.shape, labels.tolist(), batch.tolist()[:8]
    (torch.Size([32, 3]), [0, 1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 0, 1, 1, 1, 1])
    >>> SHAPE_NAMES[3], pos[batch == 3, 0].tolist()  # the line, along x
    ('line', [-1.5, -0.5, 0.5, 1.5])
    """
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    cubes = torch.tensor(_CUBES, dtype=dtype, device=device)  # [8, 4, 3]
    pos = cubes - cubes.mean(dim=1, keepdim=True)
    labels = torch.arange(len(_CUBES), device=device)
    batch = labels.repeat_interleave(cubes.shape[1])
    return pos.reshape(-1, 3), labels, batch


class ShapeClassifier(torch.nn.Module):
    r"""Class scores of point clouds, invariant to rotations, translations and the order of the
    points (book: Shapes).

    Every point gets the same input, the scalar 1; an :class:`se3tutor.SE3Transformer` turns
    the geometry into ``num_classes`` scalars :math:`s_{ic}` (``0e``) and as many pseudoscalars
    :math:`p_{ic}` (``0o``) per point, and the score of class :math:`c` for shape :math:`S` is

    .. math:: \ell_{Sc} = \frac{1}{|S|} \sum_{i \in S} \big(s_{ic} + p_{ic}\big).

    Rotations leave both terms unchanged; a mirror leaves :math:`s` and flips the sign of
    :math:`p`, which is how the scores of a shape and of its mirror image can differ.

    The pseudoscalars are read out only when ``irreps_hidden`` contains ``0o``
    (``reads_pseudoscalars``; e.g. ``hidden_irreps(mul, lmax, "SE3")``); without it
    :math:`p = 0`. With it, :math:`p` is still zero unless the hidden irreps also hold a path
    that makes a ``0o`` from the geometry, and the model has the layers to follow it. Each layer
    brings in one edge direction (its harmonics are ``0e + 1o + ...``), and a pseudoscalar of
    positions is at least a triple product of three directions: ``0e x 1o -> 1o`` (layer 1),
    ``1o x 1o -> 1e`` (layer 2, a cross product), ``1e x 1o -> 0o`` (layer 3). So it needs
    ``1e`` among the hidden irreps too, and at least three layers; with natural parities only
    (``0e + 1o + 2e + ...``) no path leads to ``0o``.

    Args:
        num_classes: number of classes.
        irreps_hidden: hidden irreps of the transformer (``o3.Irreps`` or str).
        max_radius: cutoff of the graph; larger than a shape makes every graph complete.
        num_layers, num_heads: of the transformer.

    Shapes: ``pos [num_points, 3]``, ``batch [num_points]`` (default: one shape) ->
    ``[num_shapes, num_classes]``.

    ``forward`` and :meth:`invariants` take ``num_shapes``, the number of shapes of the batch:
    pass it (``len(labels)``, say) to avoid ``int(batch.max()) + 1``, which waits for the GPU.
    A shape id in ``[0, num_shapes)`` that no point has gets a row of zeros.

    >>> from se3tutor.transformer import hidden_irreps
    >>> pos, labels, batch = tetris()
    >>> model = ShapeClassifier(8, hidden_irreps(4, 1, "SE3"), max_radius=3.5)
    >>> model(pos, batch).shape, model(pos, batch, num_shapes=len(labels)).shape
    (torch.Size([8, 8]), torch.Size([8, 8]))
    """

    def __init__(
        self,
        num_classes: int,
        irreps_hidden,
        *,
        max_radius: float,
        num_layers: int = 3,
        num_heads: int = 2,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        irreps_hidden = o3.Irreps(irreps_hidden)
        # Natural parities alone (0e + 1o + 2e + ...) never make a 0o: then read out scalars only.
        self.reads_pseudoscalars = o3.Irrep("0o") in [ir for _, ir in irreps_hidden]
        irreps_out = o3.Irreps(f"{num_classes}x0e")
        if self.reads_pseudoscalars:
            irreps_out = irreps_out + o3.Irreps(f"{num_classes}x0o")
        self.transformer = SE3Transformer(
            "1x0e",
            irreps_hidden,
            irreps_out,
            max_radius=max_radius,
            num_layers=num_layers,
            num_heads=num_heads,
        )

    def invariants(
        self,
        pos: torch.Tensor,
        batch: Optional[torch.Tensor] = None,
        num_shapes: Optional[int] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The means over each shape of the scalars and of the pseudoscalars, each
        ``[num_shapes, num_classes]``.

        ``num_shapes``: the number of shapes, every entry of ``batch`` below it (default
        ``int(batch.max()) + 1``, a host sync; 1 without ``batch``). A shape with no point gets
        a row of zeros."""
        if not isinstance(pos, torch.Tensor):
            raise TypeError(f"pos must be a torch.Tensor, got {type(pos).__name__}")
        if num_shapes is not None:
            if isinstance(num_shapes, bool) or not isinstance(num_shapes, int) or num_shapes < 1:
                raise ValueError(f"num_shapes must be a positive int, got {num_shapes!r}")
            if batch is None and num_shapes != 1:
                raise ValueError(f"without batch there is one shape, got num_shapes={num_shapes}")
        f = pos.new_ones(pos.shape[0], 1)  # the input of every point: 1x0e
        out = self.transformer(f, pos, batch)  # validates pos and batch; [num_points, C or 2 C]
        if batch is None:
            batch, num_shapes = torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device), 1
        # [num_shapes, C or 2 C]
        per_shape = scatter(out, batch, dim=0, dim_size=num_shapes, reduce="mean")
        if not self.reads_pseudoscalars:
            return per_shape, torch.zeros_like(per_shape)
        scalars, pseudoscalars = per_shape.split(self.num_classes, dim=1)
        return scalars, pseudoscalars

    def forward(
        self,
        pos: torch.Tensor,
        batch: Optional[torch.Tensor] = None,
        num_shapes: Optional[int] = None,
    ) -> torch.Tensor:
        """Class scores ``[num_shapes, num_classes]``; ``num_shapes`` as in :meth:`invariants`."""
        scalars, pseudoscalars = self.invariants(pos, batch, num_shapes)
        return scalars + pseudoscalars
