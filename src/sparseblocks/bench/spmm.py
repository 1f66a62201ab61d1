"""``sparseblocks bench spmm``: Y = X·Wᵀ on real layer shapes, ours against every path a user could pick.

In one run on one GPU: dense ``F.linear`` (cuBLAS), PyTorch's BSR ``F.linear``, stk's ``dds`` (block 128, when
stk imports) and ``sparseblocks.ops.spmm``, beside each case's physical floor; per shape in bf16/fp16 also
PyTorch's 2:4 sparse tensor cores (``torch_2_4``, sparsity 0.5, the other way to halve a layer). Masks are random
with exactly the target number of blocks, plus one skewed mask (rows of very unequal nnz) per shape.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sparseblocks.backend import fp32_precision
from sparseblocks.bench.harness import (
    Ceilings,
    input_sets,
    measure_ceilings,
    start_run,
    time_ms,
)
from sparseblocks.bench.results import write_result
from sparseblocks.format import BlockSparseMatrix
from sparseblocks.masks import random_block_mask, skewed_block_mask
from sparseblocks.nn import SemiStructuredLinear
from sparseblocks.ops import spmm

# (M, K, N) of real layers: ViT-B/16 at 256 images of 197 tokens, Llama-3.2-1B at 8192 tokens.
SHAPES = {
    "vit_b_fc1": (50432, 768, 3072),
    "vit_b_fc2": (50432, 3072, 768),
    "llama_1b_up": (8192, 2048, 8192),
    "llama_1b_down": (8192, 8192, 2048),
}
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
BLOCKS = (16, 32, 64, 128)
BATCH_SWEEP_IMAGES = (16, 32, 64, 128, 256, 512)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    shape: str
    m: int
    k: int
    n: int
    dtype: str
    sparsity: float
    block: int
    mask: str = "random"


def cases(quick: bool, dtypes: tuple[str, ...], shapes: tuple[str, ...], sweep: bool) -> Iterator[Case]:
    """The grid: shapes × sparsity × block × dtype, the skewed masks, and (``sweep``) the ViT fc1 batch sweep."""
    sparsities, blocks = ((0.5, 0.9), (32, 64, 128)) if quick else (SPARSITIES, BLOCKS)
    for dtype, name in itertools.product(dtypes, shapes):
        m, k, n = SHAPES[name]
        for sparsity, block in itertools.product(sparsities, blocks):
            yield Case(name, m, k, n, dtype, sparsity, block)
        yield Case(name, m, k, n, dtype, 0.9, 64, mask="skewed")
    if sweep:
        k, n = SHAPES["vit_b_fc1"][1:]
        for images, block in itertools.product(BATCH_SWEEP_IMAGES, (32, 64, 128)):
            if images != 256 or "vit_b_fc1" not in shapes or "bf16" not in dtypes:  # else the grid has it
                yield Case("vit_b_fc1", 197 * images, k, n, "bf16", 0.9, block)


def random_weight(
    n: int,
    k: int,
    sparsity: float,
    block: int,
    dtype: torch.dtype,
    generator: torch.Generator,
    mask: str = "random",
    device: str = "cuda",
) -> BlockSparseMatrix:
    """An ``(n, k)`` weight with exactly the target number of ``block`` tiles, random or skewed rows."""
    grid = (math.ceil(n / block), math.ceil(k / block))
    make_mask = skewed_block_mask if mask == "skewed" else random_block_mask
    block_mask = make_mask(grid, 1.0 - sparsity, generator)
    dense = torch.randn(n, k, generator=generator) / math.sqrt(k)
    return BlockSparseMatrix.from_dense(dense.to(dtype), block, mask=block_mask).to(device)


def sparse_weight(case: Case, dtype: torch.dtype, seed: int = 0, device: str = "cuda") -> BlockSparseMatrix:
    """The case's weight: the same tiles and values on every call with the same seed."""
    generator = torch.Generator().manual_seed(seed)
    return random_weight(case.n, case.k, case.sparsity, case.block, dtype, generator, case.mask, device)


def quantized_weights(w: BlockSparseMatrix, quantize: tuple[str, ...]) -> dict[str, BlockSparseMatrix]:
    """impl name (``sparseblocks_int8`` ...) -> ``w``'s tiles quantized as each kind of ``quantize`` (``int8``,
    ``fp8``, ``fp8-w8a8``); none for fp32 weights (quantized tiles take 16-bit activations)."""
    if w.dtype == torch.float32:
        return {}
    return {f"sparseblocks_{kind.replace('-', '_')}": w.quantize(kind) for kind in quantize}


