"""Record which kernel every op chooses today, over a grid of problems, with the GPU's properties faked.

Run once against the rules as they stood before they moved into ``sparseblocks.dispatch``; its output,
``tests/core/data/dispatch_decisions.json``, is the guard that the move changed no decision
(``tests/core/test_dispatch.py`` replays it). Kept in git history with the table it wrote.
"""

import contextlib
import gzip
import importlib
import itertools
import json
import sys
from types import SimpleNamespace
from unittest import mock

import torch

import sparseblocks.kernels.decode as decode
import sparseblocks.kernels.spmm as rows
import sparseblocks.kernels.spmm_tma as tma
from sparseblocks.backend import fp32_precision

mlp_ops = importlib.import_module("sparseblocks.ops.mlp")  # the package's names shadow its modules
spmm_ops = importlib.import_module("sparseblocks.ops.spmm")

TOKENS = [1, 2, 4, 8, 16, 17, 32, 48, 64, 65, 128, 256, 1024, 4096, 8192, 65536]
SHAPES = {  # (N, K): the real layers, and widths a descriptor cannot address
    "vit_fc1": (3072, 768),
    "vit_fc2": (768, 3072),
    "llama_1b_up": (8192, 2048),
    "llama_1b_down": (2048, 8192),
    "llama_8b_up": (14336, 4096),
    "llama_8b_down": (4096, 14336),
    "small": (256, 256),
    "odd_width": (200, 100),
}
BLOCKS = [(16, 16), (32, 32), (64, 64), (128, 128), (64, 32)]
DENSITIES = [0.05, 0.1, 0.3, 0.5, 1.0]
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
PRECISIONS = ["ieee", "tf32", "tf32x3"]
DEVICES = {"h100": ((9, 0), 132), "a100": ((8, 0), 108), "small_gpu": ((9, 0), 16)}


class FakeTensor(SimpleNamespace):
    """What the rules read of a CUDA tensor."""

    is_cuda = True

    def is_contiguous(self):
        return True

    def data_ptr(self):
        return 0

    def element_size(self):
        return torch.empty(0, dtype=self.dtype).element_size()

    def stride(self, dim=None):
        strides = (self.shape[1], 1) if len(self.shape) == 2 else (self.shape[1] * self.shape[2], self.shape[2], 1)
        return strides if dim is None else strides[dim]

    def numel(self):
        out = 1
        for s in self.shape:
            out *= s
        return out


