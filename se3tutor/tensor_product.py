r"""The depthwise tensor product of the transformer's keys and values (book: The
SE(3)-Transformer), on e3nn or, on a GPU, on NVIDIA's cuequivariance kernels.

.. math:: m^{p}_{u} = w^{p}_u\, \big(x^{(l_1)}_{u} \otimes Y^{(l_2)}\big)^{(l)}

for every path :math:`p = (l_1, l_2 \to l)` and channel :math:`u`: each channel of the node
features is multiplied with the edge's harmonics on its own ("uvu"), with one weight per
channel, path and edge. :class:`DepthwiseTensorProduct` *is* the e3nn product
(an ``o3.TensorProduct``: same weights, same outputs, same ``state_dict``). When
``cuequivariance-torch`` is installed it can hand the work to
``cuequivariance_torch.ChannelWiseTensorProduct``, which computes the same product (same paths,
same normalisation, same weights) with fused CUDA kernels::

    pip install cuequivariance-torch cuequivariance-ops-torch-cu12

The fused kernel needs every irrep of the node features to have the same multiplicity (as
:func:`se3tutor.transformer.hidden_irreps` makes them); otherwise cuequivariance computes the
product with plain torch operations, which is no faster than e3nn.

The backend is an attribute (a constructor argument too), so that every model of the package,
variants included, switches with one call, :func:`use_backend`. ``"auto"`` (the default) uses
the fused kernel for CUDA tensors when both packages are installed and the multiplicities
allow it, and e3nn otherwise.

The folded attention (:class:`se3tutor.multihead.MultiHeadAttention`) takes the product in
blocks: :meth:`DepthwiseTensorProduct.forward_blocks` (batched matrix products in plain torch)
where e3nn would compute it, the fused kernel's output rearranged by
:meth:`~DepthwiseTensorProduct.to_blocks` where the backend chooses cuequivariance.
"""

from __future__ import annotations

import importlib.util

import torch
from e3nn import o3

__all__ = [
    "BACKENDS",
    "DepthwiseTensorProduct",
    "cuequivariance_available",
    "prepare_tensor_products",
    "runs_cuequivariance_kernels",
    "use_backend",
]

BACKENDS = ("auto", "e3nn", "cuequivariance")


# Asked on every call of an "auto" product: looked up once. A plain dict rather than
# functools.cache, which torch.compile does not trust (it warns and traces the lookup).
_AVAILABLE: dict = {}


def cuequivariance_available(kernels: bool = False) -> bool:
    """Whether ``cuequivariance_torch`` (and, with ``kernels``, its CUDA kernels
    ``cuequivariance_ops_torch``) can be imported."""
    if kernels not in _AVAILABLE:
        modules = ["cuequivariance_torch"] + (["cuequivariance_ops_torch"] if kernels else [])
        _AVAILABLE[kernels] = all(importlib.util.find_spec(name) is not None for name in modules)
    return _AVAILABLE[kernels]


