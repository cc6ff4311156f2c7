"""FP8 E4M3 codec (torch reference): scales, saturation, zero rows, granularities and shapes."""

import numpy as np
import pytest
import torch

from moeprec.formats.fp8 import (
    FP8_AMAX_FLOOR,
    dequantize_fp8,
    fake_quantize_fp8,
    quantize_fp8,
)

GRANULARITIES = ("per_token", "per_tensor", "per_channel", "block")


def q(x, granularity="per_token", block_size=128):
    return quantize_fp8(x, granularity, block_size, backend="torch")


def reference_scale(x, granularity, block_size):
    """amax / 448 per group, computed independently with numpy (float32)."""
    a = np.abs(x.float().numpy())
    if granularity == "per_tensor":
        amax = a.max(keepdims=True).reshape([1] * a.ndim) if a.size else np.zeros([1] * a.ndim, np.float32)
    elif granularity in ("per_token", "per_channel"):
        amax = a.max(axis=-1, keepdims=True)
    else:
        k = a.shape[-1]
        nb = -(-k // block_size)
        amax = np.stack([a[..., i * block_size : (i + 1) * block_size].max(-1) for i in range(nb)], -1)
    return np.maximum(amax, np.float32(FP8_AMAX_FLOOR)).astype(np.float32) / np.float32(448)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("shape", [(7, 200), (2, 3, 256), (1, 100), (5, 1)])
def test_scale_values_shapes_and_cast(granularity, shape):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = torch.randn(shape) * torch.exp2(torch.randint(-6, 6, (*shape[:-1], 1)).float())
    xq, scale = q(x, granularity, block_size=64)
    k = shape[-1]
    want_shape = {
        "per_tensor": (1,) * len(shape),
        "per_token": (*shape[:-1], 1),
        "per_channel": (*shape[:-1], 1),
        "block": (*shape[:-1], -(-k // 64)),
    }[granularity]
    assert xq.shape == x.shape and xq.dtype == torch.float8_e4m3fn
    assert scale.shape == want_shape and scale.dtype == torch.float32
    ref = reference_scale(x, granularity, 64)
    assert np.array_equal(scale.numpy(), ref)
    # the element cast: x / scale, clamped, rounded to nearest even by ml_dtypes
    full = np.repeat(ref, 64, axis=-1)[..., :k] if granularity == "block" else ref
    expect = np.clip(x.numpy() / full, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    assert np.array_equal(xq.view(torch.uint8).numpy(), expect.view(np.uint8))
    # x ~= x_fp8 * scale (broadcasting directly except for block scales)
    y = dequantize_fp8(xq, scale, block_size=64)
    if granularity != "block":
        assert torch.equal(y, xq.float() * scale)
    full_t = torch.from_numpy(np.array(np.broadcast_to(full, x.shape)))
    assert ((y - x).abs() <= x.abs() * 2.0**-4 + full_t * 2.0**-9).all()


def test_per_token_and_per_channel_are_the_same_rows():
    x = torch.randn(3, 5, 64)
    a, sa = q(x, "per_token")
    b, sb = q(x, "per_channel")
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)) and torch.equal(sa, sb)
    # one row's scale depends only on that row
    x2 = x.clone()
    x2[1, 2] *= 1000
    _, s2 = q(x2, "per_token")
    mask = torch.ones(3, 5, 1, dtype=torch.bool)
    mask[1, 2] = False
    assert torch.equal(s2[mask], sa[mask]) and s2[1, 2] != sa[1, 2]


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_saturation_and_huge_values(granularity):
    x = torch.randn(4, 256)
    x[1, 5] = 3e38  # amax / 448 stays finite; x / scale may round just above 448
    x[2] *= 1e30
    xq, scale = q(x, granularity)
    xf = xq.float()
    assert torch.isfinite(xf).all() and torch.isfinite(scale).all()
    assert xf.abs().max() == 448
    # values at the clamp edge: amax / (amax / 448) can land a hair above 448 in fp32
    row = torch.tensor([[448.0 * 3.0000002, 1.0] + [0.5] * 126])
    rq, _ = q(row, granularity)
    assert rq.float()[0, 0] == 448


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_zero_rows_get_a_finite_floor_scale(granularity):
    x = torch.zeros(3, 256)
    x[1] = torch.randn(256)
    xq, scale = q(x, granularity)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert (xq.float()[[0, 2]] == 0).all()
    assert torch.equal(dequantize_fp8(xq, scale)[[0, 2]], torch.zeros(2, 256))
    if granularity != "per_tensor":
        assert (scale[0] == np.float32(FP8_AMAX_FLOOR) / np.float32(448)).all()


def test_nan_stays_in_its_row():
    x = torch.randn(3, 256)
    x[1, 7] = float("nan")
    for g in ("per_token", "block"):
        xq, scale = q(x, g)
        y = dequantize_fp8(xq, scale)
        assert not y[[0, 2]].isnan().any() and y[1, 7].isnan()
        ref, _ = q(x[[0, 2]], g)
        assert torch.equal(xq[[0, 2]].view(torch.uint8), ref.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fake_quantize_dtype_and_value(dtype):
    x = torch.randn(6, 160).to(dtype)
    for g in GRANULARITIES:
        y = fake_quantize_fp8(x, g, block_size=64, backend="torch")
        xq, scale = q(x, g, 64)
        assert y.dtype == dtype
        assert torch.equal(y, dequantize_fp8(xq, scale, 64).to(dtype))
    assert fake_quantize_fp8(x, dtype=torch.float32, backend="torch").dtype == torch.float32


def test_empty_and_one_row():
    for g in GRANULARITIES:
        xq, scale = q(torch.zeros(0, 64), g)
        assert xq.shape == (0, 64)
        assert dequantize_fp8(xq, scale).shape == (0, 64)
        xq, scale = q(torch.randn(1, 64), g)
        assert xq.shape == (1, 64)
    assert q(torch.randn(64), "per_token")[1].shape == (1,)
    for g, want in (("per_token", (3, 1)), ("per_channel", (3, 1)), ("block", (3, 0)), ("per_tensor", (1, 1))):
        xq, scale = q(torch.zeros(3, 0), g)
        assert xq.shape == (3, 0) and scale.shape == want, g


def test_chunked_rows_equal_one_shot(monkeypatch):
    from moeprec.formats import fp8

    x = torch.randn(2, 37, 100) * torch.exp2(torch.randint(-8, 8, (2, 37, 1)).float())
    whole = {g: q(x, g, 32) for g in GRANULARITIES}
    monkeypatch.setattr(fp8, "_CHUNK_ELEMS", 300)  # 3 rows per chunk, uneven tail
    for g in GRANULARITIES:
        a, sa = whole[g]
        b, sb = q(x, g, 32)
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)) and torch.equal(sa, sb), g


def test_bad_input():
    x = torch.randn(4, 64)
    with pytest.raises(TypeError, match="x"):
        q(torch.ones(4, 64, dtype=torch.int64))
    with pytest.raises(TypeError, match="x"):
        q(torch.ones(4, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match="granularity"):
        q(x, "per_row")
    with pytest.raises(ValueError, match="block_size"):
        q(x, "block", 0)
    with pytest.raises(TypeError, match="block_size"):
        q(x, "block", 12.5)
    with pytest.raises(ValueError, match="x"):
        q(torch.tensor(1.0))
    with pytest.raises(ValueError, match="backend"):
        quantize_fp8(x, backend="gpu")
    xq, scale = q(x, "block", 32)
    with pytest.raises(ValueError, match="scale"):
        dequantize_fp8(xq, scale, block_size=16)  # 2 scales per row do not fit 16-wide blocks
    with pytest.raises(ValueError, match="scale"):
        dequantize_fp8(xq, scale[:3], block_size=32)
    with pytest.raises(ValueError, match="scale"):
        dequantize_fp8(xq, scale.reshape(-1), block_size=32)
    with pytest.raises(TypeError, match="scale"):
        dequantize_fp8(xq, scale.double(), block_size=32)
    with pytest.raises(TypeError, match="x_fp8"):
        dequantize_fp8(x, scale, block_size=32)


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra.numpy import arrays  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.float32, (3, 80), elements=st.floats(-(2.0**60), 2.0**60, allow_nan=False, width=32)),
    st.sampled_from(GRANULARITIES),
    st.sampled_from([16, 32, 128]),
)
def test_property_error_bound(a, granularity, block_size):
    x = torch.from_numpy(a.copy())
    xq, scale = q(x, granularity, block_size)
    y = dequantize_fp8(xq, scale, block_size).double()
    ref = torch.from_numpy(reference_scale(x, granularity, block_size))
    if granularity == "block":
        full = ref.repeat_interleave(block_size, -1)[:, :80]
    else:
        full = ref.expand(3, 80)
    # E4M3: 3 mantissa bits (relative step 2^-3, error <= half of it), subnormal step 2^-9
    bound = x.double().abs() * 2.0**-4 + full.double() * 2.0**-10 * 1.0001
    assert ((y - x.double()).abs() <= bound).all()
    assert (xq.float().abs() <= 448).all()
