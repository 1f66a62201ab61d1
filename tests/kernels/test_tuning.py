import math

import triton

from sparseblocks.kernels.tuning import cdiv, m_bucket, next_power_of_2


def test_host_integer_helpers_match_triton():
    """The host-side helpers size grids and buffers: they must agree with Triton's own everywhere."""
    for n in range(1, 5000):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
        for b in (1, 3, 16, 64, 128):
            assert cdiv(n, b) == triton.cdiv(n, b) == math.ceil(n / b)
    assert m_bucket(70_000) == 1 << 16 and m_bucket(1) == 1 and m_bucket(65) == 128
