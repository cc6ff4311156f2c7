"""FP8 E4M3 (torch.float8_e4m3fn) with float32 scales: x ~= x_fp8.float() * scale.

Scale shapes (keepdim, so `x_fp8.float() * scale` broadcasts except for "block"):
  per_tensor:  [1, ..., 1] (x.dim() ones)
  per_token:   [..., rows, 1]  one scale per row of the last two dims (activations: a token)
  per_channel: [..., rows, 1]  the same computation, named for weights [N, K] (an output channel)
  block:       [..., rows, ceil(K / block_size)]  one scale per 1 x block_size row segment;
               use dequantize_fp8(x_fp8, scale, block_size) to apply it.

scale = max(amax, FP8_AMAX_FLOOR) / 448 in float32 (the floor keeps all-zero rows finite);
values are x / scale in float32, clamped to +-448, then cast (round to nearest even). torch's own
overflow behaviour on the cast differs by version and device, so it is never relied on.
"""

from __future__ import annotations

import math

import torch

from moeprec._validation import check_choice, check_floating, check_positive_int, check_tensor
from moeprec.backends import FP8_CAPABILITY, resolve_backend

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# amax floor: a row of zeros (or of values too small to matter) gets a finite, normal scale.
FP8_AMAX_FLOOR = 1e-12
GRANULARITIES = ("per_token", "per_tensor", "per_channel", "block")


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """float32 scale from a float32 amax (NaN propagates)."""
    amax = amax.float().clamp(min=FP8_AMAX_FLOOR)
    # a tensor divisor keeps IEEE division on CUDA (a Python scalar becomes a reciprocal multiply)
    return amax / torch.full_like(amax, FP8_MAX)


def fp8_cast(xf: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """xf float32 / scale, clamped to +-448, cast to E4M3 (NaN stays NaN)."""
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _check_input(x: torch.Tensor, granularity: str, block_size: int) -> None:
    check_floating("x", x)
    check_choice("granularity", granularity, GRANULARITIES)
    check_positive_int("block_size", block_size)
    if x.dim() == 0:
        raise ValueError("x: expected at least 1 dim (scales run along rows of the last dim), got a scalar")


# Elements per chunk of rows: bounds the fp32 temporaries whatever the input size.
_CHUNK_ELEMS = 1 << 22


def _row_scales(xf: torch.Tensor, group: int) -> torch.Tensor:
    """fp32 [R, ceil(K / group)] scales of xf [R, K], one per row segment of `group` columns."""
    r, k = xf.shape
    nb = -(-k // group)
    if nb == 0:
        return xf.new_zeros((r, 0))
    # pad with zeros up to whole segments; zeros never raise an amax
    padded = torch.nn.functional.pad(xf, (0, nb * group - k)).reshape(r, nb, group)
    return fp8_scale(padded.abs().amax(dim=-1))


@torch.no_grad()  # weights are often Parameters: never build a graph through the codec
def quantize_fp8_torch(
    x: torch.Tensor, granularity: str = "per_token", block_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference of quantize_fp8 (any device; chunked over rows, bounded memory)."""
    _check_input(x, granularity, block_size)
    k = x.shape[-1]
    x2 = x.reshape(math.prod(x.shape[:-1]), k)
    r = x2.shape[0]
    out = torch.empty((r, k), dtype=FP8_DTYPE, device=x.device)
    step = max(1, _CHUNK_ELEMS // max(k, 1))
    if granularity == "per_tensor":
        if x2.numel():
            lo, hi = x2.aminmax()  # no |x| temporary; NaN propagates
            amax = torch.maximum(-lo.float(), hi.float())
        else:
            amax = torch.zeros((), device=x.device)
        scale = fp8_scale(amax)
        for start in range(0, r, step):
            out[start : start + step] = fp8_cast(x2[start : start + step].float(), scale)
        return out.reshape(x.shape), scale.reshape([1] * x.dim())
    block = granularity == "block"
    nb = -(-k // block_size) if block else 1
    scales = torch.empty((r, nb), dtype=torch.float32, device=x.device)
    for start in range(0, r, step):
        xf = x2[start : start + step].float()
        if block:
            s = _row_scales(xf, block_size)
            full = s.repeat_interleave(block_size, dim=-1)[:, :k]
        else:  # one scale per row (an empty row gets the floor scale)
            s = full = fp8_scale(xf.abs().amax(dim=-1, keepdim=True) if k else xf.new_zeros((xf.shape[0], 1)))
        scales[start : start + step] = s
        out[start : start + step] = fp8_cast(xf, full)
    return out.reshape(x.shape), scales.reshape(*x.shape[:-1], nb)


def quantize_fp8(
    x: torch.Tensor,
    granularity: str = "per_token",
    block_size: int = 128,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x [..., K] to (x_fp8 float8_e4m3fn, scale float32); shapes in the module doc.

    `backend`: "torch", "triton" or "auto" (Triton on CUDA); both give the same bytes.
    """
    _check_input(x, granularity, block_size)
    use_triton = resolve_backend(backend, x.device, min_capability=FP8_CAPABILITY) == "triton"
    if use_triton and x.numel() > 0:
        from moeprec.kernels.quantize import quantize_fp8_triton

        return quantize_fp8_triton(x, granularity, block_size)
    return quantize_fp8_torch(x, granularity, block_size)


def expand_fp8_scale(scale: torch.Tensor, shape: torch.Size, block_size: int = 128) -> torch.Tensor:
    """Scale broadcastable to `shape`: per-tensor/per-row scales as they are, block scales
    repeated block_size times along the last dim (and cut to K)."""
    check_tensor("scale", scale, dtypes=(torch.float32,))
    check_positive_int("block_size", block_size)
    k = shape[-1]
    if scale.dim() != len(shape):
        raise ValueError(
            f"scale: expected {len(shape)} dims (keepdim) for x_fp8 of shape {tuple(shape)}, "
            f"got shape {tuple(scale.shape)}"
        )
    nb = -(-k // block_size)
    lead_ok = all(s in (1, n) for s, n in zip(scale.shape[:-1], shape[:-1]))
    if not lead_ok or scale.shape[-1] not in (1, nb):
        raise ValueError(
            f"scale: expected shape [..., 1] or [..., ceil(K/block_size)={nb}] matching x_fp8 of "
            f"shape {tuple(shape)} (block_size={block_size}), got {tuple(scale.shape)}"
        )
    if scale.shape[-1] == 1:
        return scale
    return scale.repeat_interleave(block_size, dim=-1)[..., :k]


def dequantize_fp8(
    x_fp8: torch.Tensor, scale: torch.Tensor, block_size: int = 128, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """x_fp8.float() * scale (block scales expanded), in `dtype`."""
    check_tensor("x_fp8", x_fp8, dtypes=(FP8_DTYPE,))
    if x_fp8.dim() == 0:
        raise ValueError("x_fp8: expected at least 1 dim, got a scalar")
    check_tensor("scale", scale, dtypes=(torch.float32,), device=x_fp8.device)
    s = expand_fp8_scale(scale, x_fp8.shape, block_size)
    return (x_fp8.float() * s).to(dtype)


def fake_quantize_fp8(
    x: torch.Tensor,
    granularity: str = "per_token",
    block_size: int = 128,
    *,
    dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """dequantize_fp8(quantize_fp8(x)): the FP8 activation quantizer Q_fp8, in x's dtype (or
    `dtype`)."""
    q, scale = quantize_fp8(x, granularity, block_size, backend=backend)
    return dequantize_fp8(q, scale, block_size, dtype=x.dtype if dtype is None else dtype)
