"""Triton kernels for the MXFP4 and FP8 quantizers (private: call moeprec.formats with
backend="triton").

Bit-identical to the torch reference in moeprec/formats by construction: the MXFP4 path is
integer arithmetic on float32 bit patterns (amax, scale exponent, E2M1 rounding by comparing bit
patterns, which order like the non-negative floats they encode), so neither flush-to-zero of
subnormals nor approximate division can change a byte. The FP8 path divides with div_rn
(IEEE round-to-nearest, like torch) and clamps before the cast.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from moeprec.formats._backend import triton_interpret
from moeprec.formats.fp8 import FP8_AMAX_FLOOR, FP8_MAX, fp8_scale
from moeprec.formats.mxfp4 import (
    E2M1_MIDPOINTS,
    E8M0_BIAS,
    E8M0_NAN,
    MAX_EXP,
    MIN_EXP,
    MX_BLOCK,
    SCALE_MODES,
)


def _f32_bits(v: float) -> int:
    return struct.unpack("<i", struct.pack("<f", v))[0]


# E2M1 midpoints as float32 bit patterns, and whether a tie counts as passed (ties to even).
_MID0, _MID1, _MID2, _MID3, _MID4, _MID5, _MID6 = (tl.constexpr(_f32_bits(m)) for m, _ in E2M1_MIDPOINTS)
_INC0, _INC1, _INC2, _INC3, _INC4, _INC5, _INC6 = (tl.constexpr(inc) for _, inc in E2M1_MIDPOINTS)
_BIAS = tl.constexpr(E8M0_BIAS)
_NAN_BYTE = tl.constexpr(E8M0_NAN)
_MIN_EXP = tl.constexpr(MIN_EXP)
_MAX_EXP = tl.constexpr(MAX_EXP)
_F8_MAX = tl.constexpr(FP8_MAX)
_F8_FLOOR = tl.constexpr(FP8_AMAX_FLOOR)
_SCALE_MODE_IDS = {m: i for i, m in enumerate(SCALE_MODES)}  # floor, rceil, ceil, even


@triton.jit
def _passed(vb, mid: tl.constexpr, inclusive: tl.constexpr):
    if inclusive:
        return (vb >= mid).to(tl.int32)
    return (vb > mid).to(tl.int32)


@triton.jit
def _scale_exponent_bits(amax, MODE: tl.constexpr):
    """Block exponent from the bits of a finite fp32 amax (int32), unclamped."""
    f = amax >> 23  # biased exponent; 0 for zero and subnormals (they all clamp to -127)
    mant = amax & 0x7FFFFF
    if MODE == 0:  # floor: floor(log2 a) - 2
        e = f - 127 - 2
    elif MODE == 1:  # rceil: ceil(log2(fp32(a / 6)))
        # a = 1.m * 2^E: a / 6 rounds above 2^(E-2) exactly when m > 1.5 (its excess is at least
        # 2/3 of a half step), so e = E - 2 + (m > 1.5) ...
        e = f - 127 - 2 + (mant > 0x400000).to(tl.int32)
        # ... except where 2^(E-2) = 2^-127 is subnormal: its grid is twice as coarse, and
        # m = 1.5 + 2^-23 then rounds down to 2^-127.
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
    sign = tl.reshape((bits >> 28) & 8, (BLOCK_R, NG, 32))

    amax = tl.max(ax, axis=2)  # int order of |x| bits = float order; NaN > Inf > finite
    bad = amax >= 0x7F800000
    e = _scale_exponent_bits(tl.where(bad, 0, amax), MODE)
    e = tl.minimum(tl.maximum(e, _MIN_EXP), _MAX_EXP)
    scale_byte = tl.where(bad, _NAN_BYTE, e + _BIAS)

    # v = |x| / 2^e as fp32 bits. Normal x: shift the biased exponent (capped so the bits never
    # overflow; anything that large saturates anyway); a result below the normal range is < 0.25
    # and rounds to 0. Subnormal x (only a clamped e <= -23 can lift it into range): mantissa
    # integer times a normal power of two, exact.
    e3 = e[:, :, None]
    fx = ax >> 23
    fv = tl.minimum(fx - e3, 200)
    v_norm = tl.where(fv >= 1, (fv << 23) | (ax & 0x7FFFFF), 0)
    pow2 = ((-22 - tl.minimum(e3, -23)) << 23).to(tl.float32, bitcast=True)  # 2^(-149 - e), normal
    v_sub = ((ax & 0x7FFFFF).to(tl.float32) * pow2).to(tl.int32, bitcast=True)
    v_sub = tl.where(e3 <= -23, v_sub, 0)
    vb = tl.where(fx == 0, v_sub, v_norm)

    idx = _passed(vb, _MID0, _INC0)
    idx += _passed(vb, _MID1, _INC1)
    idx += _passed(vb, _MID2, _INC2)
    idx += _passed(vb, _MID3, _INC3)
    idx += _passed(vb, _MID4, _INC4)
    idx += _passed(vb, _MID5, _INC5)
    idx += _passed(vb, _MID6, _INC6)
    codes = tl.where(bad[:, :, None], 0, idx | sign)

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

# Tile sizes: a few thousand elements per program keeps these memory-bound kernels streaming.
_MX_BLOCK_R, _MX_BLOCK_K = 16, 256
_FP8_TILE = 8192  # elements per program (rows x group columns)
_FP8_MAX_GROUP_TILE = 8192  # widest group read in one pass


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation (tests replace it to poison outputs before a kernel runs)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as a contiguous [R, K] matrix (a view when x is contiguous)."""
    return x.contiguous().reshape(-1, x.shape[-1])


