"""Host launch arithmetic (moeprec.kernels._grid) against Triton's own helpers."""

import pytest

triton = pytest.importorskip("triton")


def test_cdiv_and_next_power_of_2_match_triton():
    from moeprec.kernels._grid import cdiv, next_power_of_2

    ns = list(range(0, 2100)) + [2**31 - 1, 2**31, 2**31 + 1, 2**40 + 3]
    for n in ns:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 16, 32, 128, 1000):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
