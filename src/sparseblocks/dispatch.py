"""Which kernel runs: every rule that picks a kernel or a path for the ops, each returning a named :class:`Plan`,
with the figure that decided it beside it.

The ops ask here and run what they are told; kernels never choose other kernels. The rules read plain facts — the
token count ``m``, the weight's :class:`Tiles`, the dtype, the fp32 precision, the GPU's :class:`Device`
(compute capability, SM count) and whether the tensors meet TMA's alignment rules — so they can be checked with
a GPU's properties faked: ``tests/core/test_dispatch.py`` replays 67,200 decisions recorded before the rules
moved here. :func:`force_plan` overrides a decision (tests run each plan under the interpreter with it;
benchmarks compare plans with it).

Figures are same-run timings on an H200 (bf16 unless said); the files are under ``benchmarks/results/h200/``.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from sparseblocks.backend import fp32_dot_precision, interpreted_kernels, switches
from sparseblocks.format import BlockSparseMatrix


class Plan(str, enum.Enum):
    """A way to compute one op."""

    ROWS = "rows"  # the row kernel (a program per M tile and block row), pointer loads
    ROWS_DESCRIPTORS = "rows_descriptors"  # the same kernel with TMA tensor descriptors (Hopper)
    FEW_TOKENS = "few_tokens"  # stored tiles spread evenly over the SMs, cut rows reduced in fp32 (≤ 64 tokens)
    ONE_TOKEN = "one_token"  # one program per stored tile, on the CUDA cores (one token)
    FUSED_MLP = "fused_mlp"  # a whole MLP in one kernel, the hidden tile on chip
    GATED_ROWS = "gated_rows"  # a SwiGLU's act(gate) ⊙ up in one row-kernel launch, then down
    UNFUSED = "unfused"  # an MLP as one product per matrix
    HIDDEN_GRAD_ON_CHIP = "hidden_grad_on_chip"  # (dY · W_down) ⊙ act'(Z) with dY · W_down never stored
    HIDDEN_GRAD_UNFUSED = "hidden_grad_unfused"  # dY · W_down written, then the activation-gradient launch
    COLUMN_SUMS_KERNEL = "column_sums_kernel"  # a bias gradient by the Triton column-sum kernel
    TORCH_SUM = "torch_sum"  # a bias gradient by torch.sum


# The decisions, by name, and the plans each can take (what force_plan accepts).
DECISIONS: dict[str, tuple[Plan, ...]] = {
    "forward": (Plan.ONE_TOKEN, Plan.FEW_TOKENS, Plan.ROWS, Plan.ROWS_DESCRIPTORS),
    "input_grad": (Plan.ROWS, Plan.ROWS_DESCRIPTORS),
    "activation_grad": (Plan.ROWS, Plan.ROWS_DESCRIPTORS),
    "gated_hidden": (Plan.ROWS, Plan.ROWS_DESCRIPTORS),
    "mlp": (Plan.ONE_TOKEN, Plan.FUSED_MLP, Plan.GATED_ROWS, Plan.UNFUSED),
    "hidden_grad": (Plan.HIDDEN_GRAD_ON_CHIP, Plan.HIDDEN_GRAD_UNFUSED),
    "bias_grad": (Plan.COLUMN_SUMS_KERNEL, Plan.TORCH_SUM),
}

# ---------------------------------------------------------------------------------------------- facts


@dataclass(frozen=True)
class Device:
    """What the rules read of a GPU."""

    capability: tuple[int, int]
    multiprocessors: int

    @property
    def hopper(self) -> bool:
        """sm_90 or newer: TMA descriptors, programmatic dependent launch."""
        return self.capability >= (9, 0)


# Triton's interpreter (CPU tensors): a Hopper-like device with two SMs, so that small test shapes still split work
# over programs. Its decisions follow the GPU rules; tests pick other plans with force_plan.
INTERPRETER = Device(capability=(9, 0), multiprocessors=2)


@functools.cache
def device_facts(device: torch.device) -> Device:
    """The :class:`Device` of a CUDA device (asked once per device), :data:`INTERPRETER` for any other."""
    if device.type != "cuda":
        return INTERPRETER
    properties = torch.cuda.get_device_properties(device)
    return Device((properties.major, properties.minor), properties.multi_processor_count)


class Tiles(NamedTuple):
    """What the rules read of a block-sparse weight: logical ``shape`` (N, K), ``block`` (bn, bk), stored tiles.
    (A named tuple: built on every op call, where a frozen dataclass cost ~1 µs more of CPU.)"""

    shape: tuple[int, int]
    block: tuple[int, int]
    nnz: int

    @classmethod
    def of(cls, w: BlockSparseMatrix) -> Tiles:
        values = w.values.shape
        return cls(tuple(w.shape), (values[1], values[2]), values[0])

    @property
    def grid(self) -> tuple[int, int]:
        """Block rows and block columns."""
        (n, k), (bn, bk) = self.shape, self.block
        return -(-n // bn), -(-k // bk)

    @property
    def small(self) -> bool:
        """Tiles of at most ``SMALL_TILE`` elements."""
        return self.block[0] * self.block[1] <= SMALL_TILE


# ---------------------------------------------------------------------------------------------- forcing

_forced: contextvars.ContextVar[dict[str, Plan] | None] = contextvars.ContextVar("sparseblocks_plans", default=None)


@contextlib.contextmanager
def force_plan(**plans: Plan | str) -> Iterator[None]:
    """Within the block, the named decisions (keys of :data:`DECISIONS`) take the given plans, e.g.
    ``force_plan(forward="few_tokens", mlp="fused_mlp")``. A forced plan the inputs cannot run raises a
    ``ValueError`` rather than run another one. Per thread and per context (``contextvars``). Under Triton's
    interpreter the ops inside the block run the kernels on CPU tensors too (:func:`backend.interpreted_kernels`)."""
    chosen = dict(_forced.get() or {})
    for decision, plan in plans.items():
        if decision not in DECISIONS:
            raise ValueError(f"unknown decision {decision!r}; known: {sorted(DECISIONS)}")
        plan = Plan(plan)
        if plan not in DECISIONS[decision]:
            raise ValueError(f"{decision} takes one of {[p.value for p in DECISIONS[decision]]}, got {plan.value!r}")
        chosen[decision] = plan
    token = _forced.set(chosen)
    try:
        with interpreted_kernels():
            yield
    finally:
        _forced.reset(token)


def path_context(dtype: torch.dtype) -> tuple:
    """Every switch besides the inputs that can change the path an op on ``dtype`` tensors takes or its kernels'
    constexprs: the forced plans (:func:`force_plan`) and ``backend.switches``. A cache of what an op ran
    (``ops/prepared_calls.py``) keys on it, so a new switch goes here or there. Autocast is not here: the ops cast
    their inputs under it, and the cache is bypassed there."""
    plans = _forced.get()
    return None if plans is None else tuple(plans.items()), *switches(dtype)


# A fact the rules may need, given as its value or as a function computing it (called only where a rule reads it:
# checking descriptor alignment costs a few µs of CPU that a one-token call should not pay).
Fact = bool | Callable[[], bool]


def _known(fact: Fact) -> bool:
    return fact() if callable(fact) else fact


def _forced_plan(decision: str) -> Plan | None:
    """The plan forced for ``decision`` in this context, if any. The rules ask this first and build nothing else
    when it is None: they run on every op call."""
    plans = _forced.get()
    return None if plans is None else plans.get(decision)


def _checked(decision: str, forced: Plan, why_not: str | None) -> Plan:
    """``forced``, unless the inputs cannot run it (``why_not``)."""
    if why_not is not None:
        raise ValueError(f"the forced {decision} plan {forced.value!r} cannot run here: {why_not}")
    return forced


# ---------------------------------------------------------------------------------------------- row loads

# The descriptor kernel's GPU time is 10-20% shorter than the pointer kernel's, its CPU time to issue ~40 µs longer
# (four TensorDescriptors built and checked in Python, five encoded by the driver per launch:
# launch_overhead.txt). A product under about this many FLOPs takes less GPU time than that at the ~250 TFLOP/s
# these kernels reach, so in an eager model the CPU sets the pace and the pointer kernel finishes first. The choice
# reads the shapes alone, not whether a CUDA graph is being captured: a kernel first chosen during a capture would be
# autotuned there, which breaks the capture.
DESCRIPTOR_MIN_FLOPS = 16e9


def descriptors_allowed(dtype: torch.dtype, mode: str, device: Device, precision: str | None = None) -> bool:
    """Whether the descriptor kernel may take a ``mode`` launch (``"forward"``, ``"input_grad"``,
    ``"activation_grad"``, ``"gated_hidden"`` or ``"hidden_grad"``) in ``dtype`` on ``device`` (alignment aside).

    A Hopper GPU (below: plain loads, never measured), and 16-bit data, or fp32 in the forward mode with its
    products on the tensor cores (TF32, tf32x3: 1.14-1.44x faster than pointer loads, tune_fp32_tf32x3.txt). IEEE
    fp32 (CUDA-core products) ran 5-15x slower by descriptor; the fp32 gradient and gated modes are not yet timed.
    """
    if not device.hopper:
        return False
    if dtype in (torch.float16, torch.bfloat16):
        return True
    precision = precision or fp32_dot_precision()
    return dtype == torch.float32 and precision != "ieee" and mode == "forward"


def addressable(t: torch.Tensor) -> bool:
    """A 2-D tensor a descriptor can address: 16-byte aligned base and row stride, unit column stride."""
    return t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def tiles_addressable(w: BlockSparseMatrix) -> bool:
    """Whether a descriptor can address ``w``'s stored tiles: at least one, contiguous, 16-byte aligned, rows of 16
    bytes or more (always true from blocks of 16 on, int8 and fp8 tiles included)."""
    return (
        w.nnz > 0
        and w.values.is_contiguous()
        and w.values.data_ptr() % 16 == 0
        and w.values.shape[2] * w.values.element_size() >= 16
    )


def descriptors_fit(
    x2: torch.Tensor,
    w: BlockSparseMatrix,
    mode: str,
    grad2: torch.Tensor | None = None,
    gate: BlockSparseMatrix | None = None,
) -> bool:
    """Whether the descriptor kernel can take a ``mode`` launch on ``x2`` ``(M, IN)`` (with ``grad2``, ``gate``)
    and its ``(M, OUT)`` output: :func:`descriptors_allowed` and every tensor addressable."""
    out_features = w.shape[1] if mode == "input_grad" else w.shape[0]
    return (
        descriptors_allowed(x2.dtype, mode, device_facts(x2.device))
        and tiles_addressable(w)
        and (gate is None or tiles_addressable(gate))
        and x2.shape[0] > 0
        and (out_features * x2.element_size()) % 16 == 0
        and addressable(x2)
        and (grad2 is None or addressable(grad2))
        # W8A8: the row kernel reads x quantized to fp8, a fresh (M, K) copy: its rows must be 16-byte multiples
        and (not w.fp8_activations or x2.shape[1] % 16 == 0)
    )


_NOT_ADDRESSABLE = "the inputs do not meet the descriptor kernel's dtype, GPU or alignment rules"


def row_loads(m: int, tiles: Tiles, fits: Fact, decision: str = "forward") -> Plan:
    """How the row kernel reads its tiles for an ``m``-row product: by descriptor where they ``fit`` and the
    product has ``DESCRIPTOR_MIN_FLOPS`` or more, else by pointer."""
    forced = _forced_plan(decision)
    if forced is not None:
        return _checked(decision, forced, None if forced is Plan.ROWS or _known(fits) else _NOT_ADDRESSABLE)
    flops = 2 * m * tiles.nnz * tiles.block[0] * tiles.block[1]
    return Plan.ROWS_DESCRIPTORS if flops >= DESCRIPTOR_MIN_FLOPS and _known(fits) else Plan.ROWS


# ---------------------------------------------------------------------------------------------- few tokens

MAX_TOKENS = 64  # the most rows of x the few-token kernel takes
ALWAYS_TOKENS = 16  # up to here it beat the row kernel in nearly every case of `bench decode`
# Programs per SM of the few-token kernel (tiles per program = ceil(nnz / (programs per SM · SMs))): tiles of at
# most SMALL_TILE elements take more programs, each streaming its tiles one after the other, to hide the latency of
# their small loads; larger tiles take fewer (tune_decode_4_16_tokens.txt).
PROGRAMS_PER_SM = 4
PROGRAMS_PER_SM_SMALL_TILES = 8
SMALL_TILE = 32 * 32  # elements
# At one token, rows of at least this many small tiles stream faster through the few-token kernel (several tiles per
# program) than through the one-token kernel (a program per tile). Blocks of 32 at 50%, one token, same run
# (decode_ab_one_stage.txt): Llama-1B down 12.4 µs vs the one-token kernel's 15.7, Llama-8B up 25.6 vs 33.0, down
# 25.4 vs 40.3 (dense: 13.2, 30.2, 32.0). Rows of 32 small tiles (Llama-1B up: 12.1 vs 11.1 µs at 4 tokens, the same
# kernel and x tile) and larger tiles went faster through the one-token kernel (decode_ab_prefetch.txt).
FEW_TOKEN_KERNEL_MIN_TILES_PER_ROW = 64


def few_tokens_pay(m: int, tiles: Tiles, device: Device) -> bool:
    """Whether ``m`` rows of x go faster through the decode kernels than through the row kernel (``bench decode``).

    Up to ``ALWAYS_TOKENS`` they do. Above, the row kernel's wide M tile wins unless the weight has fewer block
    rows than half the SMs (down projections), where the row kernel leaves SMs idle; and with blocks 128 rows tall
    the row kernel won at 64 tokens even then, in 10 of 12 cases measured with the descriptor row kernel
    (decode_recheck.json). The grid measured 16 and 64 tokens only: 17 to 63 follow the 64-token result.
    """
    if not 1 <= m <= MAX_TOKENS:
        return False
    if m <= ALWAYS_TOKENS:
        return True
    return 2 * tiles.grid[0] < device.multiprocessors and tiles.block[0] < 128


def one_token_kernel_pays(tiles: Tiles) -> bool:
    """Whether one row of x goes faster through the one-token kernel than through the few-token one: unless the
    tiles are small and rows hold ``FEW_TOKEN_KERNEL_MIN_TILES_PER_ROW`` of them on average."""
    return not tiles.small or tiles.nnz < FEW_TOKEN_KERNEL_MIN_TILES_PER_ROW * tiles.grid[0]


def forward_plan(m: int, tiles: Tiles, device: Device, fits_descriptors: Fact) -> Plan:
    """The kernel of ``spmm``'s forward for ``m`` rows of x: one token, few tokens, or the row kernel
    (:func:`row_loads`)."""

    forced = _forced_plan("forward")
    if forced is not None:
        if forced is Plan.ONE_TOKEN:
            why = None if m == 1 else f"the one-token kernel takes one row of x, got {m}"
        elif forced is Plan.FEW_TOKENS:
            why = None if 1 <= m <= MAX_TOKENS else f"the decode kernels take 1..{MAX_TOKENS} rows of x, got {m}"
        else:
            why = None if forced is Plan.ROWS or _known(fits_descriptors) else _NOT_ADDRESSABLE
        return _checked("forward", forced, why)
    if few_tokens_pay(m, tiles, device):
        return Plan.ONE_TOKEN if m == 1 and one_token_kernel_pays(tiles) else Plan.FEW_TOKENS
    flops = 2 * m * tiles.nnz * tiles.block[0] * tiles.block[1]
    return Plan.ROWS_DESCRIPTORS if flops >= DESCRIPTOR_MIN_FLOPS and _known(fits_descriptors) else Plan.ROWS


def few_token_tiles_per_program(tiles: Tiles, device: Device) -> int:
    """Tiles per program of the few-token kernel: about ``PROGRAMS_PER_SM`` programs on each SM
    (``PROGRAMS_PER_SM_SMALL_TILES`` for small tiles)."""
    per_sm = PROGRAMS_PER_SM_SMALL_TILES if tiles.small else PROGRAMS_PER_SM
    return max(1, -(-tiles.nnz // (per_sm * device.multiprocessors)))


# ---------------------------------------------------------------------------------------------- MLPs

# The fused kernel recomputes each hidden tile once per W2 block row that stores a tile in its column: the first
# product costs (W2 block rows x W2 density) times the unfused one. Past a factor of 1 the unfused path was as fast
# or faster (bench mlp: mlp.md).
MAX_RECOMPUTE = 1.0
FUSED_MIN_TOKENS = 65  # below, the unfused products' decode kernel streams the weights faster (4x at one token)


def tiles_chain(up: Tiles, down: Tiles, gate: Tiles | None) -> bool:
    """Whether the fused kernel can take these weights: up's (and gate's) block rows as tall as down's block
    columns are wide (one hidden tile), gate tiled like up."""
    return down.block[1] == up.block[0] and (gate is None or gate.block == up.block)


def recompute_factor(down: Tiles) -> float:
    """How many times the fused kernel computes each hidden tile: W2's block rows x W2's density."""
    return down.nnz / down.grid[1]


def mlp_plan(m: int, up: Tiles, down: Tiles, gate: Tiles | None, device: Device, fp8_activations: bool = False) -> Plan:
    """The path of an MLP's inference (no gradient, no dropout) for ``m`` tokens, where the kernels run:

    - ``ONE_TOKEN``: two launches of the one-token kernel (the hidden activation — gated: gate, up and their
      product at once —, then down), gate tiled like up;
    - ``FUSED_MLP``: one kernel, the hidden tile on chip, past ``FUSED_MIN_TOKENS`` and where it computes each
      hidden tile at most ``MAX_RECOMPUTE`` times (95% sparsity, or 90% with blocks of 128 on ViT-B-sized MLPs);
    - ``GATED_ROWS``: a gated MLP the fused kernel does not pay for, with as many tokens as ``spmm`` would give the
      row kernel: act(gate) ⊙ up in one launch, then down;
    - ``UNFUSED``: a product per matrix (few tokens: each through the decode kernel, which streams faster).

    ``fp8_activations`` (W8A8 weights, :func:`fp8_products`): ``UNFUSED``, so that each product takes the row kernel
    where it runs fp8 × fp8; the fused, gated and one-token launches multiply weight-only (not timed yet).
    """
    same_tiles = gate is not None and gate.block == up.block
    chain = tiles_chain(up, down, gate)
    one_token = m == 1 and (gate is None or same_tiles)
    forced = _forced_plan("mlp")
    if forced is not None:
        why = {
            Plan.ONE_TOKEN: None if one_token else "one token and a gate tiled like up",
            Plan.FUSED_MLP: None if chain else "up's block rows as tall as down's block columns, gate like up",
            Plan.GATED_ROWS: None if same_tiles else "a gate tiled like up",
            Plan.UNFUSED: None,
        }[forced]
        return _checked("mlp", forced, why)
    if fp8_activations:
        return Plan.UNFUSED
    if one_token:
        return Plan.ONE_TOKEN
    if chain and m >= FUSED_MIN_TOKENS and recompute_factor(down) <= MAX_RECOMPUTE:
        return Plan.FUSED_MLP
    return Plan.GATED_ROWS if same_tiles and not few_tokens_pay(m, up, device) else Plan.UNFUSED


def hidden_grad_plan(on_chip_fits: Fact) -> Plan:
    """An MLP backward's ``(dY · W_down) ⊙ act'(Z)``: on chip (one descriptor-kernel launch computing each tile of
    dY · W_down where it is used) wherever the inputs allow it, else two launches."""
    forced = _forced_plan("hidden_grad")
    if forced is Plan.HIDDEN_GRAD_UNFUSED:
        return forced
    fits = _known(on_chip_fits)
    if forced is not None and not fits:
        why = "down's block columns as wide as up's block rows, inputs the descriptor kernel can address"
        return _checked("hidden_grad", forced, why)
    return Plan.HIDDEN_GRAD_ON_CHIP if fits else Plan.HIDDEN_GRAD_UNFUSED


def hidden_grad_on_chip_fits(
    x2: torch.Tensor, grad2: torch.Tensor, up: BlockSparseMatrix, down: BlockSparseMatrix
) -> bool:
    """Whether one launch can compute an MLP's hidden gradient on chip: down's block columns as wide as up's block
    rows, down's tiles and the activation-gradient launch's inputs addressable by descriptor."""
    return (
        down.block_shape[1] == up.block_shape[0]
        and tiles_addressable(down)
        and descriptors_fit(x2, up, "hidden_grad", grad2)
    )


# ---------------------------------------------------------------------------------------------- quantized tiles
# Quantized tiles (int8, fp8 e4m3 with float32 scales per tile row) run in every inference plan above (forward,
# gated hidden, one-token and fused MLPs), weight-only (W8A16): each tile converted to the activations' dtype in the
# load path (exact: |q| ≤ 127 and e4m3 fit bf16 and fp16), its fp32 product scaled per row. Their GPU speed is not
# measured yet; the rules above read the tile pattern only, so they pick as for 16-bit tiles. The backward plans
# never see them (a quantized product has no backward).

FP8_MIN_CAPABILITY = (8, 9)  # Triton's fp8e4nv (conversions and tensor-core products): Ada and Hopper on
logger = logging.getLogger("sparseblocks")


def check_quantized_tiles(w: BlockSparseMatrix, device: Device) -> None:
    """Raise ``ValueError`` for fp8 tiles on a GPU below :data:`FP8_MIN_CAPABILITY` (Triton cannot convert them
    there): quantize to int8 instead. Nothing is dequantized behind the caller's back."""
    if w.values.dtype == torch.float8_e4m3fn and device.capability < FP8_MIN_CAPABILITY:
        raise ValueError(f"fp8 tiles need a GPU of compute capability >= 8.9 (Triton's fp8e4nv); this one is "
                         f"{device.capability[0]}.{device.capability[1]}: quantize to int8 instead")  # fmt: skip


