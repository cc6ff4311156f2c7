"""MXFP4 codec (torch reference): decode tables, E2M1 rounding, scale rules, special blocks."""

import math

import numpy as np
import pytest
import torch

from moeprec.formats import mxfp4
from moeprec.formats.mxfp4 import (
    dequantize_mxfp4,
    e2m1_table,
    e8m0_table,
    fake_quantize_mxfp4,
    quantize_mxfp4,
)

ml_dtypes = pytest.importorskip("ml_dtypes")

MODES = ("floor", "rceil", "ceil", "even")
F32_MAX = float(np.finfo(np.float32).max)


def q(x, mode="rceil"):
    return quantize_mxfp4(x, mode, backend="torch")


def codes_of(packed):
    """uint8 [..., K/2] -> nibble codes [..., K] (even element from the low nibble)."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def up(v):
    return float(np.nextafter(np.float32(v), np.float32(np.inf)))


def down(v):
    return float(np.nextafter(np.float32(v), np.float32(-np.inf)))


def block_with_amax(amax, fill=0.1):
    """One 32-element fp32 block whose largest magnitude is amax (at position 7)."""
    x = torch.full((1, 32), fill * amax, dtype=torch.float32)
    x[0, 7] = amax
    return x


# ----------------------------------------------------------------------------- decode tables


def test_e2m1_table_all_16_codes():
    hand = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    t = e2m1_table()
    assert t.tolist() == hand + [-v for v in hand]
    assert torch.signbit(t[8]) and not torch.signbit(t[0])
    # and ml_dtypes decodes each code the same way
    ref = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    assert np.array_equal(np.signbit(ref), torch.signbit(t).numpy())
    assert np.array_equal(ref, t.numpy())


def test_e8m0_table_all_256_bytes():
    t = e8m0_table()
    for b in range(255):
        assert t[b].item() == math.ldexp(1.0, b - 127), b
    assert math.isnan(t[255].item())
    if hasattr(torch, "float8_e8m0fnu"):
        via_torch = torch.arange(256, dtype=torch.uint8).view(torch.float8_e8m0fnu).float()
        assert torch.equal(via_torch[:255], t[:255]) and via_torch[255].isnan()


def test_dequantize_every_byte_and_nibble_order():
    packed = torch.arange(256, dtype=torch.uint8).reshape(16, 16)  # 16 blocks of 16 bytes
    scales = torch.tensor([127, 128, 0, 254, 255, 126] + [127] * 10, dtype=torch.uint8).reshape(16, 1)
    out = dequantize_mxfp4(packed, scales, dtype=torch.float32)
    lut = e2m1_table()
    for blk in range(16):
        s = scales[blk, 0].item()
        for j in range(16):
            byte = packed[blk, j].item()
            for half, nib in ((0, byte & 0xF), (1, byte >> 4)):
                got = out[blk, 2 * j + half].item()
                if s == 255:
                    assert math.isnan(got)
                else:
                    exact = lut[nib].item() * math.ldexp(1.0, s - 127)  # python float64
                    assert got == torch.tensor(exact, dtype=torch.float32).item()  # inf past fp32


# ----------------------------------------------------------------------------- E2M1 rounding

TIES = [  # |v| -> expected magnitude index (value), ties to even, saturating
    (0.25, 0), (0.75, 2), (1.25, 2), (1.75, 4), (2.5, 4), (3.5, 6), (5.0, 6), (6.0, 7),
    (0.2, 0), (0.3, 1), (0.5, 1), (1.0, 2), (1.5, 3), (2.0, 4), (3.0, 5), (4.0, 6), (5.5, 7),
    (6.5, 7), (7.9, 7),
]


# amax that puts each mode at e = 0: floor(log2 7.9) - 2, ceil(log2(6 / 6)), ceil(log2 4) - 2,
# and 6 = 1.5 * 4 already has a 1-bit mantissa
E0_AMAX = {"floor": 7.9, "rceil": 6.0, "ceil": 4.0, "even": 6.0}


@pytest.mark.parametrize("mode", MODES)
def test_e2m1_tie_table_with_signs(mode):
    table = [(v, idx) for v, idx in TIES if v <= E0_AMAX[mode]]
    vals = torch.tensor([v for v, _ in table])
    x = torch.zeros(1, 64)
    x[0, : len(vals)] = vals
    x[0, 32 : 32 + len(vals)] = -vals
    x[0, 31] = x[0, 63] = E0_AMAX[mode]
    packed, scales = q(x, mode)
    assert scales.tolist() == [[127, 127]]
    c = codes_of(packed)[0]
    for i, (v, idx) in enumerate(table):
        assert c[i].item() == idx, v
        assert c[32 + i].item() == idx | 8, -v


# ----------------------------------------------------------------------------- scale rules

K_POWERS = (-100, -3, 0, 7, 100)

# (description, amax as a function of 2^k, expected e - k) for each mode, worked by hand from
# the SPEC formulas:  floor: floor(log2 a) - 2;  rceil: ceil(log2(fp32(a / 6)));
# ceil: ceil(log2 a) - 2;  even: floor rule after rounding a's mantissa to 1 bit (ties away).
BOUNDARIES = [
    # amax,                    floor rceil ceil even
    (lambda p: 6 * p,            0,    0,    1,   0),   # 1.5 * 2^(k+2); a/6 = 2^k exactly
    (lambda p: up(6 * p),        0,    1,    1,   0),   # a/6 = 2^k (1 + 2^-23 / 1.5) rounds up
    (lambda p: down(6 * p),      0,    0,    1,   0),   # a/6 rounds to just under 2^k
    (lambda p: 4 * p,            0,    0,    0,   0),   # a/6 = 2^k * 2/3
    (lambda p: up(4 * p),        0,    0,    1,   0),
    (lambda p: down(4 * p),     -1,    0,    0,   0),   # even: mantissa 1.99.. rounds to 2
    (lambda p: down(8 * p),      0,    1,    1,   1),   # 8 - ulp: log2 just under k + 3
    (lambda p: 7 * p,            0,    1,    1,   1),   # even: 1.75 is a tie, away -> 2
    (lambda p: down(7 * p),      0,    1,    1,   0),
    (lambda p: 1.5 * p,         -2,   -2,   -1,  -2),   # a/6 = 2^(k-2) exactly
    (lambda p: up(1.5 * p),     -2,   -1,   -1,  -2),
    (lambda p: down(1.5 * p),   -2,   -2,   -1,  -2),
]


@pytest.mark.parametrize("k", K_POWERS)
@pytest.mark.parametrize("row", range(len(BOUNDARIES)))
def test_scale_modes_at_boundaries(k, row):
    make, *offsets = BOUNDARIES[row]
    amax = make(math.ldexp(1.0, k))
    for mode, off in zip(MODES, offsets):
        _, scales = q(block_with_amax(amax), mode)
        assert scales.item() == k + off + 127, (mode, amax, k)
        # the negative block gets the same scale
        assert q(-block_with_amax(amax), mode)[1].item() == k + off + 127


def test_rceil_rounding_of_amax_over_6_in_the_subnormal_range():
    # a = (1.5 + 2^-23) * 2^-125: a/6 = 2^-127 (1 + 2^-23/1.5); near 2^-127 fp32 is subnormal,
    # its grid is 2^-149 = 2^-127 * 2^-22, so the excess (a third of a grid step) rounds away:
    # ceil(log2(2^-127)) = -127 -> byte 0. One mantissa step more is 2/3 of a step: rounds up
    # to 2^-127 + 2^-149 -> e = -126 -> byte 1.
    base = math.ldexp(1.5, -125)
    assert q(block_with_amax(up(base)), "rceil")[1].item() == 0
    assert q(block_with_amax(up(up(base))), "rceil")[1].item() == 1
    assert q(block_with_amax(base), "rceil")[1].item() == 0  # a/6 = 2^-127 exactly
    # one binade up 2^-126 is normal, its grid 2^-149 = 2^-126 * 2^-23: the same excess is
    # 2/3 of a step and rounds up, to e = -125
    assert q(block_with_amax(2 * base), "rceil")[1].item() == 1  # a/6 = 2^-126 exactly
    assert q(block_with_amax(up(2 * base)), "rceil")[1].item() == 2


@pytest.mark.parametrize("mode", MODES)
def test_zero_block(mode):
    x = torch.zeros(2, 64)
    x[1, 32:] = torch.randn(32)
    packed, scales = q(x, mode)
    assert scales[0].tolist() == [0, 0] and scales[1, 0] == 0
    assert (packed[0] == 0).all() and (packed[1, :16] == 0).all()
    assert (dequantize_mxfp4(packed, scales, torch.float32)[0] == 0).all()
    # -0.0 keeps its sign bit (as a float4 cast would)
    pn, sn = q(-torch.zeros(1, 32), mode)
    assert sn.item() == 0 and (pn == 0x88).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf_blocks(mode, bad):
    x = torch.randn(3, 64)
    x[1, 40] = bad
    packed, scales = q(x, mode)
    assert scales[1, 1] == 0xFF
    assert (packed[1, 16:] == 0).all()
    ref_p, ref_s = q(x[[0, 2]], mode)
    assert torch.equal(scales[[0, 2]], ref_s) and torch.equal(packed[[0, 2]], ref_p)
    assert scales[1, 0] == q(x[1:2, :32], mode)[1].item()
    y = dequantize_mxfp4(packed, scales, torch.float32)
    assert y[1, 32:].isnan().all() and not y[1, :32].isnan().any() and not y[[0, 2]].isnan().any()


@pytest.mark.parametrize("mode", MODES)
def test_subnormal_block_uses_clamped_exponent(mode):
    # every value subnormal: e is clamped to -127 (byte 0), elements are x * 2^127 rounded
    m = torch.tensor([1, 2, 3, 2**20, 2**21, 3 * 2**20, 2**22, 2**22 + 2**21, 2**23 - 1] * 3 + [5] * 5)
    x = (m.double() * 2.0**-149).float().reshape(1, 32)
    x[0, ::3] *= -1
    assert (x.abs() < 2.0**-126).all() and (x != 0).all()
    packed, scales = q(x, mode)
    assert scales.item() == 0
    expect = (x.double().numpy() * 2.0**127).astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
    assert codes_of(packed).numpy().tolist() == expect.tolist()


def test_huge_and_tiny_blocks():
    fmax = F32_MAX  # (2 - 2^-23) * 2^127
    # floor: 127 - 2; ceil: 128 - 2; rceil: fmax/6 ~ 1.33 * 2^125 -> 126; even: rounds to 2^128 -> 126
    for mode, e in zip(MODES, (125, 126, 126, 126)):
        assert q(block_with_amax(fmax), mode)[1].item() == e + 127
        assert q(block_with_amax(-fmax), mode)[1].item() == e + 127
    # tiny normal amax: floor(log2(2^-126)) - 2 = -128 -> clamped to -127
    for mode in MODES:
        assert q(block_with_amax(2.0**-126), mode)[1].item() == 0
        assert q(block_with_amax(2.0**-140), mode)[1].item() == 0


# ----------------------------------------------------------------------------- against references


def _random_blocks(n_blocks, gen, lo=-30, hi=30):
    """Blocks at random binades, with exact E2M1 ties planted in some of them."""
    x = torch.randn(n_blocks, 32, generator=gen)
    x *= torch.exp2(torch.randint(lo, hi, (n_blocks, 1), generator=gen).float())
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    ties = mids[torch.randint(0, 7, (n_blocks, 8), generator=gen)]
    ties *= torch.exp2(torch.randint(lo, hi, (n_blocks, 1), generator=gen).float())
    x[::2, :8] = ties[::2] * torch.where(torch.rand(n_blocks // 2 + n_blocks % 2, 8, generator=gen) < 0.5, -1, 1)
    x[::2, 31] = 6 * x[::2, :8].abs().amax(1) / 5  # a tie-friendly amax for some modes
    return x


@pytest.mark.parametrize("mode", MODES)
def test_element_rounding_matches_ml_dtypes(mode):
    gen = torch.Generator().manual_seed(1)
    x = _random_blocks(256, gen).reshape(8, 1024)
    packed, scales = q(x, mode)
    e = scales.double() - 127
    scaled = x.double().reshape(8, 32, 32) / torch.exp2(e).unsqueeze(-1)
    expect = scaled.numpy().astype(ml_dtypes.float4_e2m1fn).view(np.uint8).reshape(8, 1024)
    assert np.array_equal(codes_of(packed).numpy(), expect)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torchao_to_mx(mode, dtype):
    pytest.importorskip("torchao")
    try:
        from torchao.prototype.mx_formats.config import ScaleCalculationMode
        from torchao.prototype.mx_formats.mx_tensor import to_mx
    except Exception as exc:  # torchao present but not importable with this torch
        pytest.skip(f"torchao.prototype.mx_formats unavailable: {exc}")
    gen = torch.Generator().manual_seed(2)
    # normal-range blocks only: torchao clamps tiny scales to 2^-126 and gives Inf blocks a
    # finite scale, where moeprec follows the SPEC (exponent clamp at -127, Inf -> 0xFF)
    x = _random_blocks(128, gen, lo=-20, hi=20).reshape(4, 1024).to(dtype)
    scale_ref, data_ref = to_mx(x, torch.float4_e2m1fn_x2, 32, ScaleCalculationMode(mode))
    packed, scales = q(x, mode)
    assert torch.equal(scales, scale_ref.view(torch.uint8).reshape(scales.shape))
    assert torch.equal(packed, data_ref.view(torch.uint8).reshape(packed.shape))


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_shapes_and_dtypes(mode, dtype):
    x = torch.randn(2, 3, 96).to(dtype)
    packed, scales = q(x, mode)
    assert packed.shape == (2, 3, 48) and scales.shape == (2, 3, 3)
    assert packed.dtype == scales.dtype == torch.uint8
    y32 = dequantize_mxfp4(packed, scales, torch.float32)
    for out_dtype in (torch.bfloat16, torch.float16, torch.float64):
        assert torch.equal(dequantize_mxfp4(packed, scales, out_dtype), y32.to(out_dtype))
    assert dequantize_mxfp4(packed, scales).dtype == torch.bfloat16
    fq = fake_quantize_mxfp4(x, mode, backend="torch")
    assert fq.dtype == dtype and torch.equal(fq, y32.to(dtype))
    assert fake_quantize_mxfp4(x, mode, dtype=torch.float32, backend="torch").dtype == torch.float32
    # non-contiguous input: same bytes as its contiguous copy
    xt = torch.randn(96, 4).to(dtype).T
    assert all(torch.equal(a, b) for a, b in zip(q(xt, mode), q(xt.contiguous(), mode)))


def test_chunked_quantize_equals_one_shot(monkeypatch):
    x = torch.randn(3, 20, 64) * torch.exp2(torch.randint(-8, 8, (3, 20, 1)).float())
    whole = q(x, "rceil")
    monkeypatch.setattr(mxfp4, "_CHUNK_BLOCKS", 7)  # 120 blocks -> 18 uneven chunks
    chunked = q(x, "rceil")
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    assert torch.equal(
        dequantize_mxfp4(*whole, dtype=torch.float32), dequantize_mxfp4(*chunked, dtype=torch.float32)
    )


def test_parameter_input():
    w = torch.nn.Parameter(torch.randn(4, 64))
    packed, scales = q(w)
    assert not packed.requires_grad and torch.equal(packed, q(w.detach())[0])


def test_empty_inputs():
    packed, scales = q(torch.zeros(0, 64))
    assert packed.shape == (0, 32) and scales.shape == (0, 2)
    assert dequantize_mxfp4(packed, scales).shape == (0, 64)
    packed, scales = q(torch.zeros(4, 0))
    assert packed.shape == (4, 0) and scales.shape == (4, 0)


def test_dtype_views():
    x = torch.randn(4, 64)
    packed, scales = q(x)
    if hasattr(torch, "float4_e2m1fn_x2"):
        v = mxfp4.as_float4_e2m1fn_x2(packed)
        assert v.dtype == torch.float4_e2m1fn_x2 and torch.equal(v.view(torch.uint8), packed)
        # dequantize accepts the views as well
        s = mxfp4.as_float8_e8m0fnu(scales)
        assert torch.equal(dequantize_mxfp4(v, s), dequantize_mxfp4(packed, scales))
        assert torch.equal(s.float(), e8m0_table()[scales.long()])
    else:
        with pytest.raises(NotImplementedError):
            mxfp4.as_float4_e2m1fn_x2(packed)


# ----------------------------------------------------------------------------- to fp8 rows


def _rows_with_scale_spans(rows=64, blocks=6, seed=4):
    """Random packed bytes (every code) under scale rows spanning 0..40 binades, down to byte 0
    and up to 252 (the fp32 decode overflows from 6 * 2^126 on), and one NaN-scale row."""
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (rows, blocks * 16), generator=g).to(torch.uint8)
    top = torch.randint(0, 253, (rows, 1), generator=g)
    span = torch.arange(rows).remainder(41).unsqueeze(1)
    scales = (top - torch.randint(0, 1 << 20, (rows, blocks), generator=g) % (span + 1)).clamp(0, 254)
    scales[:, 0] = top[:, 0]
    scales[5, 2] = mxfp4.E8M0_NAN
    return packed, scales.to(torch.uint8)


def test_to_fp8_rows_exact_within_the_span_and_bounded_beyond():
    packed, scales = _rows_with_scale_spans()
    w, row_scale = mxfp4.mxfp4_to_fp8_torch(packed, scales)
    assert w.dtype == torch.float8_e4m3fn and w.shape == (64, 192) and row_scale.shape == (64,)
    ref = dequantize_mxfp4(packed, scales, torch.float64)
    got = w.double() * row_scale.double().unsqueeze(1)
    s = scales.long()
    smax = s.amax(1)
    # the NaN row: NaN where the reference is (its block) and, through the row scale, elsewhere
    assert torch.isnan(row_scale[5]) and torch.isnan(got[5]).all() and torch.isnan(ref[5, 64:96]).all()
    ok = torch.arange(64) != 5
    exact_rows = ok & (smax - s.amin(1) <= mxfp4.FP8_EXACT_SPAN)
    assert exact_rows.sum() > 10 and (~exact_rows & ok).sum() > 10
    assert torch.equal(got[exact_rows], ref[exact_rows])
    err = (got[ok] - ref[ok]).abs().amax(1)
    assert (err <= torch.exp2(smax[ok].double() - 143)).all()
    # rounding beyond the span: E4M3 round-to-nearest-even of the shifted values (ml_dtypes)
    shift = torch.exp2((s - smax.unsqueeze(1) + mxfp4.FP8_ROW_HEADROOM).double()).repeat_interleave(32, 1)
    vals = dequantize_mxfp4(packed, torch.full_like(scales, 127), torch.float64) * shift
    expect = vals[ok].numpy().astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    assert np.array_equal(w[ok].view(torch.uint8).numpy(), expect)
    assert (err > 0).any()  # some rows did round


def test_to_fp8_rows_shapes():
    packed, scales = q(torch.randn(3, 5, 96))
    w, row_scale = mxfp4.mxfp4_to_fp8_torch(packed, scales)
    assert w.shape == (3, 5, 96) and row_scale.shape == (3, 5)
    assert torch.equal(w.double() * row_scale.double()[..., None],
                       dequantize_mxfp4(packed, scales, torch.float64))
    w, row_scale = mxfp4.mxfp4_to_fp8_torch(*q(torch.zeros(4, 0)))
    assert w.shape == (4, 0) and row_scale.shape == (4,)
    with pytest.raises(ValueError, match="scales"):
        mxfp4.mxfp4_to_fp8_torch(packed, scales[..., :1])


# ----------------------------------------------------------------------------- properties

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra.numpy import arrays  # noqa: E402

finite_f32 = st.floats(
    min_value=-(2.0**100), max_value=2.0**100, allow_nan=False, allow_infinity=False, allow_subnormal=True, width=32
)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, (2, 64), elements=finite_f32), st.sampled_from(MODES))
def test_property_error_bound_and_fixed_point(a, mode):
    x = torch.from_numpy(a.copy())
    packed, scales = q(x, mode)
    y = dequantize_mxfp4(packed, scales, torch.float32)
    # each element is off by at most a quarter of itself (E2M1 spacing; saturation in floor/even
    # stays under |x|/4 because the largest element is below 8 * 2^e) or 2^(e-2) near zero
    step = torch.exp2(scales.double() - 127 - 2).repeat_interleave(32, dim=-1)
    err = (y.double() - x.double()).abs()
    assert (err <= torch.maximum(step, x.double().abs() / 4)).all()
    # dequantized values are a fixed point: quantizing them again gives the same values, and
    # (for floor/even, whose scale is a function of the leading binade) the same bytes
    p2, s2 = q(y, mode)
    assert torch.equal(dequantize_mxfp4(p2, s2, torch.float32), y)
    if mode in ("floor", "even"):
        assert torch.equal(p2, packed) and torch.equal(s2, scales)


# ----------------------------------------------------------------------------- bad input


def test_bad_input():
    with pytest.raises(ValueError, match="x.*multiple of 32"):
        q(torch.randn(4, 48))
    with pytest.raises(ValueError, match="x"):
        q(torch.tensor(1.0))
    with pytest.raises(TypeError, match="x"):
        q(torch.ones(4, 32, dtype=torch.int32))
    with pytest.raises(TypeError, match="x"):
        q(torch.ones(4, 32, dtype=torch.bool))
    with pytest.raises(TypeError, match="x"):
        q(np.ones((4, 32), dtype=np.float32))
    with pytest.raises(ValueError, match="scale_mode"):
        q(torch.randn(4, 32), "nearest")
    with pytest.raises(ValueError, match="backend"):
        quantize_mxfp4(torch.randn(4, 32), backend="cuda")
    packed, scales = q(torch.randn(4, 64))
    with pytest.raises(ValueError, match="scales"):
        dequantize_mxfp4(packed, scales[:, :1])
    with pytest.raises(ValueError, match="scales"):
        dequantize_mxfp4(packed, scales[:3])
    with pytest.raises(ValueError, match="scales"):
        dequantize_mxfp4(packed, scales.reshape(8))
    with pytest.raises(ValueError, match="scales"):
        dequantize_mxfp4(packed[:, :24], scales)  # 24 packed bytes is not whole blocks
    with pytest.raises(TypeError, match="packed"):
        dequantize_mxfp4(packed.to(torch.int32), scales)
    with pytest.raises(TypeError, match="scales"):
        dequantize_mxfp4(packed, scales.float())
    with pytest.raises(TypeError, match="dtype"):
        dequantize_mxfp4(packed, scales, dtype=torch.int8)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_large_weight_peak_memory(backend):
    # a gpt-oss-120b gate/up weight [E, 2I, H] in bf16 (4.2 GB): quantizing it must cost little
    # more than its outputs (1.1 GB), whichever backend
    w = torch.randn(128, 5760, 2880, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    packed, scales = quantize_mxfp4(w, "rceil", backend=backend)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - packed.numel() - scales.numel()
    assert extra <= 256 * 2**20, f"{extra / 2**20:.0f} MiB of temporaries"
    # spot-check a slice against the CPU reference
    ref = quantize_mxfp4(w[5, :64].cpu(), "rceil", backend="torch")
    assert torch.equal(packed[5, :64].cpu(), ref[0]) and torch.equal(scales[5, :64].cpu(), ref[1])
