"""The Triton kernel that splits the fp32 router gradient into bf16 pieces: bit-identical to the
torch reference `gate._split_to_bf16` (the numbers the fast backward's GEMMs multiply).

On CPU the kernel runs under TRITON_INTERPRET=1 (set by conftest) on small shapes; the tests
marked gpu repeat it at size on CUDA.
"""

import pytest
import torch

pytest.importorskip("triton")

from moeprec.kernels import router_grad_split as rs  # noqa: E402
from moeprec.routing.gate import _split_to_bf16  # noqa: E402
from tests._kernel_cases import kernel_devices, nan_empty  # noqa: E402

# T, E: ragged and tile-multiple sizes, one token, no token, more experts than a tile
CPU_SHAPES = [(37, 24), (1, 8), (0, 16), (64, 128), (5, 300)]
GPU_SHAPES = [(16384, 128), (4097, 256), (1, 8), (0, 128), (333, 300)]


@pytest.fixture
def poisoned(monkeypatch):
    """Outputs start as NaN: an unwritten element shows up."""
    monkeypatch.setattr(rs, "_empty", nan_empty)


def _gradients(t, e, gen):
    """Softmax-router-like gradients: sizes spread over many binades per expert, plus the values
    where splitting and rounding are delicate (ties, subnormals, zeros, the largest floats)."""
    g = torch.randn(t, e, generator=gen) * torch.logspace(-30, 30, e, dtype=torch.float64).float()
    special = torch.tensor([
        0.0, -0.0, 1.0 + 2.0**-8 + 2.0**-16,  # a tie for the last piece's rounding
        1.0 + 2.0**-8 + 3 * 2.0**-16, -(1.0 + 2.0**-9), 2.0**-149, -(2.0**-130) * 1.5,
        3.4e38, -3.4e38, 2.0**-126,
    ])
    flat = g.view(-1)
    n = min(flat.numel(), special.numel())
    flat[:n] = special[:n]
    return g


@pytest.mark.parametrize("device, shapes", kernel_devices(CPU_SHAPES, GPU_SHAPES))
@pytest.mark.parametrize("pieces", [1, 2, 3])
def test_split_is_bit_identical_to_the_torch_reference(poisoned, device, shapes, pieces):
    gen = torch.Generator().manual_seed(pieces)
    for t, e in shapes:
        g = _gradients(t, e, gen).to(device)
        got = rs.split_grad_to_bf16(g, pieces)
        want = _split_to_bf16(g.cpu(), pieces)
        assert got.shape == (t, pieces * e) and got.dtype == torch.bfloat16
        assert torch.equal(got.cpu().view(torch.int16), want.view(torch.int16)), (t, e)
        if t and pieces == 3:  # three pieces hold g exactly (where its bits are within bf16's reach)
            pieces_sum = sum(want[:, i * e : (i + 1) * e].double() for i in range(3))
            reach = g.cpu().abs() >= 2.0**-100
            assert torch.equal(pieces_sum[reach], g.cpu().double()[reach])


@pytest.mark.parametrize("device, shapes", kernel_devices(CPU_SHAPES, GPU_SHAPES))
def test_split_of_a_strided_gradient(device, shapes):
    """An expanded (stride-0) gradient, as `y.sum().backward()` produces, is made contiguous."""
    t, e = shapes[0]
    g = torch.randn(1, e, device=device).expand(t, e)
    got = rs.split_grad(g, 2)
    assert torch.equal(got.cpu().view(torch.int16), _split_to_bf16(g.cpu().contiguous(), 2).view(torch.int16))
