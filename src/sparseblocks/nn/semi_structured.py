"""``SemiStructuredLinear``: a drop-in ``nn.Linear`` whose weight is 2:4 sparse (NVIDIA's sparse tensor cores).

In every group of 4 consecutive weights of a row, 2 are zero. The layer keeps only the other two: ``values``
``(N, K/2)``, the kept weights in row order (the trainable parameter), and ``groups`` uint8 ``(N, K/4)``, one 4-bit
mask per group saying which two positions are kept. That is 0.625x the bytes of a bf16 weight (0.5625x for
PyTorch's own compressed form, whose metadata layout depends on the backend, hence not our file format).

On a CUDA GPU, in fp16/bf16, eager and without gradients, the product runs on PyTorch's semi-structured sparse
tensor (cuSPARSELt or CUTLASS), compressed once per version of ``values``; everywhere else (CPU, fp32, training,
``torch.compile``) through the dense weight rebuilt from ``values`` and ``groups``: correct, at dense speed, and
training touches the kept weights only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparseblocks.masks import n_of_m_mask
from sparseblocks.nn.linear import dense_linear, trainable_as

GROUP = 4  # weights per group along K
KEPT = 2  # weights kept per group
# Group masks with exactly two of four bits set: 0b0011, 0b0101, 0b0110, 0b1001, 0b1010, 0b1100.
_VALID_GROUPS = torch.tensor([bin(code).count("1") == KEPT for code in range(256)])
# What PyTorch's sparse kernels take (both backends): bf16/fp16 weights with N % 32 == 0 and K % 64 == 0.
_FAST_DTYPES = (torch.float16, torch.bfloat16)
_FAST_MULTIPLES = (32, 64)


def pack_groups(mask: torch.Tensor) -> torch.Tensor:
    """A bool 2:4 mask ``(N, K)`` as uint8 group masks ``(N, K/4)`` (bit i: position i of the group is kept)."""
    bits = mask.reshape(mask.shape[0], -1, GROUP).to(torch.uint8)
    return (bits << torch.arange(GROUP, dtype=torch.uint8, device=mask.device)).sum(-1, dtype=torch.uint8)


def unpack_groups(groups: torch.Tensor) -> torch.Tensor:
    """uint8 group masks ``(N, K/4)`` as the bool mask ``(N, K)``."""
    shifts = torch.arange(GROUP, dtype=torch.uint8, device=groups.device)
    return ((groups[..., None] >> shifts) & 1).bool().reshape(groups.shape[0], -1)


def check_groups(groups: torch.Tensor, shape: tuple[int, int]) -> None:
    """Raise ``ValueError`` unless ``groups`` is uint8 ``(N, K/4)`` with two bits set in every entry."""
    n, k = shape
    if groups.dtype != torch.uint8 or tuple(groups.shape) != (n, k // GROUP):
        raise ValueError(f"groups must be uint8 of shape {(n, k // GROUP)}, got {groups.dtype} {tuple(groups.shape)}")
    valid = _VALID_GROUPS.to(groups.device)[groups.long()]
    if not bool(valid.all()):
        bad = (~valid).nonzero()[0].tolist()
        raise ValueError(f"groups[{bad[0]}, {bad[1]}] = {int(groups[bad[0], bad[1]])} does not keep 2 of 4 weights")


class SemiStructuredLinear(nn.Module):
    """``y = x · Wᵀ + b`` with W 2:4 sparse (see the module docstring for the storage and the two paths).

    Build one with :meth:`from_linear` (keep the 2 largest-magnitude weights of every 4, or a given mask).
    """

    def __init__(self, values: torch.Tensor, groups: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        n, half = values.shape
        check_groups(groups, (n, 2 * half))
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        self.out_features, self.in_features = n, 2 * half
        self.values = nn.Parameter(values.detach().clone())
        self.register_buffer("groups", groups.to(values.device))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self._compressed: tuple[tuple, torch.Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor | None = None) -> SemiStructuredLinear:
        """Convert an ``nn.Linear`` (in_features a multiple of 4): keep the 2 largest ``|w|`` of every 4, or the
        bool ``(N, K)`` 2:4 ``mask`` given."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        if weight.shape[1] % GROUP:
            raise ValueError(f"2:4 sparsity needs in_features divisible by {GROUP}, got {weight.shape[1]}")
        if mask is None:
            mask = n_of_m_mask(weight.abs(), KEPT, GROUP)
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask must have the weight's shape {tuple(weight.shape)}, got {tuple(mask.shape)}")
        mask = mask.to(device=weight.device, dtype=torch.bool)
        groups = pack_groups(mask)
        check_groups(groups, tuple(weight.shape))
        layer = cls(weight[mask].reshape(weight.shape[0], -1), groups, linear.bias)
        trainable_as((layer.values, layer.bias), (linear.weight, linear.bias))
        return layer

    def mask(self) -> torch.Tensor:
        """The bool ``(N, K)`` mask of kept weights."""
        return unpack_groups(self.groups)

    def weight(self) -> torch.Tensor:
        """The dense ``(N, K)`` weight, zeros where pruned; differentiable in ``values``."""
        dense = self.values.new_zeros(self.out_features, self.in_features)
        return dense.masked_scatter(self.mask(), self.values)

    def _fast_path(self, x: torch.Tensor) -> bool:
        n, k = self.out_features, self.in_features
        return (
            x.is_cuda
            and x.dtype == self.values.dtype
            and x.dtype in _FAST_DTYPES
            and n % _FAST_MULTIPLES[0] == 0
            and k % _FAST_MULTIPLES[1] == 0
            and not (torch.is_grad_enabled() and (x.requires_grad or self.values.requires_grad))
            and not torch.is_autocast_enabled()
            # torch.compile cannot trace the cached compressed weight: compiled models take the masked product
            and not torch.compiler.is_compiling()
        )

    def compressed_weight(self) -> torch.Tensor:
        """The weight as PyTorch's semi-structured sparse tensor (CUDA only), rebuilt when ``values`` changed."""
        key = (self.values.data_ptr(), self.values._version, self.values.dtype)
        if self._compressed is None or self._compressed[0] != key:
            with torch.no_grad():
                self._compressed = (key, torch.sparse.to_sparse_semi_structured(self.weight().contiguous()))
        return self._compressed[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fast_path(x):
            return F.linear(x, self.compressed_weight(), self.bias)
        return F.linear(x, self.weight(), self.bias)

    def to_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` with the same function (zeros where pruned)."""
        linear = dense_linear(self.weight(), self.bias)
        trainable_as((linear.weight, linear.bias), (self.values, self.bias))
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 2:4, bias={self.bias is not None}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Masks from outside are checked before anything computes with them.
        groups = state_dict.get(prefix + "groups")
        if groups is not None:
            check_groups(groups, (self.out_features, self.in_features))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
