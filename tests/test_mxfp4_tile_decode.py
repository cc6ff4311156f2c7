"""The tensor-core tiles' MXFP4 -> bf16 decode (inline PTX) against the torch decoder, exhaustively.

Every byte (two E2M1 values) under scale bytes across the E8M0 range, 0 (a subnormal scale) and
0xFF (NaN) included: the tiles must see the same bf16 weights bit for bit as
`dequantize_mxfp4(backend="torch")` gives. GPU only (the interpreter runs no PTX).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from moeprec.kernels._fused_moe_kernels import _e2m1_bf16_pairs, _e8m0_to_bf16  # noqa: E402

pytestmark = pytest.mark.gpu

SCALES = (0, 1, 2, 60, 100, 120, 126, 127, 128, 129, 140, 200, 252, 253, 254, 255)


@triton.jit
def _decode_kernel(p_ptr, s_ptr, lo_ptr, hi_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    lo, hi = _e2m1_bf16_pairs(tl.load(p_ptr + offs), _e8m0_to_bf16(tl.load(s_ptr + offs).to(tl.int32)))
    tl.store(lo_ptr + offs, lo)
    tl.store(hi_ptr + offs, hi)


def _decode_on_gpu(packed: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo = torch.full(packed.shape, float("nan"), dtype=torch.bfloat16, device=packed.device)
    hi = torch.full_like(lo, float("nan"))
    _decode_kernel[(1,)](packed, scales, lo, hi, N=packed.numel())
    return lo, hi


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_tile_decode_equals_the_torch_decoder_bit_for_bit():
    from moeprec.formats.mxfp4 import dequantize_mxfp4

    byte = torch.arange(256, dtype=torch.uint8, device="cuda")
    packed = byte.repeat(len(SCALES))                                   # [16 * 256]
    scales = torch.tensor(SCALES, dtype=torch.uint8, device="cuda").repeat_interleave(256)
    lo, hi = _decode_on_gpu(packed, scales)
    # the torch decoder, one value pair per 32-block: byte b in slot 0 of a block of scale s
    blocks = torch.zeros(packed.numel(), 16, dtype=torch.uint8, device="cuda")
    blocks[:, 0] = packed
    ref = dequantize_mxfp4(blocks, scales[:, None], torch.bfloat16, backend="torch")[:, :2]
    for got, want in ((lo, ref[:, 0]), (hi, ref[:, 1])):
        same = (got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan())
        bad = (~same).nonzero().flatten()[:5].tolist()
        assert not bad, [(int(packed[i]), int(scales[i]), float(got[i]), float(want[i])) for i in bad]
