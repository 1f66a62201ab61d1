"""Compile a kernel for an H100/H200 (sm_90) on any machine, no GPU needed, and show how Triton pipelined it.

    PYTHONPATH=src python3 tools/kernel_ir.py rows [--mode forward] [--block-m 128] [--block 64] [--stages 3]
        [--warps 4] [--dtype bf16] [--precision tf32] [--out FILE.ttgir]

Kernels: ``rows`` (the pointer row kernel, forward), ``rows_tma`` (its descriptor version), ``decode`` (the
few-token kernel, 16 rows of x); the row kernels in ``--mode`` forward, gated (SwiGLU's act(gate) ⊙ up) or
transposed (the input gradient, W walked through its transpose). bf16 or fp32 (``--precision``: the fp32 dot's),
no bias, no activation; pointers 16-byte aligned and unit strides specialised to 1, as Triton specialises them at
run time. Prints the shared-memory buffers the pipeliner allocated (``NxTILE``: N copies in flight or landing), its
waits (``num``: copies left outstanding), the things that tell whether a loop's loads overlap its products, and
how the products run (tensor-core ``warp_group_dot`` ops, or a ``tt.dot`` left for the CUDA cores); ``--out``
keeps the whole TTGIR.
"""

import argparse
import re
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sparseblocks.kernels.few_tokens import _decode_kernel
from sparseblocks.kernels.spmm import _spmm_kernel
from sparseblocks.kernels.spmm_tma import _spmm_tma_kernel

UNIT_STRIDES = ("stride_xk", "stride_yn", "stride_gn")  # 1 at run time: Triton makes them constants
ALIGNED_INTS = ("stride_xm", "stride_ym", "stride_gm", "OUT", "IN", "N", "K")  # multiples of 16 here


# the tiles' Triton type for each --quantize choice, and whether x comes as fp8 too (W8A8)
QUANTIZED_TILES = {"int8": ("i8", False), "fp8": ("fp8e4nv", False), "fp8-w8a8": ("fp8e4nv", True)}


