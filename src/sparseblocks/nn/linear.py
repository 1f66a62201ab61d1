"""``BlockSparseLinear``: a drop-in ``nn.Linear`` whose weight is a ``BlockSparseMatrix``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from sparseblocks.format import INDEX_NAMES, STORED_INDEX_NAMES, BlockSparseMatrix, gather_tiles, normalize_block_size
from sparseblocks.masks import random_block_mask
from sparseblocks.ops import spmm
from sparseblocks.ops.spmm import spmm_inference_only


def trainable_as(
    parameters: tuple[nn.Parameter, nn.Parameter | None], like: tuple[torch.Tensor, torch.Tensor | None]
) -> None:
    """A conversion keeps trainability: each of a new layer's (weight or values, bias) requires gradients as its
    counterpart in the layer converted did (a frozen layer stays frozen)."""
    for parameter, original in zip(parameters, like, strict=True):
        if parameter is not None and original is not None:
            parameter.requires_grad_(original.requires_grad)


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight`` ``(N, K)`` and ``bias`` ``(N,)``, on their device and dtype."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


class BlockSparseLinear(nn.Module):
    """``y = x · Wᵀ + b`` with W block-sparse: only the kept ``(bn, bk)`` tiles are stored and multiplied.

    ``values`` ``(nnz, bn, bk)`` is the trainable parameter; ``crow_indices`` and ``col_indices`` are buffers and,
    with ``values`` and ``bias``, make up the state dict (validated when loaded).

    The constructor makes a fresh layer with a random pattern at the given sparsity, like ``nn.Linear`` does
    for a dense one; :meth:`from_linear` converts a trained ``nn.Linear``, :meth:`from_matrix` wraps a matrix.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        sparsity: float = 0.9,
        block_size: int | Sequence[int] = 64,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        bn, bk = normalize_block_size(block_size)
        grid = (math.ceil(out_features / bn), math.ceil(in_features / bk))
        dense = torch.empty(out_features, in_features, device=device, dtype=dtype)
        mask = random_block_mask(grid, 1.0 - sparsity).to(dense.device)
        # Uniform in ±1/sqrt(fan-in), as nn.Linear, but with the fan-in the sparse rows really have.
        fan_in = max(1.0, in_features * mask.float().mean().item())
        nn.init.uniform_(dense, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        bias_tensor = None
        if bias:
            bias_tensor = torch.empty(out_features, device=device, dtype=dtype)
            nn.init.uniform_(bias_tensor, -1 / math.sqrt(in_features), 1 / math.sqrt(in_features))
        self._set_matrix(BlockSparseMatrix.from_dense(dense, (bn, bk), mask=mask), bias_tensor)

    def _set_matrix(self, matrix: BlockSparseMatrix, bias: torch.Tensor | None) -> None:
        self.out_features, self.in_features = matrix.shape
        self.values = nn.Parameter(matrix.values.detach().clone())
        for name, index in matrix.index_tensors().items():
            # Only the stored two go into the state dict; the derived ones are recomputed whenever a pattern is set.
            # A copy: layers made from one matrix would otherwise share buffers, which a checkpoint stores once.
            self.register_buffer(name, index.clone(), persistent=name in STORED_INDEX_NAMES)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def from_matrix(cls, matrix: BlockSparseMatrix, bias: torch.Tensor | None = None) -> BlockSparseLinear:
        """Wrap a ``BlockSparseMatrix`` (logical ``(out_features, in_features)``) and an optional bias ``(N,)``."""
        if bias is not None and tuple(bias.shape) != (matrix.shape[0],):
            raise ValueError(f"bias must have shape ({matrix.shape[0]},), got {tuple(bias.shape)}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._set_matrix(matrix, bias)
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        sparsity: float = 0.9,
        block_size: int | Sequence[int] = 64,
        mask: torch.Tensor | None = None,
    ) -> BlockSparseLinear:
        """Convert an ``nn.Linear``: keep the ``1 - sparsity`` fraction of tiles with the largest L2 norm.

        Or pass ``mask``, a bool block mask ``(ceil(N/bn), ceil(K/bk))``, to choose the tiles yourself.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        keep = None if mask is not None else 1.0 - sparsity
        matrix = BlockSparseMatrix.from_dense(linear.weight.detach(), block_size, mask=mask, keep=keep)
        layer = cls.from_matrix(matrix, linear.bias)
        trainable_as((layer.values, layer.bias), (linear.weight, linear.bias))
        return layer

    @property
    def matrix(self) -> BlockSparseMatrix:
        """The weight as a ``BlockSparseMatrix`` sharing this module's parameter and buffers."""
        # Read from the module's dicts: nn.Module.__getattr__ made this 8 µs of CPU a call, 2 µs this way
        buffers = self._buffers
        indices = {name: buffers[name] for name in INDEX_NAMES}
        return BlockSparseMatrix.from_parts(self._parameters["values"], (self.out_features, self.in_features), indices)

    def set_pattern(self, mask: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Move to another tile pattern mid-training (prune-and-grow): mask is bool ``(ceil(N/bn), ceil(K/bk))``.

        Tiles in both patterns keep their values and, if ``optimizer`` is given, their optimizer state: every state
        tensor whose first dim runs over the tiles (``(nnz, ...)``: Adam's moments, shaped like ``values``, and
        Adafactor's factored ``row_var`` / ``col_var``) is gathered along it; scalars such as ``step`` stay. New
        tiles start at zero with zeroed state. A state tensor of any other shape cannot follow the tiles: then the
        parameter's whole state is dropped, and the optimizer starts it afresh at its next step. ``values`` stays
        the same ``Parameter`` object, so the optimizer keeps working on it. Under DDP the number of tiles must stay
        the same (the gradient buckets are sized once), and every rank must pass the same mask. Under FSDP2
        use ``sparseblocks.integrations.distributed.set_sharded_pattern`` (same rules: the shards are sized once).
        """
        if type(self.values).__name__ == "DTensor":  # nn sits below integrations: the sharded version lives there
            raise TypeError(
                "values are sharded (FSDP2): use sparseblocks.integrations.distributed.set_sharded_pattern"
                "(layer, mask, optimizer)"
            )
        old_tiles = self.values.shape[0]
        matrix, source = self.matrix.with_pattern(mask)
        self.values.data = matrix.values
        self.values.grad = None
        for name, index in matrix.index_tensors().items():
            setattr(self, name, index)
        if optimizer is not None and self.values in optimizer.state:
            state = optimizer.state[self.values]
            tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor) and value.dim()}
            if all(value.shape[0] == old_tiles for value in tensors.values()):
                state.update({key: gather_tiles(value, source) for key, value in tensors.items()})
            else:
                state.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return spmm(x, self.matrix, self.bias)

    def quantize(self, kind: str, label: str | None = None) -> QuantizedBlockSparseLinear:
        """A :class:`QuantizedBlockSparseLinear` holding this layer's tiles quantized (``"int8"``, ``"fp8"``, or
        ``"fp8-w8a8"``: see :meth:`BlockSparseMatrix.quantize`) and a copy of its bias; ``label`` names it in
        errors (``sparsify`` passes the module name). For inference: fine-tune before quantizing."""
        layer = QuantizedBlockSparseLinear.from_matrix(self.matrix.quantize(kind), self.bias)
        layer.label = label
        return layer

    def to_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` with the same function (zeros where tiles are pruned)."""
        linear = dense_linear(self.matrix.to_dense(), self.bias)
        trainable_as((linear.weight, linear.bias), (self.values, self.bias))
        return linear

    def extra_repr(self) -> str:
        matrix = self.matrix
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"block={matrix.block_shape}, density={matrix.density:.3f}, bias={self.bias is not None}"
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint may carry another pattern (another nnz). The pattern the load would leave (the state dict's
        # parts over this layer's) is validated, and the layer resized to it, before anything is copied: nothing
        # read from outside reaches a kernel unchecked, and a refused load changes nothing. Optimizer state of the
        # old shape is left as it is: load the optimizer's own state dict after the model's, as a resume does.
        stored = ("values", *STORED_INDEX_NAMES)
        loaded = {name: state_dict[prefix + name] for name in stored if prefix + name in state_dict}
        if loaded:
            parts = {name: loaded.get(name, getattr(self, name)).detach() for name in stored}
            shape = (self.out_features, self.in_features)
            incoming = BlockSparseMatrix(
                parts["values"].contiguous(), parts["crow_indices"], parts["col_indices"], shape
            )
            if incoming.values.shape != self.values.shape:
                # Resized in place: an optimizer built before the load holds this Parameter and must keep updating it
                self.values.data = self.values.new_empty(incoming.values.shape)
                self.values.grad = None
            for name, index in incoming.index_tensors().items():
                setattr(self, name, index.to(self.values.device, copy=True))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if loaded:
            self._settle_assigned_tensors(incoming)

    def _settle_assigned_tensors(self, incoming: BlockSparseMatrix) -> None:
        """After ``load_state_dict(..., assign=True)``, which installs the state dict's own tensors: values
        contiguous, and every index on the values' device (the derived ones were made on the module's old one)."""
        if not self.values.is_contiguous():
            self.values = nn.Parameter(self.values.detach().contiguous(), requires_grad=self.values.requires_grad)
        for name, index in incoming.index_tensors().items():
            if self._buffers[name].device != self.values.device:
                setattr(self, name, index.to(self.values.device, copy=True))


class QuantizedBlockSparseLinear(BlockSparseLinear):
    """A :class:`BlockSparseLinear` whose tiles are quantized (int8 or fp8 e4m3, a float32 scale per tile row), for
    inference: ``y = x · dequant(W)ᵀ + b`` with x in float16, bfloat16 or float32 (the output's dtype); the
    kernels read the 1-byte tiles. ``values`` (no gradient) and the ``scales`` buffer keep their dtypes through
    ``module.to(dtype)``; a backward through the layer raises a ``RuntimeError`` naming it (:attr:`label`).
    Made by :meth:`BlockSparseLinear.quantize`, ``SparsityConfig(quantize=...)`` or a checkpoint."""

    label: str | None = None

    def _set_matrix(self, matrix: BlockSparseMatrix, bias: torch.Tensor | None) -> None:
        if matrix.scales is None:
            raise ValueError("a QuantizedBlockSparseLinear needs quantized tiles (BlockSparseMatrix.quantize)")
        self.out_features, self.in_features = matrix.shape
        self.values = nn.Parameter(matrix.values.detach().clone(), requires_grad=False)  # int8 takes no gradient
        for name, index in matrix.index_tensors().items():
            self.register_buffer(name, index.clone(), persistent=name in STORED_INDEX_NAMES)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.register_buffer("scales", matrix.scales.clone())
        self.fp8_activations = matrix.fp8_activations

    @property
    def quantization(self) -> str:
        return self.matrix.quantization

    @property
    def matrix(self) -> BlockSparseMatrix:
        buffers = self._buffers
        indices = {name: buffers[name] for name in INDEX_NAMES}
        shape = (self.out_features, self.in_features)
        return BlockSparseMatrix.from_parts(self._parameters["values"], shape, indices, buffers["scales"],
                                            self.fp8_activations)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        label = self.label or f"QuantizedBlockSparseLinear({self.in_features}, {self.out_features})"
        return spmm_inference_only(x, self.matrix, self.bias, None, label)

    def quantize(self, kind: str, label: str | None = None) -> QuantizedBlockSparseLinear:
        raise ValueError(f"the layer is quantized already ({self.quantization})")

    def set_pattern(self, mask: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        raise ValueError("quantized tiles are for inference: change the pattern before quantizing")

    def to_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` of the dequantized weight, in the bias's dtype (float32 without a bias)."""
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        return dense_linear(self.matrix.to_dense().to(dtype), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quantization={self.quantization!r}"

    def _apply(self, fn, recurse=True):
        # module.to(dtype), .half(), .bfloat16() cast every floating-point tensor: fp8 tiles and float32 scales must
        # not follow (a cast would silently change the weight). They move with the module's device only.
        kept = {"values": self._parameters.pop("values"), "scales": self._buffers.pop("scales")}
        try:
            super()._apply(fn, recurse)
        finally:
            device = fn(torch.empty(0, device=kept["values"].device)).device
            values = kept["values"]
            if values.device != device:
                values = nn.Parameter(values.data.to(device), requires_grad=False)
            self._parameters["values"] = values
            self._buffers["scales"] = kept["scales"].to(device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # As BlockSparseLinear's, with the scales: the incoming tiles, indices and scales are validated together
        # (dtypes included) before anything is copied.
        names = ("values", "scales", *STORED_INDEX_NAMES)
        if all(prefix + name in state_dict for name in names):
            parts = {name: state_dict[prefix + name].detach() for name in names}
            shape = (self.out_features, self.in_features)
            incoming = BlockSparseMatrix(parts["values"].contiguous(), parts["crow_indices"], parts["col_indices"],
                                         shape, parts["scales"].contiguous(), self.fp8_activations)  # fmt: skip
            device = self.values.device
            self._parameters["values"] = nn.Parameter(torch.empty_like(incoming.values, device=device),
                                                      requires_grad=False)  # fmt: skip
            self._buffers["scales"] = torch.empty_like(incoming.scales, device=device)
            for name, index in incoming.index_tensors().items():
                setattr(self, name, index.to(device, copy=True))
        nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                        unexpected_keys, errors)  # fmt: skip
