"""How the kernels multiply fp32 tiles: ``fp32_precision`` blocks, else what ``allow_tf32`` says (as dense)."""

import re

import pytest
import torch

from conftest import KERNEL_DEVICE, KERNEL_TEST_MARKS, kernel_ir, random_sparse, relative_error
from sparseblocks import fp32_precision, spmm
from sparseblocks.backend import fp32_dot_precision


def test_outside_a_block_the_precision_follows_allow_tf32(no_tf32):
    assert fp32_dot_precision() == "ieee"
    torch.backends.cuda.matmul.allow_tf32 = True  # the fixture puts it back
    assert fp32_dot_precision() == "tf32"


def test_blocks_nest_and_restore_even_after_an_error(no_tf32):
    with fp32_precision("tf32x3"):
        assert fp32_dot_precision() == "tf32x3"
        with fp32_precision("tf32"):
            assert fp32_dot_precision() == "tf32"
        assert fp32_dot_precision() == "tf32x3"
    with pytest.raises(RuntimeError), fp32_precision("tf32"):
        raise RuntimeError("inside")
    assert fp32_dot_precision() == "ieee"


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="tf32x3"), fp32_precision("bf16x9"):
        pass


def test_the_kernels_dot_takes_it_for_fp32_only():
    pytest.importorskip("triton")
    from sparseblocks.kernels.epilogue import input_precision

    with fp32_precision("tf32x3"):
        assert input_precision(torch.float32) == "tf32x3"
        assert input_precision(torch.bfloat16) == "tf32"  # the 16-bit dots ignore it


NEEDS_KERNELS = KERNEL_TEST_MARKS[0]  # a GPU or the interpreter


@pytest.mark.parametrize("precision", [pytest.param(p, marks=NEEDS_KERNELS) for p in ("ieee", "tf32x3")])
@pytest.mark.parametrize("rows", [1, 5, 40])  # the one-token, few-token and row kernels
def test_spmm_in_each_precision_matches_float64(precision, rows, no_tf32):
    w, dense = random_sparse(96, 80, 16, 0.5, seed=3)
    x = torch.randn(rows, 80)
    with fp32_precision(precision):
        out = spmm(x.to(KERNEL_DEVICE), w.to(KERNEL_DEVICE))
    # tf32x3 drops the low parts' product: its error is of fp32's order (about 3e-7 of the largest output on
    # random data, as IEEE fp32), not TF32's 1e-3
    assert relative_error(out.cpu(), x.double() @ dense.T) < 1e-5


@pytest.mark.parametrize(("precision", "tensor_core_dots", "cuda_core_dots"), [("ieee", 0, 1), ("tf32x3", 3, 0)])
def test_tf32x3_runs_on_the_tensor_cores_of_a_hopper_gpu(precision, tensor_core_dots, cuda_core_dots):
    """The fp32 row kernel compiled for sm_90 (on the CPU): three wgmma products per tile, no FMA dot."""
    pytest.importorskip("triton")
    printed = kernel_ir("rows", "--dtype", "fp32", "--precision", precision, "--block-m", "64")
    products = re.search(r"products: (\d+) warp_group_dot \(tensor cores\), (\d+) tt\.dot", printed)
    assert (int(products.group(1)), int(products.group(2))) == (tensor_core_dots, cuda_core_dots)


@NEEDS_KERNELS
@pytest.mark.parametrize("descriptors", [True, False])
def test_on_the_tensor_cores_fp32_may_take_the_descriptor_kernel(descriptors, no_tf32):
    """IEEE fp32 keeps the pointer kernel; in TF32 and tf32x3 the forward product's tiles may come by descriptor,
    as 16-bit ones do."""
    from sparseblocks.dispatch import descriptors_fit
    from sparseblocks.kernels.spmm import spmm_rows

    w, dense = random_sparse(96, 80, 16, 0.5, seed=3)
    x = torch.randn(40, 80)
    x_on_device, w = x.to(KERNEL_DEVICE), w.to(KERNEL_DEVICE)
    assert not descriptors_fit(x_on_device, w, "forward")
    with fp32_precision("tf32x3"):
        assert descriptors_fit(x_on_device, w, "forward")
        grad_out = torch.randn(40, 96, device=KERNEL_DEVICE)
        assert not descriptors_fit(grad_out, w, "input_grad")  # the input gradient (and other modes): not timed
        config = {"BLOCK_M": 16, "num_warps": 4, "num_stages": 2}
        out = spmm_rows(x_on_device, w, descriptors=descriptors, config=config)
    assert relative_error(out.cpu(), x.double() @ dense.T) < 1e-5
