"""Triton kernels for the MXFP4 and FP8 quantizers (private: call moeprec.formats with
backend="triton").

Bit-identical to the torch reference in moeprec/formats by construction. MXFP4: amax and the
scale exponent come from integer arithmetic on float32 bit patterns; |x| / 2^e is an exact
integer shift of the exponent bits; the E2M1 rounding is one IEEE float addition (below), so
neither flush-to-zero nor approximate division can change a byte. FP8: division with div_rn
(IEEE round-to-nearest, like torch), clamped before the cast.

The quantizers are memory-bound only if the per-element work stays small (about 20 simple ops
per element at H100 bandwidth), which is why the E2M1 rounding is not a chain of comparisons.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from moeprec.formats._backend import triton_interpret
from moeprec.formats.fp8 import FP8_AMAX_FLOOR, FP8_MAX, fp8_scale, quantize_fp8_torch
from moeprec.formats.mxfp4 import (
    E2M1_VALUES,
    E8M0_BIAS,
    E8M0_NAN,
    MAX_EXP,
    MIN_EXP,
    MX_BLOCK,
    SCALE_MODES,
    quantize_mxfp4_torch,
)

# The E2M1 rounding below assumes the grid {0, .5, 1, 1.5, 2, 3, 4, 6}: 1 mantissa bit, binades
# [1, 2), [2, 4), [4, 8) and a subnormal step of 0.5.
assert E2M1_VALUES == (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_BIAS = tl.constexpr(E8M0_BIAS)
_NAN_BYTE = tl.constexpr(E8M0_NAN)
_MIN_EXP = tl.constexpr(MIN_EXP)
_MAX_EXP = tl.constexpr(MAX_EXP)
_F8_MAX = tl.constexpr(FP8_MAX)
_F8_FLOOR = tl.constexpr(FP8_AMAX_FLOOR)
_SCALE_MODE_IDS = {m: i for i, m in enumerate(SCALE_MODES)}  # floor, rceil, ceil, even
_MAX_GRID_DIM1 = 65535  # CUDA's limit on grid.y


@triton.jit
def _e2m1_code(vb):
    """E2M1 magnitude code (0..7) of v in [0, 6] given as fp32 bits, round to nearest even.

    The E2M1 step is s = 0.5 below 2 and half the binade above: s = 2^(j - 1), j = max(Ev, 0).
    Adding M = (1.5 * 2^23 + 2j) * s to v rounds v to a multiple k*s in one IEEE addition (ties
    to even k, and k has the parity of the code), and the low mantissa bits of v + M then hold
    2j + k, which is the code (k in {0..4}; codes 2j + k with j = 0, 1, 2 cover 0..7).
    """
    ex = tl.maximum(vb, 0x3F800000) & 0x7F800000  # bits of 2^j
    mbits = ex + ((22 << 23) | 0x400000) + ((ex >> 22) - 254)  # (ex >> 22) - 254 = 2j
    t = (vb.to(tl.float32, bitcast=True) + mbits.to(tl.float32, bitcast=True)).to(tl.int32, bitcast=True)
    return t & 7


@triton.jit
def _scale_exponent_bits(amax, MODE: tl.constexpr):
    """Block exponent from the bits of a finite fp32 amax (int32), unclamped."""
    f = amax >> 23  # biased exponent; 0 for zero and subnormals (they all clamp to -127)
    mant = amax & 0x7FFFFF
    if MODE == 0:  # floor: floor(log2 a) - 2
        e = f - 127 - 2
    elif MODE == 1:  # rceil: ceil(log2(fp32(a / 6)))
        # a = 1.m * 2^E: a / 6 rounds above 2^(E-2) exactly when m > 1.5 (one mantissa step
        # above 1.5 puts a / 6 4/3 of a half step above 2^(E-2)), so e = E - 2 + (m > 1.5) ...
        e = f - 127 - 2 + (mant > 0x400000).to(tl.int32)
        # ... except where 2^(E-2) = 2^-127 is subnormal: its grid is twice as coarse, the same
        # excess is 2/3 of a half step, and m = 1.5 + 2^-23 rounds down to 2^-127.
        e = tl.where((f == 2) & (mant == 0x400001), f - 129, e)
    elif MODE == 2:  # ceil: ceil(log2 a) - 2
        e = f - 127 - 2 + (mant != 0).to(tl.int32)
    else:  # even: round the mantissa to 1 bit, ties away (a carry bumps the exponent), floor
        e = ((amax + 0x200000) >> 23) - 127 - 2
    return e


@triton.jit
def _mxfp4_quant_kernel(
    x_ptr,
    packed_ptr,
    scales_ptr,
    R,
    K,
    stride_x,
    stride_p,
    stride_s,
    MODE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    NG: tl.constexpr = BLOCK_K // 32
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < R
    rows64 = rows.to(tl.int64)
    mask = rmask[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    bits = x.to(tl.float32).to(tl.int32, bitcast=True)
    ax = tl.reshape(bits & 0x7FFFFFFF, (BLOCK_R, NG, 32))
    sign = tl.reshape(bits >> 28, (BLOCK_R, NG, 32))  # bit 3 = the sign bit

    amax = tl.max(ax, axis=2)  # int order of |x| bits = float order; NaN > Inf > finite
    bad = amax >= 0x7F800000
    e = _scale_exponent_bits(tl.where(bad, 0, amax), MODE)
    e = tl.minimum(tl.maximum(e, _MIN_EXP), _MAX_EXP)
    scale_byte = tl.where(bad, _NAN_BYTE, e + _BIAS)

    # v = |x| / 2^e as fp32 bits: subtract e from the exponent field. Exact for normal x (a
    # result that falls out of the normal range is far below 0.25 either way and rounds to 0);
    # NaN/Inf blocks and all-zero blocks shift everything to <= 0, i.e. zero codes.
    eshift = tl.where(bad | (amax == 0), 0x7FFFFFFF, e << 23)[:, :, None]
    vb = tl.maximum(ax - eshift, 0)
    # Zeros and subnormal x get a wrong shift (no implicit bit) but, while e >= -124, a value
    # below 0.25 both ways. In a tile with a block clamped lower, take them exactly: mantissa
    # integer times the normal power 2^(-149 - e).
    tiny = (e < -124) & (amax > 0) & (amax < 0x7F800000)
    if tl.max(tiny.to(tl.int32)) > 0:
        e3 = tl.where(tiny, e, 0)[:, :, None]
        pow2 = ((-22 - tl.minimum(e3, -23)) << 23).to(tl.float32, bitcast=True)
        v_sub = ((ax & 0x7FFFFF).to(tl.float32) * pow2).to(tl.int32, bitcast=True)
        vb = tl.where((ax < 0x800000) & (e3 < -124), v_sub, vb)
    # saturate: v >= 6 takes the top code, 6.0. NaN/Inf blocks: zero codes, no signs.
    codes = _e2m1_code(tl.minimum(vb, 0x40C00000)) | (sign & tl.where(bad, 0, 8)[:, :, None])
    lo, hi = tl.split(tl.reshape(codes, (BLOCK_R, BLOCK_K // 2, 2)))
    byte = (lo | (hi << 4)).to(tl.uint8)
    pcols = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    pmask = rmask[:, None] & (pcols < K // 2)[None, :]
    tl.store(packed_ptr + rows64[:, None] * stride_p + pcols[None, :], byte, mask=pmask)
    scols = pid_k * NG + tl.arange(0, NG)
    smask = rmask[:, None] & (scols < K // 32)[None, :]
    tl.store(scales_ptr + rows64[:, None] * stride_s + scols[None, :], scale_byte.to(tl.uint8), mask=smask)


@triton.jit
def _e4m3_bits_rne(q):
    """float32 in [-448, 448] (or NaN) -> E4M3 bits (int32), round to nearest even, in integer
    arithmetic. The interpreter's own fp32 -> fp8 cast mis-rounds values whose rounding carries
    into the exponent (127.07 -> 64); hardware casts are exact and are used on the GPU."""
    bits = q.to(tl.int32, bitcast=True)
    a = bits & 0x7FFFFFFF
    # normal E4M3 (|q| >= 2^-6): drop 20 mantissa bits, ties to even; a carry bumps the
    # exponent; then rebias 127 -> 7
    normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - ((127 - 7) << 3)
    # subnormal E4M3: n = |q| * 2^9 rounded to an integer in [0, 8] (8 is the smallest normal)
    m24 = tl.where(a >= 0x00800000, (a & 0x7FFFFF) | 0x800000, a & 0x7FFFFF)
    exp = tl.maximum(a >> 23, 1) - 127
    shift = tl.minimum(tl.maximum(14 - exp, 21), 25)
    sub = (m24 + (1 << (shift - 1)) - 1 + ((m24 >> shift) & 1)) >> shift
    mag = tl.where(a < 0x3C800000, sub, normal)
    mag = tl.where(a > 0x7F800000, 0x7F, mag)
    return mag | ((bits >> 24) & 0x80)


@triton.jit
def _fp8_cast(x, scale, EXACT_CAST: tl.constexpr):
    """x / scale (IEEE division, as torch), clamped to +-448 with NaN kept -> E4M3 bytes."""
    q = tl.math.div_rn(x, scale)
    q = tl.where(q != q, q, tl.minimum(tl.maximum(q, -_F8_MAX), _F8_MAX))
    if EXACT_CAST:
        return _e4m3_bits_rne(q).to(tl.uint8)
    return q.to(tl.float8e4nv).to(tl.uint8, bitcast=True)


@triton.jit
def _fp8_scale(amax_bits):
    amax = amax_bits.to(tl.float32, bitcast=True)
    amax = tl.where(amax < _F8_FLOOR, _F8_FLOOR, amax)  # NaN stays NaN
    return tl.math.div_rn(amax, _F8_MAX)


@triton.jit
def _fp8_group_quant_kernel(
    x_ptr,
    out_ptr,
    scale_ptr,
    R,
    K,
    G,
    NGROUPS,
    stride_x,
    stride_o,
    stride_s,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
    ONE_PASS: tl.constexpr,
    EXACT_CAST: tl.constexpr,
):
    """One fp32 scale per (row, group of G columns): G = K per row, or the block size.

    ONE_PASS: the group fits one tile (read once); else two passes over it (amax, then cast).
    """
    pid_r = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    rows64 = rows.to(tl.int64)
    start = g * G
    stop = tl.minimum(start + G, K)
    offs = tl.arange(0, BLOCK_G)
    if ONE_PASS:
        cols = start + offs
        mask = rmask[:, None] & (cols < stop)[None, :]
        x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        amax_bits = tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)
        scale = _fp8_scale(amax_bits)
        tl.store(out_ptr + rows64[:, None] * stride_o + cols[None, :], _fp8_cast(x, scale[:, None], EXACT_CAST), mask=mask)
    else:
        amax_bits = tl.zeros((BLOCK_R,), dtype=tl.int32)
        for c0 in range(start, stop, BLOCK_G):
            cols = c0 + offs
            mask = rmask[:, None] & (cols < stop)[None, :]
            x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
            ab = x.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF
            amax_bits = tl.maximum(amax_bits, tl.max(ab, axis=1))
        scale = _fp8_scale(amax_bits)
        for c0 in range(start, stop, BLOCK_G):
            cols = c0 + offs
            mask = rmask[:, None] & (cols < stop)[None, :]
            x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + rows64[:, None] * stride_o + cols[None, :], _fp8_cast(x, scale[:, None], EXACT_CAST), mask=mask)
    tl.store(scale_ptr + rows64 * stride_s + g, scale, mask=rmask)


@triton.jit
def _fp8_tensor_quant_kernel(x_ptr, out_ptr, scale_ptr, N, BLOCK: tl.constexpr, EXACT_CAST: tl.constexpr):
    """Cast with one precomputed fp32 scale (per-tensor)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr)
    tl.store(out_ptr + offs, _fp8_cast(x, scale, EXACT_CAST), mask=mask)


