"""MXFP4 (OCP Microscaling v1.0): E2M1 elements sharing one E8M0 scale per block of 32.

Layout: `packed` uint8 [..., K/2] holds element 2i in the LOW nibble and 2i+1 in the high
nibble; `scales` uint8 [..., K/32] holds one E8M0 byte per block (value 2^(b-127), 0xFF = NaN).
A nibble is `sign << 3 | index` into E2M1_VALUES.

This file is the pure-torch reference and the public entry point. It works in float64 where
that makes exactness obvious (every E2M1 value times every power of two in [-127, 127] is exact
there); the Triton kernel (moeprec/kernels/quantize.py) reaches the same bytes with integer
arithmetic on the float32 bits, and tests hold the two together.
"""

from __future__ import annotations

import torch

from moeprec._validation import check_choice, check_floating, check_tensor
from moeprec.backends import resolve_backend

MX_BLOCK = 32
E8M0_BIAS = 127
E8M0_NAN = 0xFF
MIN_EXP, MAX_EXP = -127, 127
SCALE_MODES = ("floor", "rceil", "ceil", "even")

# Magnitudes of the 8 E2M1 codes (the sign is bit 3). Everything else is derived from this.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = E2M1_VALUES[-1]
# Round to nearest, ties to even: the magnitude index is the number of midpoints a value has
# passed. At a tie the even index wins, so the midpoint below an even index counts as passed
# (>=) and the one below an odd index does not (>).
E2M1_MIDPOINTS = tuple(
    ((lo + hi) / 2, (i + 1) % 2 == 0) for i, (lo, hi) in enumerate(zip(E2M1_VALUES, E2M1_VALUES[1:]))
)

# Blocks per chunk: bounds the temporaries (float64 copies of a chunk) whatever the input size,
# so a whole MoE layer [E, N, K] quantizes in about its own size plus a few tens of MiB.
_CHUNK_BLOCKS = 1 << 16


def e2m1_table(device: torch.device | str | None = None) -> torch.Tensor:
    """fp32 [16]: the value of each 4-bit code (codes 8..15 are the negatives, 8 is -0.0)."""
    mags = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])


def pow2_f64(k: torch.Tensor) -> torch.Tensor:
    """2^k as float64, built from its bits (exact on every device; exp2 need not be), |k| <= 1022."""
    return ((k.to(torch.int64) + 1023) << 52).view(torch.float64)


def e8m0_table(device: torch.device | str | None = None) -> torch.Tensor:
    """fp32 [256]: the value 2^(b-127) of each E8M0 byte b, NaN for 0xFF (2^-127 is subnormal)."""
    b = torch.arange(256, dtype=torch.int64, device=device)
    vals = pow2_f64(b - E8M0_BIAS).float()  # exact: every 2^(b-127) is an fp32 value
    vals[E8M0_NAN] = float("nan")
    return vals


def _ceil_log2(t: torch.Tensor) -> torch.Tensor:
    """ceil(log2(t)) for finite t > 0 (subnormals included), as int32."""
    m, ex = torch.frexp(t)  # t = m * 2^ex, m in [0.5, 1)
    return (ex - (m == 0.5).to(ex.dtype)).to(torch.int32)


def _floor_log2(t: torch.Tensor) -> torch.Tensor:
    """floor(log2(t)) for finite t > 0 (subnormals included), as int32."""
    _, ex = torch.frexp(t)
    return (ex - 1).to(torch.int32)