class DepthwiseTensorProduct(o3.TensorProduct):
    r"""``x (x) Y`` channel by channel ("uvu"),

    .. math:: m^{p}_{u} = w^{p}_u\, \big(x^{(l_1)}_{u} \otimes Y^{(l_2)}\big)^{(l)}:

    every channel u of every irrep of ``x`` times
    every harmonic, kept where the product's irrep appears in ``irreps_targets``; one weight
    per (channel, path) and edge. Far fewer per-edge weights than a fully connected product,
    whose (channel in, channel out) weights per edge are what make large graphs run out of
    memory; the channels are mixed afterwards by a linear map shared by all edges.

    Outputs of equal irreps are side by side (paths sorted by output irrep), so that
    ``irreps_out.simplify()`` has few large blocks, which a linear map handles much faster;
    that is also the order of cuequivariance's channel-wise product.

    ``backend``: ``"auto"``, ``"e3nn"`` or ``"cuequivariance"`` (see the module docstring;
    ``"cuequivariance"`` also runs on the CPU, through its pure-torch fallback, which is how
    the tests compare the two).

    Shapes: ``x [num_edges, irreps_node.dim]``, ``y [num_edges, irreps_sh.dim]``,
    ``weight [num_edges, weight_numel]`` -> ``[num_edges, irreps_out.dim]``.

    >>> tp = DepthwiseTensorProduct("4x0e + 2x1o", "1x0e + 1x1o", "1x0e + 1x1o")
    >>> tp.irreps_out, tp.weight_numel
    (4x0e+2x0e+4x1o+2x1o, 12)
    """

    def __init__(self, irreps_node, irreps_sh, irreps_targets, backend: str = "auto") -> None:
        irreps_node, irreps_sh = o3.Irreps(irreps_node), o3.Irreps(irreps_sh)
        targets = sorted({ir for _, ir in o3.Irreps(irreps_targets)})
        paths = [
            (ir_out, i_in, i_sh, mul)
            for i_in, (mul, ir_in) in enumerate(irreps_node)
            for i_sh, (_, ir_sh) in enumerate(irreps_sh)
            for ir_out in ir_in * ir_sh
            if ir_out in targets
        ]
        paths.sort(key=lambda path: path[0])  # stable: ties keep the (i_in, i_sh) order
        irreps_mid = o3.Irreps([(mul, ir_out) for ir_out, _, _, mul in paths])
        instructions = [(i_in, i_sh, k, "uvu", True) for k, (_, i_in, i_sh, _) in enumerate(paths)]
        super().__init__(
            irreps_node,
            irreps_sh,
            irreps_mid,
            instructions,
            shared_weights=False,
            internal_weights=False,
        )
        self.irreps_targets = targets
        # widths as plain ints: forward reads them, and torch.compile cannot guard on Irreps
        self.width_x, self.width_y = irreps_node.dim, irreps_sh.dim
        # cuequivariance's fused kernel: one multiplicity for all irreps of the node features
        self.kernel_applies = len({mul for mul, _ in irreps_node}) == 1
        self.backend = backend
        # cuequivariance modules by (device, dtype), made when first needed. Not submodules:
        # they hold no weights, and the state_dict stays that of the e3nn product.
        self._cuequivariance_ops = {}
        self._register_blocks()

    def _register_blocks(self) -> None:
        """The constants of :meth:`forward_blocks`. One block per irrep ``i`` of ``x``
        (``mul`` channels of dimension ``d_x``) and output dimension ``d``, with the ``n``
        paths from ``i`` to outputs of that dimension: ``coupling [dim_y, d_x * n * d]``
        (each path's Wigner 3j symbols times its normalisation, at its harmonic's rows; a
        buffer, so that it follows ``.to()``, not in the ``state_dict``) and the paths; and
        the order of the weights that puts each block's ``(channel, path)`` weights side by
        side."""
        weight_offsets = torch.tensor([0] + [ins.path_shape[0] for ins in self.instructions])
        weight_offsets = weight_offsets.cumsum(0).tolist()
        y_slices = self.irreps_in2.slices()
        self.blocks, weight_order = [], []  # (x start, x stop, mul, d_x, d, paths), ...
        for i, ((mul, ir_x), x_slice) in enumerate(zip(self.irreps_in1, self.irreps_in1.slices())):
            for d in sorted({self.irreps_out[ins.i_out].ir.dim for ins in self.instructions}):
                paths = [
                    k
                    for k, ins in enumerate(self.instructions)
                    if ins.i_in1 == i and self.irreps_out[ins.i_out].ir.dim == d
                ]
                if not paths:
                    continue
                coupling = torch.zeros(self.irreps_in2.dim, ir_x.dim, len(paths), d)
                for j, k in enumerate(paths):
                    ins = self.instructions[k]
                    ir_y, ir_out = self.irreps_in2[ins.i_in2].ir, self.irreps_out[ins.i_out].ir
                    w3j = o3.wigner_3j(ir_x.l, ir_y.l, ir_out.l) * ins.path_weight  # [dx, dy, d]
                    coupling[y_slices[ins.i_in2], :, j] = w3j.transpose(0, 1)
                weight_order += [weight_offsets[k] + u for u in range(mul) for k in paths]
                n = len(self.blocks)
                self.register_buffer(f"_coupling{n}", coupling.flatten(1), persistent=False)
                self.blocks.append((x_slice.start, x_slice.stop, mul, ir_x.dim, d, paths))
        self.block_widths = [mul * len(paths) * d for _, _, mul, _, d, paths in self.blocks]
        # weight[:, block_weight_order]: the weights block by block, channel-major, then path
        order = torch.tensor(weight_order, dtype=torch.long)
        self.register_buffer("block_weight_order", order, persistent=False)

    def forward_blocks(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> list:
        r"""The same product by batched matrix products, in blocks: one per irrep of ``x``
        and output dimension ``d``, ``[num_edges, mul * n * d]`` (channel-major, then the
        block's ``n`` paths, then their components). ``weight`` in block order,
        ``weight[:, block_weight_order]`` of :meth:`forward`'s (a radial MLP can produce them
        so, with its last layer's columns permuted: no gather per edge).

        The harmonics are contracted with the Wigner 3j symbols first,
        :math:`Y^p_{ik} = \sum_j C^p_{ijk} Y_j` (``[num_edges, d_x, n * d]``, small), then
        every channel at once: ``bmm(x [num_edges, mul, d_x], Y)``, then the weights, one per
        channel and path. Faster than e3nn's order (which forms every channel's outer product
        with the harmonics first) for wide features on the CPU. ``from_blocks`` turns the
        blocks into :meth:`forward`'s layout (tested); the folded attention uses them as they
        are (with cuequivariance's kernel, it calls :meth:`forward` and :meth:`to_blocks`).
        Built in float32 and then converted, the 3j constants keep float32's rounding (as
        e3nn's own do): build under float64 for float64 accuracy."""
        num_edges, blocks = len(x), []
        weights = weight.split([mul * len(paths) for _, _, mul, _, _, paths in self.blocks], 1)
        for n, (start, stop, mul, dim_x, d, paths) in enumerate(self.blocks):
            harmonics = y @ getattr(self, f"_coupling{n}")
            harmonics = harmonics.view(num_edges, dim_x, len(paths) * d)
            products = torch.bmm(x[:, start:stop].view(num_edges, mul, dim_x), harmonics)
            products = products.view(num_edges, mul, len(paths), d)
            blocks.append((products * weights[n].view(num_edges, mul, len(paths), 1)).flatten(1))
        return blocks

    def to_blocks(self, t: torch.Tensor) -> list:
        """``[..., irreps_out.dim]`` in :meth:`forward`'s layout -> the blocks'."""
        slices = self.irreps_out.slices()
        blocks = []
        for _, _, mul, _, d, paths in self.blocks:
            parts = [t[..., slices[self.instructions[k].i_out]] for k in paths]
            parts = [part.unflatten(-1, (mul, d)) for part in parts]  # [..., mul, d] each
            blocks.append(torch.stack(parts, dim=-2).flatten(-3))  # [..., mul * n * d]
        return blocks

    def from_blocks(self, blocks: list) -> torch.Tensor:
        """The blocks' layout -> :meth:`forward`'s (``[..., irreps_out.dim]``)."""
        parts = [None] * len(self.instructions)
        for block, (_, _, mul, _, d, paths) in zip(blocks, self.blocks):
            block = block.unflatten(-1, (mul, len(paths), d))
            for j, k in enumerate(paths):
                parts[k] = block[..., j, :].flatten(-2)
        return torch.cat(parts, dim=-1)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "cuequivariance" and not cuequivariance_available():
            raise ImportError(
                'backend="cuequivariance" needs cuequivariance-torch: pip install '
                "cuequivariance-torch cuequivariance-ops-torch-cu12 (the CUDA kernels)"
            )
        self._backend = backend

    def uses_cuequivariance(self, x: torch.Tensor) -> bool:
        """Whether a call on ``x`` runs on cuequivariance."""
        if self._backend == "auto":
            return x.is_cuda and self.kernel_applies and cuequivariance_available(kernels=True)
        return self._backend == "cuequivariance"

    def forward(self, x, y, weight=None):
        # checked here, as e3nn's own path would: cuequivariance's errors name no argument
        for name, tensor, width in (("x", x, self.width_x), ("y", y, self.width_y)):
            if tensor.shape[-1] != width:
                raise ValueError(f"{name} must be [..., {width}], got {list(tensor.shape)}")
        if self.uses_cuequivariance(x):
            return self._cuequivariance_op(x.device, x.dtype)(x, y, weight)
        return super().forward(x, y, weight)

    def prepare(self, device, dtype: torch.dtype) -> None:
        """Build now what the first call on tensors of ``device`` and ``dtype`` would build:
        cuequivariance's module, where this product runs on it. torch.compile cannot trace
        that construction (:func:`prepare_tensor_products` does it for a whole model)."""
        x = torch.empty(0, self.width_x, device=device, dtype=dtype)
        if self.uses_cuequivariance(x):
            self._cuequivariance_op(x.device, dtype)

    def _cuequivariance_op(self, device: torch.device, dtype: torch.dtype):
        key = (device, dtype)
        if key not in self._cuequivariance_ops:
            self._cuequivariance_ops[key] = _CuequivarianceChannelWise(self, device, dtype)
        return self._cuequivariance_ops[key]


class _CuequivarianceChannelWise(torch.nn.Module):
    """``cuequivariance_torch.ChannelWiseTensorProduct`` with the weights and outputs in the
    order of a :class:`DepthwiseTensorProduct`.

    Both enumerate the same paths in the same order and sort them by output irrep, but
    cuequivariance puts the natural parity first (``0e, 0o, 1o, 1e``) and e3nn odd first
    (``0o, 0e, 1o, 1e``); the two index maps translate (they are the identity when no two
    parities of one degree meet).
    """

    def __init__(self, tp: DepthwiseTensorProduct, device: torch.device, dtype: torch.dtype):
        super().__init__()
        import cuequivariance as cue
        import cuequivariance_torch as cuet

        def to_cue(irreps):
            return cue.Irreps("O3", str(irreps))

        # On the CPU, cuequivariance's pure-torch paths: "naive" for the product, and the
        # fallback for its layout transposes, which otherwise take the CUDA kernel whenever
        # the kernels are installed and a GPU is present, whatever the tensors' device.
        on_cpu = device.type != "cuda"
        self.op = cuet.ChannelWiseTensorProduct(
            to_cue(tp.irreps_in1),
            to_cue(tp.irreps_in2),
            [cue.O3(ir.l, ir.p) for ir in tp.irreps_targets],
            layout=cue.mul_ir,  # e3nn's layout: multiplicity, then components
            shared_weights=False,
            internal_weights=False,
            device=device,
            dtype=dtype,
            method="naive" if on_cpu else None,
            use_fallback=True if on_cpu else None,
        )
        # The paths of tp.instructions (e3nn order), re-sorted the way cuequivariance sorts.
        # A path's weights and outputs are one contiguous block in each order.
        paths = list(range(len(tp.instructions)))
        irreps_of = [tp.irreps_out[i.i_out] for i in tp.instructions]
        cue_paths = sorted(paths, key=lambda k: cue.O3(irreps_of[k].ir.l, irreps_of[k].ir.p))
        if to_cue(o3.Irreps([irreps_of[k] for k in cue_paths])) != self.op.irreps_out:
            raise RuntimeError(f"cuequivariance made {self.op.irreps_out}, not the paths of {tp}")
        weight_blocks = _blocks([mul_ir.mul for mul_ir in irreps_of])
        out_blocks = _blocks([mul_ir.dim for mul_ir in irreps_of])
        weight_index = torch.cat([weight_blocks[k] for k in cue_paths])
        # out_cue[:, position of e3nn's component c in the cuequivariance order]
        cue_offsets = _blocks([irreps_of[k].dim for k in cue_paths])
        position = torch.empty(tp.irreps_out.dim, dtype=torch.long)
        for k, offsets in zip(cue_paths, cue_offsets):
            position[out_blocks[k]] = offsets
        self.register_buffer("weight_index", weight_index.to(device), persistent=False)
        self.register_buffer("out_index", position.to(device), persistent=False)
        self.same_order = cue_paths == paths  # then skip the two gathers

    def forward(self, x, y, weight):
        if self.same_order:
            return self.op(x, y, weight)
        return self.op(x, y, weight[:, self.weight_index])[:, self.out_index]


def _blocks(sizes):
    """The index ranges of consecutive blocks of the given sizes."""
    ends = torch.tensor(sizes).cumsum(0).tolist()
    return [torch.arange(end - size, end) for size, end in zip(sizes, ends)]


def use_backend(model: torch.nn.Module, backend: str) -> torch.nn.Module:
    """Set the backend of every :class:`DepthwiseTensorProduct` in ``model``; returns it.

    >>> from se3tutor import SE3Transformer
    >>> model = use_backend(SE3Transformer("2x0e", "8x0e + 4x1o", "1x0e", max_radius=2.0), "e3nn")
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for module in model.modules():
        if isinstance(module, DepthwiseTensorProduct):
            module.backend = backend
    return model


def runs_cuequivariance_kernels(model: torch.nn.Module, device) -> bool:
    """Whether every :class:`DepthwiseTensorProduct` of ``model`` runs cuequivariance's fused
    CUDA kernels for tensors on ``device``: not e3nn, and not cuequivariance's pure-torch
    fallback, which it takes on the CPU, without ``cuequivariance-ops-torch``, or when the
    node features' multiplicities differ (``kernel_applies``). ``False`` for a model without
    depthwise products.

    >>> from se3tutor import SE3Transformer
    >>> model = SE3Transformer("2x0e", "8x0e + 8x1o", "1x0e", max_radius=2.0)
    >>> runs_cuequivariance_kernels(model, "cpu"), runs_cuequivariance_kernels(model, "cuda")
    (False, False)
    """
    device = torch.device(device)
    products = [m for m in model.modules() if isinstance(m, DepthwiseTensorProduct)]
    return bool(products) and all(
        product.backend in ("auto", "cuequivariance")
        and product.kernel_applies
        and device.type == "cuda"
        and cuequivariance_available(kernels=True)
        for product in products
    )


def prepare_tensor_products(model: torch.nn.Module) -> torch.nn.Module:
    """Call :meth:`DepthwiseTensorProduct.prepare` on every depthwise product of ``model``, for
    the device and dtype of its parameters; returns ``model``. Do this before
    ``torch.compile``: on the cuequivariance backend, a product builds its cuequivariance
    module on first use, which a compiled forward cannot trace."""
    parameter = next(model.parameters())
    for module in model.modules():
        if isinstance(module, DepthwiseTensorProduct):
            module.prepare(parameter.device, parameter.dtype)
    return model
