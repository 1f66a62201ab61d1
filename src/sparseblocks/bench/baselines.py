"""Dense fp8 × fp8 linears as fp8 serving stacks run them: the baseline that quantized tiles are timed against.

The weight is quantized once to ``float8_e4m3fn`` with a float32 scale per output channel (absmax / 448); the
activations are quantized per token when the product runs (absmax / 448 per row); one ``torch._scaled_mm``
multiplies the two with fp32 accumulation and applies both scales and the bias to the accumulator (the row-wise
scaled GEMM of cuBLAS or CUTLASS on the GPU; PyTorch's CPU build has it too, which the tests use).

Known limits (2026-12): ``_scaled_mm`` takes K and N multiples of 16, so :meth:`FP8Weight.quantize` refuses other
shapes; on a GPU it needs compute capability ≥ 8.9 (:func:`dense_fp8_runs` skips the baseline below, saying why);
its row-wise path writes bf16 or fp16 only before cuBLAS 12.9, so fp32 models fail there (16-bit models, as for
our quantized tiles).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from sparseblocks.bench.results import ratio_cell
from sparseblocks.dispatch import FP8_MIN_CAPABILITY
from sparseblocks.format import quantize_rows
from sparseblocks.integrations.sparsify import SparsityConfig, as_linear, replace_module, target_linears
from sparseblocks.reference import ACTIVATIONS

# Serving stacks quantize the activations in one fused kernel (vLLM's scaled_fp8_quant); quantize_rows run eagerly is
# about nine launches before every product, a cost of launches, not of fp8, that would weigh on the baseline at a
# few tokens (not measured: no GPU in this work). Compiled, it is one or two kernels of the same arithmetic (bitwise
# equal to eager on the CPU); dynamic: the token counts share one graph (one token gets its own).
_quantize_tokens = torch.compile(quantize_rows, dynamic=True)


class FP8Weight(NamedTuple):
    """A dense weight in fp8 e4m3 with a float32 scale per output channel: ``W ≈ values.float() * scales[:, None]``."""

    values: torch.Tensor  # (N, K) float8_e4m3fn, row-major: its .t() is the column-major operand _scaled_mm takes
    scales: torch.Tensor  # (N,) float32: absmax of the row / 448 (1 for a row of zeros)

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> FP8Weight:
        """``weight`` ``(N, K)`` of any float dtype, quantized per output channel (row); N and K multiples of 16."""
        n, k = weight.shape
        if n % 16 or k % 16:
            raise ValueError(f"a dense fp8 weight needs N and K multiples of 16 (torch._scaled_mm), got ({n}, {k})")
        return cls(*quantize_rows(weight))

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scales.nbytes

    def clone(self) -> FP8Weight:
        """The same weight in new memory (competing for the L2 like another layer's)."""
        return FP8Weight(self.values.clone(), self.scales.clone())


def fp8_product(
    xq: torch.Tensor, x_scales: torch.Tensor, weight: FP8Weight, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """``(xq · x_scales[:, None]) · (weight.values · weight.scales[:, None])ᵀ + bias`` accumulated in fp32: xq
    ``(M, K)`` float8_e4m3fn row-major, x_scales ``(M,)`` float32, bias ``(N,)`` of ``out_dtype`` or None ->
    ``(M, N)`` of ``out_dtype``."""
    return torch._scaled_mm(xq, weight.values.t(), scale_a=x_scales[:, None], scale_b=weight.scales[None, :],
                            bias=bias, out_dtype=out_dtype)  # fmt: skip


def fp8_linear(
    x: torch.Tensor, weight: FP8Weight, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    """``activation(x · Wᵀ + bias)`` with x quantized to fp8 per token first: x ``(..., K)`` bf16 or fp16 (fp32 where
    ``_scaled_mm`` writes it), bias ``(N,)`` of x's dtype -> ``(..., N)`` of x's dtype. The activation
    (:data:`~sparseblocks.reference.ACTIVATIONS`) runs after the product, as on the dense bf16 path."""
    xq, x_scales = _quantize_tokens(x.reshape(-1, x.shape[-1]))
    y = fp8_product(xq, x_scales, weight, bias, x.dtype)
    return ACTIVATIONS[activation](y.reshape(*x.shape[:-1], y.shape[-1]))


class DenseFP8Linear(nn.Module):
    """An ``nn.Linear`` run as :func:`fp8_linear`, for inference: buffers ``weight`` ``(N, K)`` float8_e4m3fn,
    ``weight_scale`` ``(N,)`` float32 and ``bias`` ``(N,)`` in the linear's dtype (or None)."""

    def __init__(self, weight: FP8Weight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.values)
        self.register_buffer("weight_scale", weight.scales)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> DenseFP8Linear:
        """``linear``'s weight quantized per output channel, its bias kept as it is."""
        return cls(FP8Weight.quantize(linear.weight), None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, FP8Weight(self.weight, self.weight_scale), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_dense_fp8(model: nn.Module, config: SparsityConfig) -> list[str]:
    """Replace in place the linears that ``sparsify(model, config)`` would make sparse (the same
    :func:`~sparseblocks.integrations.sparsify.target_linears` of ``config.targets`` and ``config.exclude``, which
    warns when none matches) by :class:`DenseFP8Linear`; return their names."""
    names = []
    for name, module in target_linears(model, config, linear_like=True):
        replace_module(model, name, DenseFP8Linear.from_linear(as_linear(module)))
        names.append(name)
    return names


def dense_fp8_runs(wanted: bool, device: torch.device) -> bool:
    """Whether a benchmark times the dense fp8 baseline: ``wanted`` and ``device`` multiplies fp8 (the CPU does; a
    GPU from compute capability 8.9, the first with fp8 tensor cores). Prints why not when wanted and it cannot."""
    if not wanted or device.type != "cuda":
        return wanted
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        print(f"dense_fp8 not timed: fp8 products need compute capability >= 8.9, this GPU has "
              f"{capability[0]}.{capability[1]}", flush=True)  # fmt: skip
        return False
    return True


# the tables' note on their dense fp8 columns (fp8_header, fp8_cells)
FP8_NOTE = (
    "`dense_fp8` is the dense baseline in fp8 × fp8 (weights quantized per output channel, activations per token "
    "before each product, `torch._scaled_mm`), as a speedup over dense; `X vs dense_fp8` is X's speedup over it.\n"
)


def fp8_header(compared: list[str]) -> list[str]:
    """A table's dense fp8 columns: its speedup over dense, then each impl of ``compared``'s speedup over it."""
    return ["dense_fp8", *(f"{impl} vs dense_fp8" for impl in compared)]


def fp8_cells(dense: float, dense_fp8: float | None, compared: list[float | None]) -> list[str]:
    """Their cells from times (any unit, the same for all; None where not measured): dense over dense fp8, then
    dense fp8 over each of ``compared``."""
    return [ratio_cell(dense, dense_fp8), *(ratio_cell(dense_fp8, time) for time in compared)]