def scale_exponent(amax: torch.Tensor, scale_mode: str = "rceil") -> torch.Tensor:
    """Unclamped block exponent e (int32) from a float32 block amax (finite, > 0).

    The SPEC rules, written as literally as possible (this is the reference):
      floor: floor(log2(amax)) - 2   (OCP: the largest element lands in [4, 8), may saturate)
      rceil: ceil(log2(amax / 6))    (amax / 6 in fp32; the largest element lands in (3, 6])
      ceil:  ceil(log2(amax)) - 2
      even:  floor rule on amax with its mantissa rounded to 1 bit, ties away from zero
    """
    check_choice("scale_mode", scale_mode, SCALE_MODES)
    amax = amax.float()
    if scale_mode == "floor":
        return _floor_log2(amax) - 2
    if scale_mode == "ceil":
        return _ceil_log2(amax) - 2
    if scale_mode == "rceil":
        # IEEE fp32 division (subnormal results kept, may underflow to 0). Divide by a tensor:
        # torch on CUDA turns division by a Python scalar into a multiply by its reciprocal.
        q = amax / torch.full_like(amax, E2M1_MAX)
        e = _ceil_log2(q)
        return torch.where(q > 0, e, torch.full_like(e, MIN_EXP))
    # even: m in [0.5, 1) -> 4m in [2, 4); round half away to an integer in {2, 3, 4}.
    m, ex = torch.frexp(amax.double())
    r = torch.floor(m * 4 + 0.5)
    return (ex - 1 + (r == 4).to(ex.dtype) - 2).to(torch.int32)