def implementations(
    w: BlockSparseMatrix, fp32: str = "ieee", quantized: dict[str, BlockSparseMatrix] | None = None
) -> tuple[dict[str, Callable[[torch.Tensor], torch.Tensor]], Callable[[torch.Tensor], torch.Tensor]]:
    """The sparse paths that compute x·wᵀ (stk only where it applies and imports; ours on the ``quantized`` tiles
    too, :func:`quantized_weights`), and the dense one; ours multiplies fp32 tiles in ``fp32`` precision
    (:func:`~sparseblocks.backend.fp32_precision`)."""
    dense = w.to_dense()

    def ours(x: torch.Tensor) -> torch.Tensor:
        with fp32_precision(fp32):
            return spmm(x, w)

    paths = {"sparseblocks": ours}
    paths.update({impl: (lambda x, wq=wq: spmm(x, wq)) for impl, wq in (quantized or {}).items()})
    bsr = w.to_torch_bsr()
    paths["torch_bsr"] = lambda x: F.linear(x, bsr)
    stk_path = stk_linear(w)
    if stk_path is not None:
        paths["stk"] = stk_path
    return paths, (lambda x: F.linear(x, dense))


def stk_linear(w: BlockSparseMatrix) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """stk's dense·sparse product (128×128 blocks only), or None where stk does not apply."""
    if w.block_shape != (128, 128) or (w.dtype != torch.bfloat16 and w.dtype != torch.float16):
        return None
    try:
        import stk
    except ImportError:
        return None
    n, k = w.shape
    # stk builds its own transposed index; dds(x, Wᵀ) walks W's rows, reading each tile transposed.
    # Its kernel has no masks: M must be a multiple of 128 (checked by stk, recorded as an error row).
    matrix = stk.Matrix(
        (n, k), w.values, w.row_indices_of_block.to(torch.int16), w.col_indices.to(torch.int16), w.crow_indices
    )
    transposed = matrix.t()
    return lambda x: stk.ops.dds(x, transposed)


def two_of_four_linear(n: int, k: int, dtype: torch.dtype, generator: torch.Generator):
    """PyTorch's 2:4 sparse tensor-core ``F.linear`` on a random ``(n, k)`` 2:4 weight, and the bytes our format
    stores it in (values and group masks); None for dtypes the sparse tensor cores do not take."""
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    linear = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=generator) / math.sqrt(k))
    layer = SemiStructuredLinear.from_linear(linear.to("cuda", dtype))
    nbytes = layer.values.nbytes + layer.groups.nbytes
    weight = layer.compressed_weight()
    return (lambda x: F.linear(x, weight)), nbytes


def _floor_ms(
    ceilings: Ceilings, case: Case, dtype: torch.dtype, w: BlockSparseMatrix | None, fp32: str = "ieee"
) -> float:
    size = torch.finfo(dtype).bits // 8
    tf32 = torch.backends.cuda.matmul.allow_tf32
    if w is None:  # the dense problem
        return ceilings.floor_ms(
            2 * case.m * case.k * case.n, size * (case.m * case.k + case.n * case.k + case.m * case.n), dtype, tf32
        )
    # X's columns that no tile multiplies need no reading (at 90% a quarter of ViT-B fc2's); w.nbytes: the stored
    # tiles plus every index array the kernel may read
    bk = w.block_shape[1]
    read_columns = int((case.k - torch.unique(w.col_indices).long() * bk).clamp(max=bk).sum())  # ragged last one
    bytes_moved = size * case.m * (read_columns + case.n) + w.nbytes
    flops = 2 * case.m * case.k * case.n * w.density
    if dtype == torch.float32 and fp32 == "tf32x3":  # three TF32 tensor-core products per fp32 one
        return ceilings.floor_ms(3 * flops, bytes_moved, dtype, tf32=True)
    return ceilings.floor_ms(flops, bytes_moved, dtype, tf32)


