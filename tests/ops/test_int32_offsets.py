"""Inputs whose offsets would pass int32 in the kernels' address arithmetic reach them as contiguous copies."""

import importlib

import pytest
import torch

from conftest import KERNEL_DEVICE, KERNEL_TEST_MARKS, assert_close_to_reference, random_sparse
from sparseblocks import reference
from sparseblocks.dispatch import force_plan

spmm_ops = importlib.import_module("sparseblocks.ops.spmm")  # the package names the function spmm
pytestmark = KERNEL_TEST_MARKS


def test_only_inputs_past_int32_offsets_are_copied():
    normal = torch.empty_strided((4, 1000), (1000, 1), device="meta")
    assert spmm_ops.int32_addressable(normal) is normal
    wide_columns = torch.empty_strided((4, 1000), (1, 2**22), device="meta")  # 999 · 2^22 > 2^31
    tall_rows = torch.empty_strided((300, 8), (2**24, 1), device="meta")  # 256 rows · 2^24 > 2^31
    for tensor in (wide_columns, tall_rows):
        copied = spmm_ops.int32_addressable(tensor)
        assert copied.is_contiguous() and copied.shape == tensor.shape


@pytest.mark.parametrize("plan", ["rows", "few_tokens"])
def test_strided_inputs_past_the_bound_give_the_same_results(monkeypatch, plan):
    """With the bound lowered so that a column stride of 8 passes it, the kernels get contiguous copies and the
    forward and both gradients still match float64."""
    monkeypatch.setattr(spmm_ops, "INT32_OFFSETS", 256)
    seen = []
    original = spmm_ops.int32_addressable
    monkeypatch.setattr(spmm_ops, "int32_addressable", lambda t: seen.append(original(t) is not t) or original(t))
    w, _ = random_sparse(48, 64, 16, 0.5, seed=2)
    w = w.to(KERNEL_DEVICE)
    x = torch.randn(5, 64 * 8, device=KERNEL_DEVICE)[:, ::8].requires_grad_()  # columns 8 apart: 63 · 8 > 256
    values = w.values.detach().requires_grad_()
    matrix = type(w).from_parts(values, w.shape, w.index_tensors())
    with force_plan(forward=plan, input_grad="rows", activation_grad="rows"):
        y = spmm_ops.spmm(x, matrix, None, "gelu")
        grad_x, grad_values = torch.autograd.grad(y, (x, values), torch.ones_like(y))
    assert any(seen)
    x64 = x.detach().double().requires_grad_()
    values64 = w.values.detach().double().requires_grad_()
    y64 = reference.spmm(x64, type(w).from_parts(values64, w.shape, w.index_tensors()), None, "gelu")
    ref_x, ref_values = torch.autograd.grad(y64, (x64, values64), torch.ones_like(y64))
    assert_close_to_reference(y, y64)
    assert_close_to_reference(grad_x, ref_x)
    assert_close_to_reference(grad_values, ref_values)
