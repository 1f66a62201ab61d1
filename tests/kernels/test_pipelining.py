"""The loops that walk gathered tiles keep Triton's software pipeline deep: ``num_stages`` buffers of X and W.

Checked on the kernels compiled for sm_90 on the CPU (``tools/kernel_ir.py``, no GPU): with a gather's index
loaded in the same iteration, Triton 3.6 kept one or two buffers whatever ``num_stages``
(``benchmarks/notes/decode.md``).
"""

import re

import pytest

from conftest import kernel_ir

pytest.importorskip("triton")

STAGES = 4


def tile_buffers(kernel: str, mode: str) -> list[int]:
    """How many copies of each bf16 tile the pipeliner allocated (the script's ``buffer NxRxCxbf16`` lines)."""
    printed = kernel_ir(kernel, "--mode", mode, "--stages", str(STAGES))
    return [int(n) for n in re.findall(r"buffer (\d+)x\d+x\d+xbf16", printed)]


@pytest.mark.parametrize(("kernel", "mode", "copies"), [
    ("rows", "forward", STAGES),
    ("rows", "transposed", STAGES),
    ("rows_tma", "forward", STAGES),
    ("decode", "forward", STAGES - 1),  # the few-token kernel's loop keeps one copy fewer: its x is 16 rows
])  # fmt: skip
def test_gathered_tiles_are_copied_stages_ahead(kernel, mode, copies):
    buffers = tile_buffers(kernel, mode)
    assert len(buffers) >= 2 and all(n == copies for n in buffers), buffers
