"""Triton quantizers vs the torch reference: bit-identical bytes and scales.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest) on tiny inputs; the tests
marked gpu repeat the comparison at size on CUDA.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from moeprec.formats.fp8 import quantize_fp8  # noqa: E402
from moeprec.formats.mxfp4 import SCALE_MODES, dequantize_mxfp4, quantize_mxfp4  # noqa: E402

GRANULARITIES = ("per_token", "per_tensor", "per_channel", "block")
interpret = pytest.mark.interpret


@pytest.fixture
def poisoned(monkeypatch):
    """Fill every kernel output with garbage before the kernel runs: unwritten bytes show up."""
    from moeprec.kernels import quantize as kq

    def empty(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        t.view(torch.uint8).fill_(0xA5)  # NaN-free fp32 (0xA5A5A5A5) and a nonzero byte
        return t

    monkeypatch.setattr(kq, "_empty", empty)
    return kq


def special_blocks(device="cpu"):
    """Rows of 32-blocks exercising every branch: zeros, NaN/Inf, subnormals, huge, ties."""
    g = torch.Generator().manual_seed(3)
    rows = []
    base = torch.randn(32, generator=g)
    for k in (-140, -127, -126, -125, -124, -20, 0, 20, 125, 127):
        rows.append(base * 2.0**k)
    rows.append(torch.zeros(32))
    rows.append(-torch.zeros(32))
    nan = base.clone()
    nan[3] = float("nan")
    inf = base.clone()
    inf[9] = float("-inf")
    rows += [nan, inf]
    sub = (torch.arange(1, 33, dtype=torch.float64) * 2.0**-149 * 2**17).float()
    rows.append(torch.where(torch.arange(32) % 2 == 0, sub, -sub))
    fmax = torch.tensor(np.finfo(np.float32).max)
    rows.append(torch.cat([fmax.view(1), -fmax.view(1), base[2:] * 2.0**120]))
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4)
    ties[-1] = 6.0
    rows += [ties, -ties, ties * 7 / 6]
    return torch.stack(rows).to(device)


def amax_bit_patterns():
    """One block per (exponent field, edge mantissa): every binade, all scale-rule boundaries."""
    mants = [0, 1, 2, 0x1FFFFF, 0x200000, 0x3FFFFF, 0x400000, 0x400001, 0x400002, 0x5FFFFF,
             0x600000, 0x600001, 0x7FFFFE, 0x7FFFFF, 0x123457, 0x654321]
    bits = [(f << 23) | m for f in range(255) for m in mants]
    amax = torch.tensor(bits, dtype=torch.int32).view(torch.float32)
    x = amax[:, None] * torch.linspace(-1, 1, 32)  # largest magnitude at both ends
    x[:, 31] = amax
    return x.reshape(-1, 256)  # 8 blocks per row: fewer, wider programs in the interpreter


def assert_same_mx(x, mode, device="cpu"):
    ref = quantize_mxfp4(x, mode, backend="torch")
    got = quantize_mxfp4(x, mode, backend="triton")
    assert got[0].shape == ref[0].shape and got[1].shape == ref[1].shape
    assert torch.equal(got[1].cpu(), ref[1].cpu()), "scales differ"
    assert torch.equal(got[0].cpu(), ref[0].cpu()), "packed elements differ"


def fp8_equal(a, b):
    """Same E4M3 bytes, NaN matched by NaN (its sign bit aside)."""
    a, b = a.cpu(), b.cpu()
    na, nb = a.float().isnan(), b.float().isnan()
    return torch.equal(na, nb) and torch.equal(a.view(torch.uint8)[~na], b.view(torch.uint8)[~nb])


def assert_same_fp8(x, granularity, block_size=128):
    ref = quantize_fp8(x, granularity, block_size, backend="torch")
    got = quantize_fp8(x, granularity, block_size, backend="triton")
    assert got[0].dtype == torch.float8_e4m3fn and got[0].shape == ref[0].shape
    assert got[1].shape == ref[1].shape
    assert torch.equal(got[1].isnan(), ref[1].isnan())
    assert torch.equal(got[1].nan_to_num(), ref[1].nan_to_num()), "scales differ"
    assert fp8_equal(got[0], ref[0]), "fp8 bytes differ"


# ----------------------------------------------------------------------------- MXFP4


@interpret
@pytest.mark.parametrize("mode", SCALE_MODES)
def test_mxfp4_special_blocks(mode, poisoned):
    x = special_blocks()
    assert_same_mx(x, mode)
    assert_same_mx(x[:18].reshape(-1, 96), mode)  # several blocks per row


@interpret
@pytest.mark.parametrize("mode", SCALE_MODES)
def test_mxfp4_scale_rule_in_every_binade(mode, poisoned):
    assert_same_mx(amax_bit_patterns(), mode)


@interpret
@pytest.mark.parametrize("mode", SCALE_MODES)
@pytest.mark.parametrize(
    "shape", [(1, 32), (17, 96), (2, 3, 288), (0, 64), (3, 0), (5, 512 + 64)], ids=lambda s: "x".join(map(str, s))
)
def test_mxfp4_shapes_random(mode, shape, poisoned):
    x = torch.randn(shape) * torch.exp2(torch.randint(-40, 40, (*shape[:-1], 1)).float())
    assert_same_mx(x, mode)


@interpret
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_mxfp4_input_dtypes_and_strides(dtype, poisoned):
    x = (torch.randn(64, 6) * 3).to(dtype).T  # non-contiguous
    assert_same_mx(x, "rceil")
    assert_same_mx(x, "floor")


def _e2m1_edges():
    """fp32 magnitudes at, just above and just below every E2M1 value and midpoint (and past 6),
    signed, laid out so that every 32-block has amax 7.9: floor mode gives e = 0 everywhere."""
    pts = torch.tensor([0.0, 0.5, 1, 1.5, 2, 3, 4, 6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 7, 7.5])
    pts = torch.cat([pts, torch.nextafter(pts, torch.tensor(9.0)), torch.nextafter(pts, torch.tensor(0.0))])
    pts = torch.cat([pts, -pts, pts * 2.0**-30])
    n = pts.numel()
    blocks = -(-n // 31)
    x = torch.zeros(blocks * 31)
    x[:n] = pts
    x = torch.cat([x.reshape(blocks, 31), torch.full((blocks, 1), 7.9)], dim=1)
    return x.reshape(-1, 64) if blocks % 2 == 0 else x


@interpret
@pytest.mark.parametrize("mode", SCALE_MODES)
def test_mxfp4_rounding_at_every_e2m1_edge(mode, poisoned):
    assert_same_mx(_e2m1_edges(), mode)


@interpret
def test_mxfp4_every_bf16_value(poisoned):
    x = _bf16_bits_sweep("cpu")
    for mode in SCALE_MODES:
        assert_same_mx(x, mode)


@interpret
@pytest.mark.parametrize("launch", [dict(mx_blocks=4, mx_warps=2), dict(mx_blocks=1, mx_warps=1)])
def test_mxfp4_other_launch_parameters(launch, poisoned, monkeypatch):
    for key, value in launch.items():
        monkeypatch.setitem(poisoned.LAUNCH, key, value)
    x = torch.randn(7, 160) * torch.exp2(torch.randint(-30, 30, (7, 1)).float())
    assert_same_mx(x, "rceil")
    assert_same_mx(special_blocks(), "floor")


def every_code_and_scale(rows=256, blocks=2):  # rows >= 16
    """Packed bytes holding every (low, high) nibble pair (both orders) next to every scale byte
    0..255 (0: a subnormal 2^-127; 254 with 4 and 6: overflow to inf; 255: NaN)."""
    g = torch.Generator().manual_seed(6)
    pairs = torch.arange(256, dtype=torch.uint8)
    packed = pairs[torch.randint(0, 256, (rows, blocks * 16), generator=g)]
    packed[:16, :16] = pairs.reshape(16, 16)
    scales = torch.arange(rows * blocks).remainder(256).to(torch.uint8).reshape(rows, blocks)
    return packed, scales


def assert_same_dequant(packed, scales, dtype, device="cpu"):
    ref = dequantize_mxfp4(packed.cpu(), scales.cpu(), dtype, backend="torch")
    got = dequantize_mxfp4(packed.to(device), scales.to(device), dtype, backend="triton")
    assert got.dtype == dtype and got.shape == ref.shape
    got = got.cpu()
    assert torch.equal(got.isnan(), ref.isnan()), "NaN blocks differ"
    # bit-identical, -0.0 and subnormals included
    assert torch.equal(got[~ref.isnan()].view(torch.int16 if dtype.itemsize == 2 else torch.int32),
                       ref[~ref.isnan()].view(torch.int16 if dtype.itemsize == 2 else torch.int32))


@interpret
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_mxfp4_dequant_every_code_and_scale(dtype, poisoned):
    packed, scales = every_code_and_scale()
    assert_same_dequant(packed, scales, dtype)


@interpret
@pytest.mark.parametrize("decoder", ["dequant", "fp8_rows"])
@pytest.mark.parametrize("shape", [(1, 32), (3, 5, 96), (0, 64), (7, 0), (130, 64), (11, 608)],
                         ids=lambda s: "x".join(map(str, s)))
def test_mxfp4_decoders_shapes(shape, decoder, poisoned):
    # both decoders against their torch code; (130, 64), (11, 608): rows and blocks off the
    # programs' tiles
    x = torch.randn(shape) * torch.exp2(torch.randint(-20, 20, (*shape[:-1], 1)).float())
    packed, scales = quantize_mxfp4(x, backend="torch")
    if decoder == "dequant":
        assert_same_dequant(packed, scales, torch.bfloat16)
    else:
        assert_same_fp8_rows(packed, scales)
    if x.dim() == 3:  # not contiguous: a slice of experts' weights
        if decoder == "dequant":
            assert_same_dequant(packed[:, 1:4], scales[:, 1:4], torch.float32)
        else:
            assert_same_fp8_rows(packed[:, 1:4], scales[:, 1:4])


@interpret
def test_mxfp4_dequant_other_launch_parameters(poisoned, monkeypatch):
    monkeypatch.setitem(poisoned.LAUNCH, "mx_blocks", 2)
    packed, scales = every_code_and_scale(rows=17, blocks=3)
    assert_same_dequant(packed, scales, torch.bfloat16)


@interpret
def test_mxfp4_dequant_leaves_unkept_experts_untouched(poisoned):
    # the fused MoE's decode-first path passes keep flags (kept-slot counts or its expert mask):
    # flagged-off experts are neither read nor written (their rows keep the poison), the others
    # decode as without the flags
    from moeprec.kernels.quantize import dequantize_mxfp4_triton

    x = torch.randn(4, 6, 96)
    packed, scales = quantize_mxfp4(x, backend="torch")
    keep = torch.tensor([1, 0, 1, 0], dtype=torch.int32)
    out = dequantize_mxfp4_triton(packed, scales, torch.bfloat16, keep)
    ref = dequantize_mxfp4(packed, scales, torch.bfloat16, backend="torch")
    assert torch.equal(out[keep == 1], ref[keep == 1])
    assert (out[keep == 0].view(torch.uint8) == 0xA5).all()


def assert_same_fp8_rows(packed, scales, device="cpu", keep=None):
    from moeprec.formats.mxfp4 import mxfp4_to_fp8_torch
    from moeprec.kernels.quantize import mxfp4_to_fp8_triton

    ref, ref_scale = mxfp4_to_fp8_torch(packed.cpu(), scales.cpu())
    got, got_scale = mxfp4_to_fp8_triton(packed.to(device), scales.to(device),
                                         keep.to(device) if keep is not None else None)
    assert got.dtype == torch.float8_e4m3fn and got.shape == ref.shape
    assert got_scale.dtype == torch.float32 and got_scale.shape == ref_scale.shape
    got, got_scale = got.cpu(), got_scale.cpu()
    rows = slice(None) if keep is None else keep.cpu() != 0
    assert torch.equal(got[rows].view(torch.uint8), ref[rows].view(torch.uint8))  # NaN codes too
    assert torch.equal(got_scale[rows].view(torch.int32), ref_scale[rows].view(torch.int32))
    return got, got_scale


@interpret
def test_mxfp4_to_fp8_rows_every_code_and_scale(poisoned):
    # every scale byte as a row's largest (2^(smax-133) from fp32 subnormals up) and below it,
    # spans past the exact 14 binades, NaN scales
    packed, scales = every_code_and_scale(rows=40, blocks=3)
    assert_same_fp8_rows(packed, scales)
    scales[:, 1] = 255 - scales[:, 1]  # other spans and row maxima
    assert_same_fp8_rows(packed, scales)


@interpret
def test_mxfp4_to_fp8_rows_other_launch_parameters(poisoned, monkeypatch):
    # the row-max pass over several steps of 2 blocks (a partial last one), 4 rows per program;
    # the decode 2 blocks per program: row boundaries inside and between programs
    for key, value in (("fp8_row_blocks", 2), ("fp8_rows", 4), ("mx_blocks", 2)):
        monkeypatch.setitem(poisoned.LAUNCH, key, value)
    packed, scales = every_code_and_scale(rows=17, blocks=3)
    scales[:, 2] = 255 - scales[:, 2]
    assert_same_fp8_rows(packed, scales)


@interpret
def test_mxfp4_to_fp8_rows_leaves_unkept_experts_untouched(poisoned):
    packed, scales = quantize_mxfp4(torch.randn(4, 6, 96), backend="torch")
    keep = torch.tensor([0, 1, 1, 0], dtype=torch.int32)
    got, got_scale = assert_same_fp8_rows(packed, scales, keep=keep)
    assert (got[keep == 0].view(torch.uint8) == 0xA5).all()
    assert (got_scale[keep == 0].view(torch.int32) == int.from_bytes(b"\xa5" * 4, "little", signed=True)).all()


# ----------------------------------------------------------------------------- FP8


@interpret
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("shape", [(1, 64), (9, 200), (2, 3, 130), (0, 64), (4, 1)], ids=str)
def test_fp8_shapes_random(granularity, shape, poisoned):
    x = torch.randn(shape) * torch.exp2(torch.randint(-10, 10, (*shape[:-1], 1)).float())
    assert_same_fp8(x, granularity, block_size=48)
    assert_same_fp8(x, granularity, block_size=64)


@interpret
def test_fp8_other_launch_parameters(poisoned, monkeypatch):
    monkeypatch.setitem(poisoned.LAUNCH, "fp8_tile", 256)
    monkeypatch.setitem(poisoned.LAUNCH, "fp8_warps", 2)
    x = torch.randn(9, 300) * 3
    for g in GRANULARITIES:
        assert_same_fp8(x, g, block_size=64)


@interpret
@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf / inf in the interpreter
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_fp8_specials(granularity, poisoned):
    x = torch.randn(6, 256)
    x[0] = 0
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    x[3] *= 1e-40  # subnormal row: floor scale
    x[4, 0] = 3e38
    x[5, :8] = torch.tensor([1e-45, -1e-45, 1e-39, -0.0, 0.0, 448, -448, 1e-3])
    assert_same_fp8(x, granularity, block_size=128)


@interpret
@pytest.mark.parametrize("granularity", ["per_token", "block"])
def test_fp8_two_pass_groups(granularity, poisoned, monkeypatch):
    monkeypatch.setitem(poisoned.LAUNCH, "fp8_max_group", 32)  # force the looped path
    x = torch.randn(5, 200) * 10
    x[2, 150] = 1e4
    assert_same_fp8(x, granularity, block_size=96)


def _e4m3_edges():
    """fp32 values around every E4M3 value and midpoint in [-448, 448], plus 448 (scale 1)."""
    grid = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    mids = (grid[1:] + grid[:-1]) / 2
    pts = torch.cat([grid, mids, torch.tensor([2.0**-10, 2.0**-11, 3 * 2.0**-11, 1e-30, 1e-40])]).float()
    up = torch.nextafter(pts, torch.tensor(float("inf")))
    down = torch.nextafter(pts, torch.tensor(0.0))
    v = torch.cat([pts, up, down]).clamp(max=448)
    v = torch.cat([v, -v, torch.tensor([448.0])])
    return v.reshape(1, -1)


@interpret
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_fp8_input_dtypes_and_strides(dtype, poisoned):
    x = (torch.randn(160, 6) * 5).to(dtype).T  # non-contiguous
    for g in GRANULARITIES:
        assert_same_fp8(x, g, block_size=64)


@interpret
def test_fp8_cast_rounding_every_e4m3_edge(poisoned):
    # per_tensor with 448 present: scale = 448 / 448 = 1, so the cast sees the values themselves
    x = _e4m3_edges()
    _, scale = quantize_fp8(x, "per_tensor", backend="torch")
    assert scale.item() == 1.0
    assert_same_fp8(x, "per_tensor")
    ref = quantize_fp8(x, "per_tensor", backend="torch")[0]
    expect = x.numpy().astype(pytest.importorskip("ml_dtypes").float8_e4m3fn).view(np.uint8)
    assert np.array_equal(ref.view(torch.uint8).numpy(), expect)


# ----------------------------------------------------------------------------- bad input


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="backend"):
        quantize_mxfp4(torch.randn(2, 32), backend="triton")
    with pytest.raises(ValueError, match="backend"):
        quantize_fp8(torch.randn(2, 32), backend="triton")


# ----------------------------------------------------------------------------- GPU


def _bf16_bits_sweep(device):
    """Every finite bf16 bit pattern, as 32-blocks (65280 values, shuffled)."""
    b = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    b = b[torch.isfinite(b)]
    b = b[torch.randperm(b.numel(), generator=torch.Generator().manual_seed(4))]
    return b[: b.numel() // 32 * 32].reshape(-1, 32 * 8).to(device)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", SCALE_MODES)
def test_gpu_mxfp4_matches_reference(mode, poisoned):
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(5)
    wide = torch.randn(999, 96, device=dev, generator=g)  # subnormal blocks and subnormal scales
    wide = wide * torch.exp2(torch.randint(-170, 120, (999, 3, 1), device=dev, generator=g).float()).repeat_interleave(32, 1)[:, :, 0]
    for x in (
        special_blocks(dev),
        amax_bit_patterns().to(dev),
        _bf16_bits_sweep(dev),
        _e2m1_edges().to(dev),
        wide,
        torch.randn(4096, 7168, device=dev, dtype=torch.bfloat16),
        torch.randn(3, 257, 2880, device=dev) * 1e-3,
    ):
        assert_same_mx(x, mode, dev)
    # the CUDA result equals the CPU reference too
    x = torch.randn(64, 1024, device=dev)
    a = quantize_mxfp4(x, mode, backend="triton")
    b = quantize_mxfp4(x.cpu(), mode, backend="torch")
    assert torch.equal(a[0].cpu(), b[0]) and torch.equal(a[1].cpu(), b[1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_mxfp4_dequant_matches_reference(dtype, poisoned):
    packed, scales = every_code_and_scale(rows=4096, blocks=4)
    assert_same_dequant(packed, scales, dtype, "cuda")
    w = torch.randn(4, 576, 2880, device="cuda", dtype=torch.bfloat16)  # expert weights
    packed, scales = quantize_mxfp4(w)
    assert_same_dequant(packed, scales, dtype, "cuda")
    assert_same_dequant(packed[1:3], scales[1:3], dtype, "cuda")


@pytest.mark.gpu
def test_gpu_mxfp4_to_fp8_rows_matches_reference(poisoned):
    packed, scales = every_code_and_scale(rows=256, blocks=4)
    assert_same_fp8_rows(packed, scales, "cuda")
    w = torch.randn(4, 576, 2880, device="cuda", dtype=torch.bfloat16)  # expert weights
    packed, scales = quantize_mxfp4(w)
    assert_same_fp8_rows(packed, scales, "cuda")
    assert_same_fp8_rows(packed, scales, "cuda", keep=torch.tensor([1, 0, 0, 1], dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_gpu_fp8_matches_reference(granularity):
    from moeprec.kernels.quantize import quantize_fp8_triton

    dev = "cuda"
    xs = [
        torch.randn(4096, 7168, device=dev, dtype=torch.bfloat16),
        torch.randn(33, 20000, device=dev),  # two-pass rows
        _bf16_bits_sweep(dev).float(),
        _e4m3_edges().to(dev),
    ]
    for x in xs:
        assert_same_fp8(x, granularity)
        ref = quantize_fp8(x, granularity, backend="torch")
        for exact in (True, False):  # integer cast and hardware cast agree
            got = quantize_fp8_triton(x, granularity, 128, exact_cast=exact)
            assert fp8_equal(got[0], ref[0])
        cpu = quantize_fp8(x.cpu(), granularity, backend="torch")
        assert fp8_equal(ref[0], cpu[0]) and torch.equal(ref[1].cpu().nan_to_num(), cpu[1].nan_to_num())