def fake_matrix(n, k, block, density, dtype):
    bn, bk = block
    grid = (-(-n // bn), -(-k // bk))
    nnz = max(1, round(density * grid[0] * grid[1]))
    values = FakeTensor(shape=(nnz, bn, bk), dtype=dtype, device=torch.device("cuda", 0))
    return SimpleNamespace(
        shape=(n, k),
        block_shape=(bn, bk),
        block_grid=grid,
        nnz=nnz,
        density=nnz / (grid[0] * grid[1]),
        values=values,
        dtype=dtype,
    )


@contextlib.contextmanager
def faked_gpu(capability, sms):
    hopper = lambda device: capability[0] >= 9
    with contextlib.ExitStack() as stack:
        for module in (rows, tma, decode, mlp_ops):
            if hasattr(module, "triton_interpreting"):
                stack.enter_context(mock.patch.object(module, "triton_interpreting", lambda: False))
        stack.enter_context(mock.patch.object(tma, "hopper_or_later", hopper))
        stack.enter_context(mock.patch.object(decode, "multiprocessors", lambda device: sms))
        stack.enter_context(mock.patch.object(mlp_ops, "triton_available", lambda: True))
        yield


def row_loads(m, w, transposed, grad2=None, gate=None, grad_weight=None):
    """What `kernels/spmm.py`'s `_launch` chose with descriptors=None."""
    x2 = FakeTensor(shape=(m, w.shape[0] if transposed else w.shape[1]), dtype=w.dtype, device=w.values.device)
    descriptors = grad_weight is not None or rows.descriptors_pay(m, w)
    return "rows_descriptors" if descriptors and tma.tma_fits(x2, w, transposed, grad2, gate) else "rows"


def decisions(m, w, dtype):
    out = {}
    grad2 = FakeTensor(shape=(m, w.shape[0]), dtype=dtype, device=w.values.device)
    if decode.decode_pays(m, w):
        out["forward"] = "one_token" if m == 1 and decode.one_token_kernel_pays(w) else "few_tokens"
        out["tiles_per_program"] = decode.default_tiles_per_program(w)
    else:
        out["forward"] = row_loads(m, w, False)
    out["input_grad"] = row_loads(m, w, True)
    out["activation_grad"] = row_loads(m, w, False, grad2=grad2)
    out["gated_hidden"] = row_loads(m, w, False, gate=w)
    out["bias_grad"] = (
        "column_sums_kernel" if m * w.shape[0] >= spmm_ops.COLUMN_SUMS_KERNEL_MIN_ELEMENTS else "torch_sum"
    )
    return out


def mlp_decisions(m, up, down, gate):
    out = {"inference": mlp_ops.inference_path(m, up, down, gate)}
    x2 = FakeTensor(shape=(m, up.shape[1]), dtype=up.dtype, device=up.values.device)
    grad2 = FakeTensor(shape=(m, down.shape[0]), dtype=up.dtype, device=up.values.device)
    fused = down.block_shape[1] == up.block_shape[0] and down.nnz > 0 and tma.tma_fits(x2, up, False, grad2)
    out["hidden_grad"] = "hidden_grad_on_chip" if fused else "hidden_grad_unfused"
    return out


def main(path):
    table = []
    for (device, (capability, sms)), (dtype_name, dtype) in itertools.product(DEVICES.items(), DTYPES.items()):
        precisions = PRECISIONS if dtype == torch.float32 else [None]
        for precision, (shape, (n, k)), block, density in itertools.product(
            precisions, SHAPES.items(), BLOCKS, DENSITIES
        ):
            w = fake_matrix(n, k, block, density, dtype)
            with faked_gpu(capability, sms), fp32_precision(precision) if precision else contextlib.nullcontext():
                for m in TOKENS:
                    row = {
                        "device": device,
                        "capability": list(capability),
                        "multiprocessors": sms,
                        "dtype": dtype_name,
                        "fp32_precision": precision,
                        "shape": shape,
                        "N": n,
                        "K": k,
                        "block": list(block),
                        "nnz": w.nnz,
                        "M": m,
                    }
                    table.append({**row, "layer": True, **decisions(m, w, dtype)})
        # MLPs: up (H, K), down (K, H) from the Llama-1B, ViT-B and a small shape, gated and not
        for precision, (name, (k, h)), block, density, gated in itertools.product(
            precisions,
            {"vit": (768, 3072), "llama_1b": (2048, 8192), "small": (256, 512)}.items(),
            BLOCKS,
            DENSITIES,
            (False, True),
        ):
            up = fake_matrix(h, k, block, density, dtype)
            down = fake_matrix(k, h, block[::-1], density, dtype)
            gate = fake_matrix(h, k, block, density, dtype) if gated else None
            with faked_gpu(capability, sms), fp32_precision(precision) if precision else contextlib.nullcontext():
                for m in TOKENS:
                    row = {
                        "device": device,
                        "capability": list(capability),
                        "multiprocessors": sms,
                        "dtype": dtype_name,
                        "fp32_precision": precision,
                        "mlp": name,
                        "K": k,
                        "H": h,
                        "block": list(block),
                        "up_nnz": up.nnz,
                        "down_nnz": down.nnz,
                        "gated": gated,
                        "M": m,
                    }
                    table.append({**row, "layer": False, **mlp_decisions(m, up, down, gate)})
    with gzip.open(path, "wt") as f:
        json.dump({"recorded_at": sys.argv[2] if len(sys.argv) > 2 else None, "rows": table}, f, separators=(",", ":"))
    print(len(table), "decisions")


if __name__ == "__main__":
    main(sys.argv[1])