def quantize_mxfp4_triton(x: torch.Tensor, scale_mode: str = "rceil") -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of quantize_mxfp4_torch (arguments are checked by the public function)."""
    k = x.shape[-1]
    x2 = _rows(x)
    r = x2.shape[0]
    packed = _empty((r, k // 2), torch.uint8, x.device)
    scales = _empty((r, k // MX_BLOCK), torch.uint8, x.device)
    if r and k:
        block_k = min(_MX_BLOCK_K, triton.next_power_of_2(k))
        grid = (triton.cdiv(r, _MX_BLOCK_R), triton.cdiv(k, block_k))
        _mxfp4_quant_kernel[grid](
            x2, packed, scales, r, k, x2.stride(0), packed.stride(0), scales.stride(0),
            MODE=_SCALE_MODE_IDS[scale_mode], BLOCK_R=_MX_BLOCK_R, BLOCK_K=block_k, num_warps=4,
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
            _fp8_tensor_quant_kernel[(triton.cdiv(n, _FP8_TILE),)](
                x2, out_bytes, scale, n, BLOCK=_FP8_TILE, EXACT_CAST=exact_cast
            )
        return out.reshape(x.shape), scale.reshape([1] * x.dim())
    group = k if granularity in ("per_token", "per_channel") else block_size
    ngroups = triton.cdiv(k, group) if k else 0
    scale = _empty((r, ngroups), torch.float32, x.device)
    if r and k:
        block_g = min(triton.next_power_of_2(group), _FP8_MAX_GROUP_TILE)
        block_r = max(1, min(_FP8_TILE // block_g, triton.next_power_of_2(r)))
        grid = (triton.cdiv(r, block_r), ngroups)
        _fp8_group_quant_kernel[grid](
            x2, out_bytes, scale, r, k, group, ngroups, x2.stride(0), out.stride(0), scale.stride(0),
            BLOCK_R=block_r, BLOCK_G=block_g, ONE_PASS=group <= block_g, EXACT_CAST=exact_cast,
            num_warps=8 if block_g * block_r >= 4096 else 4,
        )
    return out.reshape(x.shape), scale.reshape(*x.shape[:-1], ngroups)
