"""One gated epilogue: every path of a SwiGLU MLP rounds act(gate) and up where the unfused path stores them, so all
give bitwise the same output.

The inputs make every sum exact in fp32 (x small integers, weights multiples of 1/256), so the order a kernel adds in
cannot matter, yet act(gate) and up need rounding to 16 bits; and down is the identity, so the MLP's output is its
hidden activation: any difference left is the epilogue's.
"""

import pytest
import torch

from conftest import KERNEL_DEVICE, KERNEL_TEST_MARKS
from sparseblocks import BlockSparseMatrix
from sparseblocks.backend import triton_interpreting
from sparseblocks.dispatch import force_plan
from sparseblocks.ops import sparse_mlp

pytestmark = KERNEL_TEST_MARKS
K, H = 64, 64


def _weights(dtype):
    generator = torch.Generator().manual_seed(0)
    small = lambda *shape: torch.randint(-255, 256, shape, generator=generator).float() / 256
    mask = torch.rand(H // 16, K // 16, generator=generator) < 0.6
    mask[0] = True
    # multiples of 1/256 below 1 need 8 bits: exact in bf16 and fp16 alike
    up = BlockSparseMatrix.from_dense(small(H, K).to(dtype), 16, mask=mask)
    gate = BlockSparseMatrix.from_dense(small(H, K).to(dtype), 16, mask=mask.roll(1, 1))
    down = BlockSparseMatrix.from_dense(torch.eye(H, dtype=dtype), 16, mask=torch.eye(H // 16, dtype=torch.bool))
    biases = [small(H).to(torch.float16).to(dtype), small(H).to(torch.float16).to(dtype)]  # up's, gate's
    x = torch.randint(-3, 4, (1, K), generator=generator).to(dtype)
    return [t.to(KERNEL_DEVICE) for t in (x, up, down, gate, *biases)]


# (the MLP's plan, the plan of its products, the plan of the gated launch)
PATHS = {
    "one_token": {"mlp": "one_token"},
    "few_tokens": {"mlp": "unfused", "forward": "few_tokens"},
    "rows": {"mlp": "unfused", "forward": "rows"},
    "gated_rows": {"mlp": "gated_rows", "gated_hidden": "rows", "forward": "rows"},
    "gated_rows_descriptors": {"mlp": "gated_rows", "gated_hidden": "rows_descriptors", "forward": "rows"},
    "fused_mlp": {"mlp": "fused_mlp"},
}
# Kernels store results with the GPU's rounding; torch rounds the unfused path's product. Under the interpreter
# (Triton 3.6) a cast to bf16 truncates instead, so there bf16 compares the paths that round in a kernel only;
# fp16 casts round to nearest there too, so every path is compared.
KERNEL_ROUNDED = ["one_token", "gated_rows", "gated_rows_descriptors", "fused_mlp"]


def _outputs(dtype):
    x, up, down, gate, up_bias, gate_bias = _weights(dtype)
    outputs = {}
    for name, plans in PATHS.items():
        with force_plan(**plans), torch.no_grad():
            outputs[name] = sparse_mlp(x, up, down, gate, up_bias, None, gate_bias, activation="silu")
    return outputs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_path_gives_bitwise_the_same_output(dtype):
    outputs = _outputs(dtype)
    compared = KERNEL_ROUNDED if dtype == torch.bfloat16 and triton_interpreting() else list(PATHS)
    first = outputs[compared[0]]
    assert first.abs().sum() > 0
    for name in compared[1:]:
        assert torch.equal(outputs[name], first), name


def test_the_products_halves_are_rounded_before_they_multiply():
    """The fp16 output equals act(gate) and up each rounded to fp16 (as the kernels compute them, in fp32),
    multiplied, rounded again; the product of the unrounded halves differs."""
    x, up, down, gate, up_bias, gate_bias = (t.to("cpu") for t in _weights(torch.float16))
    gate_out = torch.nn.functional.silu(x.float() @ gate.to_dense().float().T + gate_bias.float())
    up_out = x.float() @ up.to_dense().float().T + up_bias.float()  # exact: every sum is
    expected = (gate_out.half().float() * up_out.half().float()).half()
    unrounded = (gate_out * up_out).half()
    assert not torch.equal(expected, unrounded)
    outputs = _outputs(torch.float16)
    close = {name: (output.cpu() == expected).float().mean().item() for name, output in outputs.items()}
    # silu's last bit may differ between torch's fp32 and the kernels' (exp and division): nearly every element
    assert all(share > 0.95 for share in close.values()), close