# Triton's fp8 tensor-core product needs K ≥ 32 per dot (a 16-wide tile fails to compile on an H100).
FP8_MIN_DOT_K = 32


def fp8_products(plan: Plan, tiles: Tiles, device: Device) -> bool:
    """Whether a forward on ``plan`` multiplies W8A8 tiles fp8 × fp8 (activations quantized per token): the row
    kernel (pointer loads or descriptors) on a GPU with fp8 tensor cores, tiles at least ``FP8_MIN_DOT_K`` wide.
    The decode kernels, where the weight stream sets the time, multiply weight-only, as do narrower tiles."""
    return (plan in (Plan.ROWS, Plan.ROWS_DESCRIPTORS) and device.capability >= FP8_MIN_CAPABILITY
            and tiles.block[1] >= FP8_MIN_DOT_K)  # fmt: skip


@functools.cache
def notice_weight_only(plan: str) -> None:
    """Say once per plan that W8A8 tiles are multiplied weight-only there."""
    logger.warning("sparseblocks: fp8 activations (W8A8) run in the row kernel only; the %s plan multiplies the "
                   "fp8 tiles weight-only (activations in their own dtype)", plan)  # fmt: skip


# ---------------------------------------------------------------------------------------------- bias gradients

# From this many elements on, the column-sum kernel's GPU time saved (ViT-B fc2's 50432 x 768 dY: 39 µs against
# torch.sum's 56 µs) outweighs its CPU cost (24 µs to issue against 8 µs).
COLUMN_SUMS_KERNEL_MIN_ELEMENTS = 1 << 24


def bias_grad_plan(elements: int) -> Plan:
    """How a layer without activation sums its bias gradient over ``elements`` of dY."""
    forced = _forced_plan("bias_grad")
    if forced is not None:
        return forced
    return Plan.COLUMN_SUMS_KERNEL if elements >= COLUMN_SUMS_KERNEL_MIN_ELEMENTS else Plan.TORCH_SUM