# ----------------------------------------------------------------------------- launchers

# Launch parameters, in one place (benchmarks/bench_quant.py --sweep times alternatives).
# A few thousand elements per program keep these memory-bound kernels streaming; 16 x 256 with
# 8 warps is 16 elements and about 60 registers per thread on sm90 (half occupancy).
# Best of `bench_quant.py --sweep` on the H100 (2026-11-22): mxfp4 70%, fp8 per_token 75%,
# fp8 block 81% of the device-to-device copy bandwidth (benchmarks/results/quant/).
LAUNCH = {
    "mx_block_r": 16,
    "mx_block_k": 256,
    "mx_warps": 4,
    "fp8_tile": 4096,  # elements per program (rows x group columns)
    "fp8_max_group": 8192,  # widest group read in one pass; wider groups take two passes
    "fp8_warps": 16,
}


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation (tests replace it to poison outputs before a kernel runs)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as a contiguous [R, K] matrix (a view when x is contiguous)."""
    return x.contiguous().reshape(math.prod(x.shape[:-1]), x.shape[-1])


def quantize_mxfp4_triton(x: torch.Tensor, scale_mode: str = "rceil") -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of quantize_mxfp4_torch (arguments are checked by the public function)."""
    k = x.shape[-1]
    x2 = _rows(x)
    r = x2.shape[0]
    packed = _empty((r, k // 2), torch.uint8, x.device)
    scales = _empty((r, k // MX_BLOCK), torch.uint8, x.device)
    block_r = LAUNCH["mx_block_r"]
    block_k = min(LAUNCH["mx_block_k"], triton.next_power_of_2(max(k, MX_BLOCK)))
    if triton.cdiv(k, block_k) > _MAX_GRID_DIM1:  # K beyond 16M: not worth a second kernel
        return quantize_mxfp4_torch(x, scale_mode)
    if r and k:
        grid = (triton.cdiv(r, block_r), triton.cdiv(k, block_k))
        _mxfp4_quant_kernel[grid](
            x2, packed, scales, r, k, x2.stride(0), packed.stride(0), scales.stride(0),
            MODE=_SCALE_MODE_IDS[scale_mode], BLOCK_R=block_r, BLOCK_K=block_k,
            num_warps=LAUNCH["mx_warps"],
        )
    lead = x.shape[:-1]
    return packed.reshape(*lead, k // 2), scales.reshape(*lead, k // MX_BLOCK)


def quantize_fp8_triton(
    x: torch.Tensor, granularity: str = "per_token", block_size: int = 128, *, exact_cast: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of quantize_fp8_torch (arguments are checked by the public function).

    exact_cast: cast to E4M3 with integer arithmetic instead of the hardware conversion (both
    round to nearest even); None = only where Triton is interpreted (its cast is wrong there).
    """
    if exact_cast is None:
        exact_cast = triton_interpret()
    k = x.shape[-1]
    x2 = _rows(x)
    r = x2.shape[0]
    out = _empty((r, k), torch.float8_e4m3fn, x.device)
    out_bytes = out.view(torch.uint8)
    if granularity == "per_tensor":
        lo, hi = x2.aminmax()  # one read, no |x| temporary; NaN propagates
        amax = torch.maximum(-lo.float(), hi.float())
        scale = fp8_scale(amax).reshape(1)
        n = x2.numel()
        if n:
            tile = LAUNCH["fp8_tile"]
            _fp8_tensor_quant_kernel[(triton.cdiv(n, tile),)](
                x2, out_bytes, scale, n, BLOCK=tile, EXACT_CAST=exact_cast, num_warps=LAUNCH["fp8_warps"]
            )
        return out.reshape(x.shape), scale.reshape([1] * x.dim())
    group = k if granularity in ("per_token", "per_channel") else block_size
    ngroups = triton.cdiv(k, group) if k else 0
    if ngroups > _MAX_GRID_DIM1:  # tiny blocks on a huge row: not worth a second kernel
        return quantize_fp8_torch(x, granularity, block_size)
    scale = _empty((r, ngroups), torch.float32, x.device)
    if r and k:
        block_g = min(triton.next_power_of_2(group), LAUNCH["fp8_max_group"])
        block_r = max(1, min(LAUNCH["fp8_tile"] // block_g, triton.next_power_of_2(r)))
        grid = (triton.cdiv(r, block_r), ngroups)
        _fp8_group_quant_kernel[grid](
            x2, out_bytes, scale, r, k, group, ngroups, x2.stride(0), out.stride(0), scale.stride(0),
            BLOCK_R=block_r, BLOCK_G=block_g, ONE_PASS=group <= block_g, EXACT_CAST=exact_cast,
            num_warps=LAUNCH["fp8_warps"] if block_g * block_r >= 4096 else 4,
        )
    return out.reshape(x.shape), scale.reshape(*x.shape[:-1], ngroups)