def _quantize_blocks(xb: torch.Tensor, scale_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """xb fp32 [B, 32] -> (codes uint8 [B, 32], scale bytes uint8 [B])."""
    amax = xb.abs().amax(dim=1)  # NaN propagates
    bad = ~torch.isfinite(amax)  # a NaN or Inf anywhere in the block
    zero = amax == 0
    safe = torch.where(bad | zero, torch.ones_like(amax), amax)
    e = scale_exponent(safe, scale_mode).clamp(MIN_EXP, MAX_EXP)
    e = torch.where(zero, torch.full_like(e, MIN_EXP), e)
    scale_bytes = torch.where(bad, torch.full_like(e, E8M0_NAN), e + E8M0_BIAS).to(torch.uint8)

    # |x| / 2^e is exact in float64 for every fp32 x and e in [-127, 127].
    v = xb.abs().double() * pow2_f64(-e).unsqueeze(1)
    idx = torch.zeros(xb.shape, dtype=torch.uint8, device=xb.device)
    for mid, inclusive in E2M1_MIDPOINTS:
        idx += (v >= mid) if inclusive else (v > mid)  # saturation: idx stops at 7
    codes = idx | (torch.signbit(xb).to(torch.uint8) << 3)
    codes = torch.where(bad.unsqueeze(1), torch.zeros_like(codes), codes)  # NaN blocks: 0 codes
    return codes, scale_bytes


def _check_last_dim(x: torch.Tensor) -> int:
    if x.dim() == 0:
        raise ValueError("x: expected at least 1 dim (blocks run along the last one), got a scalar")
    k = x.shape[-1]
    if k % MX_BLOCK:
        raise ValueError(f"x: expected the last dim (K) to be a multiple of {MX_BLOCK}, got {k}")
    return k


@torch.no_grad()  # weights are often Parameters: never build a graph through the codec
def quantize_mxfp4_torch(x: torch.Tensor, scale_mode: str = "rceil") -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference of quantize_mxfp4 (any device; chunked, bounded memory)."""
    check_floating("x", x)
    check_choice("scale_mode", scale_mode, SCALE_MODES)
    k = _check_last_dim(x)
    lead = x.shape[:-1]
    flat = x.reshape(-1, MX_BLOCK)  # a view when x is contiguous
    nblocks = flat.shape[0]
    packed = torch.empty((nblocks, MX_BLOCK // 2), dtype=torch.uint8, device=x.device)
    scales = torch.empty((nblocks,), dtype=torch.uint8, device=x.device)
    for start in range(0, nblocks, _CHUNK_BLOCKS):
        stop = min(start + _CHUNK_BLOCKS, nblocks)
        codes, sb = _quantize_blocks(flat[start:stop].float(), scale_mode)
        packed[start:stop] = codes[:, 0::2] | (codes[:, 1::2] << 4)
        scales[start:stop] = sb
    return packed.reshape(*lead, k // 2), scales.reshape(*lead, k // MX_BLOCK)


def quantize_mxfp4(
    x: torch.Tensor, scale_mode: str = "rceil", *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x [..., K] (K % 32 == 0) to MXFP4: (packed uint8 [..., K/2], scales uint8 [..., K/32]).

    x is read as float32. Scale modes: see `scale_exponent` (SPEC section 3). A block holding
    NaN or Inf gets scale byte 0xFF (and zero codes); an all-zero block gets byte 0. Elements are
    x / 2^e rounded to nearest E2M1, ties to even, saturating to +-6; -0.0 and negatives that
    round to zero keep their sign bit. `backend`: "torch", "triton" or "auto" (Triton on CUDA).
    """
    check_floating("x", x)
    check_choice("scale_mode", scale_mode, SCALE_MODES)
    _check_last_dim(x)
    if resolve_backend(backend, x.device) == "triton":
        from moeprec.kernels.quantize import quantize_mxfp4_triton

        return quantize_mxfp4_triton(x, scale_mode)
    return quantize_mxfp4_torch(x, scale_mode)


def _as_uint8(name: str, t: torch.Tensor) -> torch.Tensor:
    if isinstance(t, torch.Tensor) and t.dtype in _VIEW_DTYPES:
        return t.view(torch.uint8)
    check_tensor(name, t, dtypes=(torch.uint8,))
    return t


def check_mxfp4_pair(packed: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a (packed, scales) pair; returns both as uint8."""
    packed = _as_uint8("packed", packed)
    scales = _as_uint8("scales", scales)
    if packed.dim() == 0 or scales.dim() != packed.dim():
        raise ValueError(
            f"scales: expected {packed.dim()} dims like packed {tuple(packed.shape)}, "
            f"got shape {tuple(scales.shape)}"
        )
    want = (*packed.shape[:-1], packed.shape[-1] * 2 // MX_BLOCK)
    if packed.shape[-1] % (MX_BLOCK // 2) or tuple(scales.shape) != want:
        raise ValueError(
            f"scales: expected shape {want} for packed of shape {tuple(packed.shape)} "
            f"(one byte per {MX_BLOCK} elements = {MX_BLOCK // 2} packed bytes), "
            f"got {tuple(scales.shape)}"
        )
    if packed.device != scales.device:
        raise ValueError(f"scales: expected a tensor on {packed.device}, got one on {scales.device}")
    return packed, scales


def dequantize_mxfp4(
    packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16, *,
    backend: str = "auto",
) -> torch.Tensor:
    """MXFP4 -> [..., K] in `dtype`. A 0xFF scale gives a NaN block.

    Each value E2M1 * 2^(b-127) is exact in float32 (overflow to inf aside), so the result is
    rounded once, to `dtype`. `backend`: "torch", "triton" or "auto" (Triton on CUDA; float64
    output always takes the torch code).
    """
    packed, scales = check_mxfp4_pair(packed, scales)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"dtype: expected a floating dtype (fp16, bf16, fp32, fp64), got {dtype}")
    if dtype != torch.float64 and resolve_backend(backend, packed.device) == "triton":
        from moeprec.kernels.quantize import dequantize_mxfp4_triton

        return dequantize_mxfp4_triton(packed, scales, dtype)
    lead, half = packed.shape[:-1], packed.shape[-1]
    p = packed.reshape(-1, MX_BLOCK // 2)
    s = scales.reshape(-1)
    lut, scale_lut = e2m1_table(packed.device), e8m0_table(packed.device)
    out = torch.empty((p.shape[0], MX_BLOCK), dtype=dtype, device=packed.device)
    for start in range(0, p.shape[0], _CHUNK_BLOCKS):
        stop = min(start + _CHUNK_BLOCKS, p.shape[0])
        pc = p[start:stop].long()
        vals = torch.stack([lut[pc & 0xF], lut[pc >> 4]], dim=-1).flatten(1)  # [B, 32]
        out[start:stop] = (vals * scale_lut[s[start:stop].long()].unsqueeze(1)).to(dtype)
    return out.reshape(*lead, half * 2)


# E4M3 holds every E2M1 value times 2^j exactly for -8 <= j <= FP8_ROW_HEADROOM (6 * 2^6 = 384
# <= 448; 0.5 * 2^-8 and 1.5 * 2^-8 are E4M3 subnormals, multiples of 2^-9): MXFP4 rows brought
# to fp8 put their largest block scale at 2^6, so every block within FP8_EXACT_SPAN binades of it
# is exact.
FP8_ROW_HEADROOM = 6
FP8_EXACT_SPAN = 14


def mxfp4_to_fp8_torch(packed: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 rows -> (E4M3 values [..., K], fp32 row scales [...]), value = e4m3 * row scale.

    Each block's E2M1 values are multiplied by 2^(s - smax + 6), smax the row's largest scale
    byte, and the row scale is 2^(smax - 127 - 6). Exact for every block within 14 binades of
    its row's largest (real weights stay far inside); blocks further down round to E4M3's
    subnormals, an absolute error of at most 2^(smax - 143), 2^-16 / 6 of the largest value the
    row's scales allow. A NaN scale (0xFF) gives NaN values in its block and a NaN row scale,
    so the row's products are NaN as with `dequantize_mxfp4`. The fused MoE's fp8-activation
    path decodes MXFP4 weights this way before its fp8 GEMMs (moeprec/kernels/quantize.py has
    the Triton twin, bit for bit).
    """
    packed, scales = check_mxfp4_pair(packed, scales)
    lead, half = packed.shape[:-1], packed.shape[-1]
    s = scales.to(torch.int32)
    smax = s.amax(-1) if s.shape[-1] else torch.zeros(lead, dtype=torch.int32, device=s.device)
    p = packed.long()
    vals = torch.stack([e2m1_table(packed.device)[p & 0xF], e2m1_table(packed.device)[p >> 4]],
                       dim=-1).reshape(*lead, s.shape[-1], MX_BLOCK).double()
    shift = pow2_f64(s - smax.unsqueeze(-1) + FP8_ROW_HEADROOM).unsqueeze(-1)
    v = (vals * shift).float()  # exact down to fp32's subnormals, far below E4M3's
    v = torch.where((s == E8M0_NAN).unsqueeze(-1), float("nan"), v)
    row_scale = pow2_f64(smax - E8M0_BIAS - FP8_ROW_HEADROOM).float()
    row_scale = torch.where(smax == E8M0_NAN, float("nan"), row_scale)
    return v.reshape(*lead, half * 2).to(torch.float8_e4m3fn), row_scale


def fake_quantize_mxfp4(
    x: torch.Tensor, scale_mode: str = "rceil", *, dtype: torch.dtype | None = None, backend: str = "auto"
) -> torch.Tensor:
    """dequantize_mxfp4(quantize_mxfp4(x)): the MXFP4 activation quantizer Q_fp4, in x's dtype
    (or `dtype`)."""
    packed, scales = quantize_mxfp4(x, scale_mode, backend=backend)
    return dequantize_mxfp4(packed, scales, dtype=x.dtype if dtype is None else dtype)


_VIEW_DTYPES = tuple(
    getattr(torch, name) for name in ("float4_e2m1fn_x2", "float8_e8m0fnu") if hasattr(torch, name)
)


def _view(t: torch.Tensor, name: str) -> torch.Tensor:
    check_tensor("t", t, dtypes=(torch.uint8,))
    if not hasattr(torch, name):
        raise NotImplementedError(f"torch {torch.__version__} has no torch.{name}")
    return t.view(getattr(torch, name))


def as_float4_e2m1fn_x2(packed: torch.Tensor) -> torch.Tensor:
    """View packed uint8 MXFP4 elements as torch.float4_e2m1fn_x2 (same bytes, same nibble order)."""
    return _view(packed, "float4_e2m1fn_x2")


def as_float8_e8m0fnu(scales: torch.Tensor) -> torch.Tensor:
    """View uint8 E8M0 scale bytes as torch.float8_e8m0fnu."""
    return _view(scales, "float8_e8m0fnu")
