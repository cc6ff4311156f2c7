"""Triton kernels for the MXFP4 and FP8 quantizers and the MXFP4 decoder (private: call
moeprec.formats with backend="triton").

Bit-identical to the torch reference in moeprec/formats by construction. MXFP4: amax and the
scale exponent come from integer arithmetic on float32 bit patterns; |x| / 2^e is one multiply by
a power of two (exact, subnormal x included); the E2M1 rounding is one IEEE addition and one FMA
(below), exact whatever the hardware's division or approximate functions do. Needs IEEE
subnormals in plain fp32 add/mul/fma (Triton emits them without flush-to-zero). FP8: division
with div_rn (IEEE round-to-nearest, like torch), clamped before the cast.

The quantizers are memory-bound only if the per-element work stays small: at H100 bandwidth the
MXFP4 kernel has about 14 integer-pipe instructions per element to spend (64 lanes/clock/SM), so
the scaling and the rounding run on the FMA pipe (about 11 integer-pipe instructions per element
in the sm_90 SASS; the former integer exponent shift, E2M1 rounding and tile-wide subnormal check
took 15-19 and ran at 70% of copy). Measured on the H100: 90% of the
device-to-device copy bandwidth (benchmarks/results/quant/).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from moeprec.backends import triton_interpret
from moeprec.formats.fp8 import FP8_AMAX_FLOOR, FP8_MAX, fp8_scale, quantize_fp8_torch
from moeprec.formats.mxfp4 import (
    E2M1_VALUES,
    E8M0_BIAS,
    E8M0_NAN,
    MAX_EXP,
    MIN_EXP,
    MX_BLOCK,
    SCALE_MODES,
)
from moeprec.kernels._grid import cdiv, next_power_of_2

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
def _e2m1_code(v):
    """E2M1 magnitude code (0..7) of fp32 v in [0, 6], round to nearest even, on the FMA pipe.

    The E2M1 step is s = 0.5 below 2 and half the binade above: s = 2^(j - 1), j = max(Ev, 0).
    M = 1.5 * 2^22 * 2^j has ulp s, so t = v + M rounds v to k*s in one IEEE addition (ties to
    even k). (t - M) * 2^-126 = k*s * 2^-126 is exact (one FMA) and lands 1.0 on the smallest
    normal fp32 2^-126: its bits are then code << 22 (0.5 is the subnormal 0x400000, each step
    above adds 0x400000), so one shift gives the code. Needs IEEE subnormals (no flush to zero),
    which plain fp32 add/mul/fma have on NVIDIA GPUs.
    """
    ex = (tl.maximum(v, 1.0).to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    t = v + ex * 6291456.0  # 1.5 * 2^22 * 2^j (exact)
    y = tl.fma(t, 1.1754943508222875e-38, ex * -7.395570986446986e-32)  # 2^-126, -1.5 * 2^-104
    return y.to(tl.int32, bitcast=True) >> 22


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
def _mxfp4_quant_kernel(x_ptr, packed_ptr, scales_ptr, NB, MODE: tl.constexpr, BLOCK_B: tl.constexpr):
    """BLOCK_B consecutive 32-blocks of the contiguous input per program, as a [BLOCK_B, 32] tile:
    a thread holds 8 contiguous elements of one block (16-byte loads, 4-byte stores of packed
    nibbles) and the block amax needs only a 4-lane shuffle. Masks cover whole blocks, so the
    loads stay 16 bytes wide whatever K is."""
    b0 = tl.program_id(0).to(tl.int64) * BLOCK_B
    blk = tl.arange(0, BLOCK_B)
    bmask = blk < NB - b0
    offs = blk[:, None] * 32 + tl.arange(0, 32)[None, :]
    x = tl.load(x_ptr + b0 * 32 + offs, mask=bmask[:, None], other=0.0)
    f = x.to(tl.float32)
    bits = f.to(tl.int32, bitcast=True)
    amax = tl.max(bits & 0x7FFFFFFF, axis=1)  # int order of |x| bits = float order; NaN > Inf > finite
    bad = amax >= 0x7F800000
    e = _scale_exponent_bits(tl.where(bad, 0, amax), MODE)
    e = tl.minimum(tl.maximum(e, _MIN_EXP), _MAX_EXP)
    tl.store(scales_ptr + b0 + blk, tl.where(bad, _NAN_BYTE, e + _BIAS).to(tl.uint8), mask=bmask)

    # |x| / 2^e as one multiply by 2^-e (a normal fp32: e <= 126 for finite amax). Exact while
    # the result is normal, subnormal x included; a subnormal result is below 2^-126 and rounds
    # to code 0 either way. All-zero blocks (e = -127) give zeros; NaN/Inf blocks are masked
    # to zero bytes below. min(): saturate to 6.0, the top code.
    inv = ((127 - e) << 23).to(tl.float32, bitcast=True)
    v = tl.minimum(tl.abs(f) * inv[:, None], 6.0)
    codes = _e2m1_code(v) | ((bits >> 28) & 8)  # bit 3 = the sign bit
    lo, hi = tl.split(tl.reshape(codes, (BLOCK_B, 16, 2)))
    byte = (lo | (hi << 4)) & tl.where(bad, 0, 0xFF)[:, None]
    pcols = blk[:, None] * 16 + tl.arange(0, 16)[None, :]
    tl.store(packed_ptr + b0 * 16 + pcols, byte.to(tl.uint8), mask=bmask[:, None])


@triton.jit
def _e2m1_to_f32(code):
    """E2M1 code (int32, 0..15) -> fp32 value, built from bits (no table, no denormals)."""
    mag = code & 7
    e = mag >> 1
    mt = mag & 1
    bits = tl.where(e > 0, ((e + 126) << 23) | (mt << 22), mt * 0x3F000000)
    bits = bits | ((code & 8) << 28)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _e8m0_to_f32(s):
    """E8M0 byte (int32) -> 2^(s-127) as fp32, exactly: 0xFF -> NaN, 0 -> the subnormal 2^-127
    (fp32 bits 0x00400000: byte 0 shifted into the exponent field would read as zero)."""
    f = tl.where(s == 0, 0x00400000, s << 23).to(tl.float32, bitcast=True)
    return tl.where(s == 255, float("nan"), f)


@triton.jit
def _decoded_to(v, dtype: tl.constexpr):
    """Decoded MXFP4 values (fp32, exact: at most 2 significant bits) in `dtype`, rounded once.
    To bf16 as the top half of the fp32 bits: exact, subnormals included (the interpreter's own
    fp32 -> bf16 cast flushes those, e.g. the values of a 2^-127 scale block)."""
    if dtype == tl.bfloat16:
        return (v.to(tl.int32, bitcast=True) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return v.to(dtype)


@triton.jit
def _load_mx_blocks(packed_ptr, scales_ptr, keep_ptr, NB, blocks_per_group,
                    HAS_KEEP: tl.constexpr, BLOCK_B: tl.constexpr):
    """This program's BLOCK_B consecutive 32-blocks of a flat MXFP4 pair: (first block, block
    offsets, mask, packed bytes [BLOCK_B, 16] and scale bytes as int32). HAS_KEEP: blocks of
    groups (experts) whose keep flag is 0 are masked off (masked scales read as 127)."""
    b0 = tl.program_id(0).to(tl.int64) * BLOCK_B
    blk = tl.arange(0, BLOCK_B)
    bmask = blk < NB - b0
    if HAS_KEEP:
        group = (b0 + blk) // blocks_per_group
        bmask = bmask & (tl.load(keep_ptr + group, mask=bmask, other=0) != 0)
    pcols = blk[:, None] * 16 + tl.arange(0, 16)[None, :]
    byte = tl.load(packed_ptr + b0 * 16 + pcols, mask=bmask[:, None], other=0).to(tl.int32)
    s = tl.load(scales_ptr + b0 + blk, mask=bmask, other=127).to(tl.int32)
    return b0, blk, bmask, byte, s


@triton.jit
def _mxfp4_dequant_kernel(packed_ptr, scales_ptr, out_ptr, NB, keep_ptr, blocks_per_group,
                          HAS_KEEP: tl.constexpr, BLOCK_B: tl.constexpr):
    """BLOCK_B consecutive 32-blocks per program, the quantizer's tile read backwards: 16 packed
    bytes and one scale byte in, 32 values out. E2M1 * 2^(s-127) is exact in fp32 (a 2^-127
    scale is subnormal: applied as 0.5 * 2^-126) and is rounded once, to the output dtype.
    HAS_KEEP: blocks of groups (experts) whose keep flag is 0 are neither read nor written."""
    b0, blk, bmask, byte, s = _load_mx_blocks(packed_ptr, scales_ptr, keep_ptr, NB,
                                              blocks_per_group, HAS_KEEP, BLOCK_B)
    scale = (tl.maximum(s, 1) << 23).to(tl.float32, bitcast=True)
    scale = tl.where(s == _NAN_BYTE, float("nan"), scale)
    half = tl.where(s == 0, 0.5, 1.0)
    lo = _e2m1_to_f32(byte & 15)
    hi = _e2m1_to_f32(byte >> 4)
    v = tl.reshape(tl.join(lo, hi), (BLOCK_B, 32))  # low nibble first, as the bytes hold them
    v = v * half[:, None] * scale[:, None]
    y = _decoded_to(v, out_ptr.dtype.element_ty)
    offs = blk[:, None] * 32 + tl.arange(0, 32)[None, :]
    tl.store(out_ptr + b0 * 32 + offs, y, mask=bmask[:, None])


@triton.jit
def _mxfp4_row_scale_kernel(scales_ptr, smax_ptr, row_scale_ptr, R, NB, keep_ptr, rows_per_group,
                            HAS_KEEP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    """Per MXFP4 row: its largest scale byte smax (int32) and the row scale 2^(smax - 133) of
    mxfp4_to_fp8_torch (NaN for 0xFF). Rows of groups whose keep flag is 0 are skipped."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    if HAS_KEEP:
        rmask = rmask & (tl.load(keep_ptr + rows // rows_per_group, mask=rmask, other=0) != 0)
    smax = tl.zeros([BLOCK_R], dtype=tl.int32)
    for b0 in range(0, NB, BLOCK_B):
        blk = b0 + tl.arange(0, BLOCK_B)
        s = tl.load(scales_ptr + rows[:, None] * NB + blk[None, :],
                    mask=rmask[:, None] & (blk < NB)[None, :], other=0).to(tl.int32)
        smax = tl.maximum(smax, tl.max(s, axis=1))
    row_scale = _e8m0_to_f32(smax) * 0.015625  # 2^(smax - 133): exact, fp32 subnormals kept
    tl.store(smax_ptr + rows, smax, mask=rmask)
    tl.store(row_scale_ptr + rows, row_scale, mask=rmask)


@triton.jit
def _mxfp4_to_fp8_kernel(packed_ptr, scales_ptr, smax_ptr, out_ptr, NB, blocks_per_row, keep_ptr,
                         blocks_per_group, HAS_KEEP: tl.constexpr, EXACT_CAST: tl.constexpr,
                         BLOCK_B: tl.constexpr):
    """BLOCK_B consecutive 32-blocks per program (the decoder's tile): E2M1 * 2^(s - smax + 6),
    smax its row's largest scale byte, exact in fp32 and rounded once, by the cast to E4M3.
    HAS_KEEP: blocks of groups (experts) whose keep flag is 0 are neither read nor written."""
    b0, blk, bmask, byte, s = _load_mx_blocks(packed_ptr, scales_ptr, keep_ptr, NB,
                                              blocks_per_group, HAS_KEEP, BLOCK_B)
    smax = tl.load(smax_ptr + (b0 + blk) // blocks_per_row, mask=bmask, other=0)
    # 2^(s - smax + 6) <= 64; below 2^-126 every value rounds to a signed zero in E4M3 anyway
    factor = ((tl.maximum(s - smax + 6, -126) + 127) << 23).to(tl.float32, bitcast=True)
    factor = tl.where(s == _NAN_BYTE, float("nan"), factor)
    v = tl.join(_e2m1_to_f32(byte & 15), _e2m1_to_f32(byte >> 4))  # low nibble first
    v = tl.reshape(v, (BLOCK_B, 32)) * factor[:, None]
    if EXACT_CAST:
        q = _e4m3_bits_rne(v).to(tl.uint8)
    else:
        q = v.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    offs = blk[:, None] * 32 + tl.arange(0, 32)[None, :]
    tl.store(out_ptr + b0 * 32 + offs, q, mask=bmask[:, None])


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
# MXFP4: 128 blocks of 32 (8 KiB of bf16) per program, 4 warps: 32 elements per thread.
# Best of `bench_quant.py --sweep` on the H100 (2026-11-22): mxfp4 90-91%, fp8 per_token 75%,
# fp8 block 89% of the device-to-device copy bandwidth (benchmarks/results/quant/).
LAUNCH = {
    "mx_blocks": 128,  # 32-blocks per program
    "mx_warps": 4,
    "fp8_rows": 32,  # MXFP4 -> fp8 rows, the row-max pass: rows per program, blocks per step
    "fp8_row_blocks": 128,
    "fp8_tile": 4096,  # elements per program (rows x group columns)
    "fp8_max_group": 8192,  # widest group read in one pass; wider groups take two passes
    "fp8_warps": 16,  # per_token / per_channel / per_tensor (wide groups)
    "fp8_block_warps": 4,  # block granularity: many short groups per program
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
    nb = r * (k // MX_BLOCK)  # x2 is contiguous: its 32-blocks are consecutive
    if nb:
        block_b = LAUNCH["mx_blocks"]
        _mxfp4_quant_kernel[(cdiv(nb, block_b),)](
            x2, packed, scales, nb, MODE=_SCALE_MODE_IDS[scale_mode], BLOCK_B=block_b,
            num_warps=LAUNCH["mx_warps"],
        )
    lead = x.shape[:-1]
    return packed.reshape(*lead, k // 2), scales.reshape(*lead, k // MX_BLOCK)


def dequantize_mxfp4_triton(packed: torch.Tensor, scales: torch.Tensor,
                            dtype: torch.dtype = torch.bfloat16,
                            keep: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of dequantize_mxfp4 for fp16/bf16/fp32 outputs (arguments are checked by
    the public function). `keep` (int32 [packed.shape[0]], internal use): entries along the
    first dim whose flag is 0 are left undecoded (their output is uninitialised memory); the
    fused MoE passes its kept-slot counts (or its expert mask) so that experts it never reads
    cost no decode."""
    half = packed.shape[-1]
    p2, s2 = _rows(packed), _rows(scales)
    out = _empty((p2.shape[0], half * 2), dtype, packed.device)
    nb = s2.numel()  # both contiguous: block b is scale b and packed bytes 16b..16b+15
    if nb:
        block_b = LAUNCH["mx_blocks"]
        _mxfp4_dequant_kernel[(cdiv(nb, block_b),)](
            p2, s2, out, nb, keep if keep is not None else s2,
            nb // packed.shape[0] if keep is not None else 1, HAS_KEEP=keep is not None,
            BLOCK_B=block_b, num_warps=LAUNCH["mx_warps"])
    return out.reshape(*packed.shape[:-1], half * 2)


def mxfp4_to_fp8_triton(packed: torch.Tensor, scales: torch.Tensor,
                        keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of mxfp4_to_fp8_torch (arguments checked by the caller): a pass over the
    scale bytes for each row's largest, then the decoder's flat walk over the blocks. `keep`
    (int32 [packed.shape[0]]): entries along the first dim flagged 0 are left undecoded
    (values and row scales uninitialised), as in dequantize_mxfp4_triton."""
    half = packed.shape[-1]
    p2, s2 = _rows(packed), _rows(scales)
    r, nb_row = s2.shape
    out = _empty((r, half * 2), torch.uint8, packed.device)
    row_scale = _empty((r,), torch.float32, packed.device)
    groups = packed.shape[0] if keep is not None else 1
    if r:
        smax = torch.empty(r, dtype=torch.int32, device=packed.device)
        block_r = LAUNCH["fp8_rows"]
        _mxfp4_row_scale_kernel[(cdiv(r, block_r),)](
            s2, smax, row_scale, r, nb_row, keep if keep is not None else s2, r // groups,
            HAS_KEEP=keep is not None, BLOCK_R=block_r,
            BLOCK_B=min(LAUNCH["fp8_row_blocks"], next_power_of_2(max(nb_row, 1))), num_warps=4)
        nb = s2.numel()
        if nb:
            block_b = LAUNCH["mx_blocks"]
            _mxfp4_to_fp8_kernel[(cdiv(nb, block_b),)](
                p2, s2, smax, out, nb, nb_row, keep if keep is not None else s2, nb // groups,
                HAS_KEEP=keep is not None, EXACT_CAST=triton_interpret(), BLOCK_B=block_b,
                num_warps=LAUNCH["mx_warps"])
    return (out.view(torch.float8_e4m3fn).reshape(*packed.shape[:-1], half * 2),
            row_scale.reshape(packed.shape[:-1]))


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
            _fp8_tensor_quant_kernel[(cdiv(n, tile),)](
                x2, out_bytes, scale, n, BLOCK=tile, EXACT_CAST=exact_cast, num_warps=LAUNCH["fp8_warps"]
            )
        return out.reshape(x.shape), scale.reshape([1] * x.dim())
    group = k if granularity in ("per_token", "per_channel") else block_size
    ngroups = cdiv(k, group) if k else 0
    if ngroups > _MAX_GRID_DIM1:  # tiny blocks on a huge row: not worth a second kernel
        return quantize_fp8_torch(x, granularity, block_size)
    scale = _empty((r, ngroups), torch.float32, x.device)
    if r and k:
        block_g = min(next_power_of_2(group), LAUNCH["fp8_max_group"])
        block_r = max(1, min(LAUNCH["fp8_tile"] // block_g, next_power_of_2(r)))
        grid = (cdiv(r, block_r), ngroups)
        _fp8_group_quant_kernel[grid](
            x2, out_bytes, scale, r, k, group, ngroups, x2.stride(0), out.stride(0), scale.stride(0),
            BLOCK_R=block_r, BLOCK_G=block_g, ONE_PASS=group <= block_g, EXACT_CAST=exact_cast,
            num_warps=LAUNCH["fp8_block_warps"] if granularity == "block"
            else LAUNCH["fp8_warps"] if block_g * block_r >= 4096 else 4,
        )
    return out.reshape(x.shape), scale.reshape(*x.shape[:-1], ngroups)