def _time_two_of_four(rows: list, base: dict, case: Case, dtype: torch.dtype, xs, ceilings: Ceilings) -> str:
    """Time PyTorch's 2:4 path on the case's shape (one row, sparsity 0.5); returns its time as text."""
    made = two_of_four_linear(case.n, case.k, dtype, torch.Generator().manual_seed(0))
    if made is None:
        return ""
    fn, nbytes = made
    size = torch.finfo(dtype).bits // 8
    bytes_moved = size * (case.m * case.k + case.m * case.n) + nbytes
    floor = ceilings.floor_ms(case.m * case.k * case.n, bytes_moved, dtype, False)
    row = {**base, "sparsity": 0.5, "block": None, "mask": "2:4", "impl": "torch_2_4", "floor_ms": floor}
    try:
        ms, timer = time_ms(fn, xs)
    except Exception as error:  # recorded, not fatal, as for the other baselines
        rows.append({**row, "ms": None, "error": str(error).splitlines()[0][:200]})
        return "torch_2_4 error"
    rows.append({**row, "ms": ms, "timer": timer})
    return f"torch_2_4 (s=0.5) {ms:.3f} ms"


def run(
    quick: bool,
    dtypes: tuple[str, ...],
    shapes: tuple[str, ...],
    sweep: bool,
    out_dir: Path | None,
    name: str,
    command: str,
    fp32: str = "ieee",
    quantize: tuple[str, ...] = (),
) -> dict:
    """Run the cases; write ``<out_dir or benchmarks/results/<gpu>>/<name>.json`` plus plots; return the payload.

    ``fp32``: how our kernels multiply fp32 tiles, "ieee" or "tf32x3" (dense stays IEEE fp32: TF32 off).
    ``quantize``: also time ours on the tiles quantized as each of these kinds (16-bit cases), each row with its own
    bytes and floor (int8 / fp8 tiles and their scales: fewer bytes; the floor keeps the 16-bit matrix rate)."""
    payload, folder = start_run("spmm", command, out_dir)
    payload["fp32_precision"] = fp32
    ceilings = measure_ceilings()
    payload["ceilings"] = ceilings.__dict__
    rows = payload["rows"]
    dense_ms = {}  # (shape, M, dtype) -> the dense row's time, measured once per run
    for case in cases(quick, dtypes, shapes, sweep):
        dtype = DTYPES[case.dtype]
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on both sides
        w = sparse_weight(case, dtype)
        xs = input_sets(
            lambda case=case, dtype=dtype: torch.randn(case.m, case.k, device="cuda", dtype=dtype),
            case.m * case.k * w.values.element_size(),
        )
        base = {"shape": case.shape, "M": case.m, "K": case.k, "N": case.n, "dtype": case.dtype}
        quantized = quantized_weights(w, quantize)
        paths, dense_path = implementations(w, fp32, quantized)
        dense_key = (case.shape, case.m, case.dtype)
        if dense_key not in dense_ms:
            ms, timer = time_ms(dense_path, xs)
            dense_ms[dense_key] = ms
            dense_floor = _floor_ms(ceilings, case, dtype, None)
            rows.append({**base, "sparsity": 0.0, "block": None, "mask": None, "impl": "dense", "ms": ms,
                         "floor_ms": dense_floor, "timer": timer})  # fmt: skip
            print(f"{case.shape:<14} M={case.m:<6} {case.dtype} dense {ms:.3f} ms  "
                  f"{_time_two_of_four(rows, base, case, dtype, xs, ceilings)}", flush=True)  # fmt: skip
        floor = _floor_ms(ceilings, case, dtype, w, fp32)
        sparse_base = {**base, "sparsity": case.sparsity, "block": case.block, "mask": case.mask, "floor_ms": floor}
        summary = []
        for impl, fn in paths.items():
            try:
                ms, timer = time_ms(fn, xs)
            except Exception as error:  # a baseline that does not support this case is recorded, not fatal
                rows.append({**sparse_base, "impl": impl, "ms": None, "error": str(error).splitlines()[0][:200]})
                continue
            own = {}
            if impl in quantized:  # its own bytes, and the floor they give
                own = {"bytes": quantized[impl].nbytes, "floor_ms": _floor_ms(ceilings, case, dtype, quantized[impl])}
            rows.append({**sparse_base, "impl": impl, "ms": ms, "timer": timer, **own})
            summary.append(f"{impl} {dense_ms[dense_key] / ms:.2f}x")
        print(
            f"{case.shape:<14} M={case.m:<6} {case.dtype} s={case.sparsity:.2f} b={case.block:<3} {case.mask:<6} "
            f"{'  '.join(summary)}  floor {dense_ms[dense_key] / floor:.2f}x",
            flush=True,
        )
        del xs, paths
        torch.cuda.empty_cache()
        write_result(folder / f"{name}.json", payload)  # after every case: a run cut short keeps what it measured
    from sparseblocks.bench.plots import spmm_report

    spmm_report(folder / f"{name}.json")
    return payload