def kernel_spec(name: str, mode: str, block_m: int, block: int, dtype: str = "bf16", precision: str = "tf32",
                quantize: str | None = None) -> tuple:  # fmt: skip
    """(JIT function, {argument: type} for the non-constexpr ones, {constexpr: value}); data in ``dtype``, tiles
    quantized as ``quantize`` (``QUANTIZED_TILES``) where given."""
    common = {"BN": block, "BK": block, "INPUT_PRECISION": precision, "DOT_IN_FP32": False, "HAS_BIAS": False,
              "ACTIVATION": 0, "QUANTIZED": False}  # fmt: skip
    row_modes = {"TRANSPOSED": mode == "transposed", "BLOCK_M": block_m, "GRAD_EPILOGUE": False,
                 "BIAS_GRAD": False, "GATED": mode == "gated", "HAS_GATE_BIAS": False, "X_FP8": False}  # fmt: skip
    if name == "decode":
        fn, const = _decode_kernel, {**common, "BLOCK_M": 16, "EMPTY_ROWS_PER_PROGRAM": 32, "EVEN_K": True}
        types = {"partial_ptr": "*fp32", "crow_ptr": "*i32", "col_ptr": "*i32", "tile_row_ptr": "*i32",
                 "arrived_ptr": "*i32"}  # fmt: skip
    elif name == "rows":
        fn, const = _spmm_kernel, {**common, **row_modes, "EVEN_IN": True}
        types = {"bias_grad_ptr": "*fp32", **{p: "*i32" for p in ("ptr_ptr", "idx_ptr", "perm_ptr", "order_ptr",
                                                                    "gate_crow_ptr", "gate_col_ptr")}}  # fmt: skip
    else:
        fn, const = _spmm_tma_kernel, {**common, **row_modes, "GRAD_FROM_PRODUCT": False, "BN2": block}
        m_box, w_box = f"tensordesc<{dtype}[{block_m}, {block}]>", f"tensordesc<{dtype}[{block}, {block}]>"
        types = {"x_desc": m_box, "grad_desc": m_box, "y_desc": m_box, "w_desc": w_box, "w2_desc": w_box,
                 "gate_desc": w_box, "bias_grad_ptr": "*fp32",
                 **{p: "*i32" for p in ("ptr_ptr", "idx_ptr", "perm_ptr", "order_ptr", "ccol2_ptr", "row2_ptr",
                                        "perm2_ptr", "gate_crow_ptr", "gate_col_ptr")}}  # fmt: skip
    const.update({s: 1 for s in UNIT_STRIDES if s in fn.arg_names})
    tiles, x_fp8 = QUANTIZED_TILES[quantize] if quantize else (None, False)
    if quantize:
        const["QUANTIZED"] = True
        if "X_FP8" in const:
            const["X_FP8"] = x_fp8
        for arg, kind in list(types.items()):
            if arg in ("w_desc", "gate_desc"):
                types[arg] = kind.replace(dtype, tiles, 1)
        types.update({a: f"*{tiles}" for a in ("values_ptr", "gate_values_ptr")})
        if x_fp8:
            types.update(
                {"x_ptr": "*fp8e4nv"}
                if name != "rows_tma"
                else {"x_desc": types["x_desc"].replace(dtype, "fp8e4nv", 1)}
            )
    signature = {}
    for arg in fn.arg_names:
        if arg in const:
            signature[arg] = "constexpr"
        elif arg in types:
            signature[arg] = types[arg]
        elif arg.endswith("scales_ptr"):  # quantized tiles' scales (unused here: QUANTIZED is False)
            signature[arg] = "*fp32"
        else:  # the remaining pointers hold the data, the rest are sizes, strides and tuning keys
            signature[arg] = f"*{dtype}" if arg.endswith("_ptr") else "i32"
    return fn, signature, const


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kernel", choices=("rows", "rows_tma", "decode"))
    parser.add_argument("--mode", default="forward", choices=("forward", "gated", "transposed"), help="row kernels")
    parser.add_argument("--block-m", type=int, default=128, help="M tile of the row kernels")
    parser.add_argument("--block", type=int, default=64, help="square weight tiles of this size")
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--precision", default="tf32", choices=("ieee", "tf32", "tf32x3"), help="fp32 dots")
    parser.add_argument("--quantize", choices=tuple(QUANTIZED_TILES), help="int8 or fp8 tiles (weights)")
    parser.add_argument("--out", type=Path, help="write the whole TTGIR here")
    args = parser.parse_args()
    fn, signature, const = kernel_spec(args.kernel, args.mode, args.block_m, args.block, args.dtype, args.precision,
                                       args.quantize)  # fmt: skip
    aligned = [a for a, t in signature.items() if t.startswith("*") or a in ALIGNED_INTS]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    compiled = triton.compile(ASTSource(fn, signature, const, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": args.warps, "num_stages": args.stages})  # fmt: skip
    ttgir = compiled.asm["ttgir"]
    if args.out:
        args.out.write_text(ttgir)
    mode = "few tokens" if args.kernel == "decode" else args.mode
    print(f"{args.kernel} ({mode}): BLOCK_M {const['BLOCK_M']}, tiles {args.block}x{args.block}, {args.stages} "
          f"stages, {args.warps} warps, {args.dtype}; shared memory {compiled.metadata.shared} bytes")  # fmt: skip
    print(f"  products: {ttgir.count('ttng.warp_group_dot ')} warp_group_dot (tensor cores), "
          f"{ttgir.count('tt.dot ')} tt.dot (CUDA cores)")  # fmt: skip
    for line in ttgir.splitlines():
        buffer = re.search(r"= ttg\.local_alloc : \(\) -> !ttg\.memdesc<([^,]+),", line)
        wait = re.search(r"(ttg\.async_wait|ttng\.wait_barrier|ttng\.warp_group_dot_wait)", line)
        left = re.search(r"\{(num|pendings) = (\d+)", line)
        if buffer:
            print(f"  buffer {buffer.group(1)}")
        elif wait:
            print(f"  {wait.group(1)}" + (f" ({left.group(1)} {left.group(2)})" if left else ""))


if __name__ == "__main__":
    main()
