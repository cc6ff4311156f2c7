"""Number formats: MXFP4 (E2M1 elements, E8M0 block scales) and FP8 E4M3 with fp32 scales.

Pure-torch references live here; Triton kernels reaching the same bytes live in
moeprec/kernels/quantize.py and are selected with `backend=` (chosen in moeprec/backends.py).
"""

from moeprec.formats.fp8 import dequantize_fp8, fake_quantize_fp8, quantize_fp8
from moeprec.formats.mxfp4 import (
    as_float4_e2m1fn_x2,
    as_float8_e8m0fnu,
    dequantize_mxfp4,
    fake_quantize_mxfp4,
    quantize_mxfp4,
)

__all__ = [
    "as_float4_e2m1fn_x2",
    "as_float8_e8m0fnu",
    "dequantize_fp8",
    "dequantize_mxfp4",
    "fake_quantize_fp8",
    "fake_quantize_mxfp4",
    "quantize_fp8",
    "quantize_mxfp4",
]
