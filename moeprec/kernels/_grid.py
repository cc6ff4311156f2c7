"""Host-side launch arithmetic in plain Python.

`triton.cdiv` and `triton.next_power_of_2` are constexpr-function wrappers that cost ~3 us per
call on the host (Triton 3.6 and 3.9, this project's CPU), and an eager fused MoE call makes
several of them per launch; these give the same integers for the arguments used here (n >= 0).
"""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (0 for n = 0, as Triton's)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
