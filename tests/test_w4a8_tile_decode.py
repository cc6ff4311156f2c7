"""The MXFP4 tiles' explicit decode for fp8 activations against the torch code, bit for bit.

With fp8 activations each K tile's MXFP4 weights become E4M3 values, each 32-block times
2^(s - smax + 6) with smax the column's largest scale in the tile, and 2^(smax - 133) per
column after the dot. When the tile spans the whole row (K = BLOCK_K) that is exactly
`mxfp4_to_fp8_torch`'s row decode, so the two must agree in every byte (rounding beyond the
exact span and NaN scales included). Interpreter on CPU, the GPU when present.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from moeprec.backends import triton_interpret  # noqa: E402
from moeprec.formats.mxfp4 import FP8_EXACT_SPAN, dequantize_mxfp4, mxfp4_to_fp8_torch  # noqa: E402
from moeprec.kernels._fused_moe_kernels import _load_b_tile  # noqa: E402

pytestmark = pytest.mark.interpret
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _tile_kernel(b_ptr, bs_ptr, lo_ptr, hi_ptr, cs_ptr, K: tl.constexpr, N: tl.constexpr,
                 INTERP: tl.constexpr):
    rows = tl.arange(0, N)
    w_lo, w_hi, cs = _load_b_tile(b_ptr, bs_ptr, rows, rows < N, 0, K, K // 2, 1, K // 32, 1,
                                  1, True, K, N, tl.bfloat16, INTERP, True)
    i = tl.arange(0, K // 2)
    # [K/2, N] tiles -> [N, K/2] bytes (row n, pair i: the low and the high nibble's values)
    tl.store(lo_ptr + rows[None, :] * (K // 2) + i[:, None], w_lo.to(tl.uint8, bitcast=True))
    tl.store(hi_ptr + rows[None, :] * (K // 2) + i[:, None], w_hi.to(tl.uint8, bitcast=True))
    tl.store(cs_ptr + rows, cs)


def _tile_decode(packed, scales):
    n, half = packed.shape
    lo = torch.full((n, half), 0xA5, dtype=torch.uint8, device=packed.device)
    hi = torch.full_like(lo, 0xA5)
    cs = torch.full((n,), float("nan"), device=packed.device)
    _tile_kernel[(1,)](packed, scales, lo, hi, cs, K=half * 2, N=n, INTERP=triton_interpret())
    return torch.stack([lo, hi], dim=-1).reshape(n, half * 2).cpu(), cs.cpu()


def test_fp8_tile_decode_equals_the_row_decode():
    _check_tile_decode()


@pytest.mark.gpu
def test_gpu_fp8_tile_decode_equals_the_row_decode():  # in the GPU suite's -m gpu selection
    _check_tile_decode()


def _check_tile_decode():
    # 16 columns x K = 128 (4 blocks, one tile): block scales spanning 0-20 binades under a
    # largest byte from 0 (subnormal 2^-127) to 254, a NaN scale, every nibble
    g = torch.Generator().manual_seed(12)
    n, nb = 16, 4
    packed = torch.randint(0, 256, (n, nb * 16), generator=g).to(torch.uint8)
    top = torch.tensor([0, 3, 7, 60, 120, 127, 130, 200, 254, 254, 90, 140, 30, 127, 250, 126])
    span = torch.tensor([0, 2, 5, 8, 9, 12, 14, 14, 15, 20, 3, 11, 13, 10, 6, 1])
    scales = (top[:, None] - torch.arange(nb)[None, :] * span[:, None] // (nb - 1)).clamp(0, 254)
    scales[10, 2] = 255
    scales = scales.to(torch.uint8)
    ref, ref_scale = mxfp4_to_fp8_torch(packed, scales)
    got, got_scale = _tile_decode(packed.to(DEV), scales.to(DEV))
    # a NaN-scale block: NaN values in the row decode; the tile leaves them finite and its
    # column scale NaN, which makes the column's products NaN all the same
    nan_block = (scales == 255).repeat_interleave(32, 1)
    assert torch.equal(got[~nan_block], ref.view(torch.uint8)[~nan_block])
    assert torch.equal(got_scale.isnan(), ref_scale.isnan())
    assert torch.equal(got_scale[~got_scale.isnan()], ref_scale[~ref_scale.isnan()])
    # and so, within the exact span, the decoded weights themselves
    exact = (span <= FP8_EXACT_SPAN) & ~(scales == 255).any(1)
    w = got.view(torch.float8_e4m3fn).double() * got_scale.double()[:, None]
    assert torch.equal(w[exact], dequantize_mxfp4(packed, scales, torch.float64)[exact])
