"""Launch every kernel and every plan of ``sparseblocks.dispatch`` once on small shapes, checking each output
against the float64 reference: the workload ``compute-sanitizer`` runs over (memcheck, racecheck, synccheck,
initcheck) on a GPU.

    compute-sanitizer --tool memcheck python tools/sanitize_plans.py --dtypes bf16,fp32

Prints one line per case and exits non-zero if any output is off.
"""

import argparse
import sys

import torch

from sparseblocks import BlockSparseMatrix, fp32_precision, reference
from sparseblocks.dispatch import force_plan
from sparseblocks.format import MLPWeights
from sparseblocks.masks import random_block_mask
from sparseblocks.nn import SemiStructuredLinear
from sparseblocks.ops import sparse_mlp, spmm

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICE = "cuda"
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-4}


def _matrix(n, k, block, density, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    mask = random_block_mask((-(-n // block), -(-k // block)), density, generator)
    mask[0] = False  # an empty block row
    dense = torch.randn(n, k, generator=generator) / k**0.5
    return BlockSparseMatrix.from_dense(dense.to(dtype), block, mask=mask).to(DEVICE)


def _error(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp16, fp32")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu under TRITON_INTERPRET=1 (a dry run)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    failures = 0

    def report(name, out, ref, dtype):
        nonlocal failures
        error = _error(out, ref)
        ok = error < TOLERANCE[dtype]
        failures += not ok
        print(f"{name:<48} {str(dtype).removeprefix('torch.'):<9} rel. error {error:.2e} {'ok' if ok else 'FAILED'}")

    for dtype in (DTYPES[d] for d in args.dtypes.split(",")):
        w = _matrix(200, 160, 32, 0.5, dtype, 1)  # ragged N; K of whole 16-byte rows (descriptors take it)
        w64 = w.to(dtype=torch.float64)
        bias = torch.randn(200, device=DEVICE).to(dtype)
        for m, plans in [(1, ["one_token", "few_tokens", "rows", "rows_descriptors"]), (5, ["few_tokens", "rows"]),
                         (300, ["rows", "rows_descriptors"])]:  # fmt: skip
            x = torch.randn(m, 160, device=DEVICE).to(dtype)
            ref = reference.spmm(x.double(), w64, bias.double(), "gelu")
            for plan in plans:
                if plan == "rows_descriptors" and dtype == torch.float32:
                    with fp32_precision("tf32x3"), force_plan(forward=plan):
                        report(f"spmm m={m} {plan} (tf32x3)", spmm(x, w, bias, "gelu"), ref, dtype)
                    continue
                with force_plan(forward=plan):
                    report(f"spmm m={m} {plan}", spmm(x, w, bias, "gelu"), ref, dtype)
        # backward: input gradient, activation gradient (bias gradient from its tiles) or, without an activation, the
        # column-sum kernel; SDDMM
        x = torch.randn(300, 160, device=DEVICE).to(dtype).requires_grad_()
        for loads, activation in [("rows", "silu"), ("rows", None), ("rows_descriptors", "silu")]:
            if loads == "rows_descriptors" and dtype == torch.float32:
                continue  # fp32 gradients take pointer loads
            values, b = w.values.detach().requires_grad_(), bias.detach().requires_grad_()
            matrix = BlockSparseMatrix.from_parts(values, w.shape, w.index_tensors())
            with force_plan(input_grad=loads, activation_grad=loads, bias_grad="column_sums_kernel"):
                y = spmm(x, matrix, b, activation)
                grad = torch.randn_like(y)
                gx, gv, gb = torch.autograd.grad(y, (x, values, b), grad)
            x64 = x.detach().double().requires_grad_()
            w64v = w64.values.detach().requires_grad_()
            b64 = bias.double().requires_grad_()
            y64 = reference.spmm(x64, BlockSparseMatrix.from_parts(w64v, w.shape, w64.index_tensors()), b64, activation)
            rx, rv, rb = torch.autograd.grad(y64, (x64, w64v, b64), grad.double())
            name = f"({loads}, {activation or 'no activation'})"
            report(f"input gradient {name}", gx, rx, dtype)
            report(f"sddmm {name}", gv, rv, dtype)
            report(f"bias gradient {name}", gb, rb, dtype)
        # MLPs: gated one token (two programmatically dependent launches), gated rows, fused, unfused, hidden grad
        up, gate = _matrix(256, 160, 32, 0.5, dtype, 2), _matrix(256, 160, 32, 0.4, dtype, 3)
        down = _matrix(160, 256, 32, 0.5, dtype, 4)
        weights64 = MLPWeights(*(t.to(dtype=torch.float64) for t in (up, down, gate)))
        for m, plans in [(1, ["one_token", "unfused", "gated_rows", "fused_mlp"]), (100, ["gated_rows", "fused_mlp"])]:
            x = torch.randn(m, 160, device=DEVICE).to(dtype)
            ref = reference.mlp(x.double(), weights64, "silu")
            for plan in plans:
                with torch.no_grad(), force_plan(mlp=plan):
                    report(f"SwiGLU MLP m={m} {plan}", sparse_mlp(x, up, down, gate, activation="silu"), ref, dtype)
        if dtype != torch.float32:  # the hidden gradient on chip takes 16-bit inputs (descriptors)
            x = torch.randn(100, 160, device=DEVICE).to(dtype).requires_grad_()
            with force_plan(hidden_grad="hidden_grad_on_chip"):
                y = sparse_mlp(x, up, down, activation="gelu")
                (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
            x64 = x.detach().double().requires_grad_()
            y64 = reference.mlp(x64, MLPWeights(weights64.up, weights64.down), "gelu")
            (rx,) = torch.autograd.grad(y64, x64, torch.ones_like(y64))
            report("plain MLP hidden gradient on chip", gx, rx, dtype)
            linear = torch.nn.Linear(256, 128, device=DEVICE, dtype=dtype)
            two_four = SemiStructuredLinear.from_linear(linear)
            x = torch.randn(64, 256, device=DEVICE).to(dtype)
            ref = torch.nn.functional.linear(x.double(), two_four.weight().double(), linear.bias.double())
            with torch.no_grad():
                report("2:4 linear (PyTorch semi-structured)", two_four(x), ref, dtype)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    print("failures:", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
