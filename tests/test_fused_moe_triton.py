"""The Triton fused MoE backend against the torch reference (interpreter on CPU, GPU when present).

Tolerances (SPEC 4, AITER-style): at most 5% of elements outside rtol=atol=tol, the similarity
error 1 - 2*sum(xy)/sum(x^2+y^2) at most 1e-2, no NaN. tol = 1e-2 for bf16 activations. With fp8
or fp4 activations a one-ulp difference in the bf16 z (summation order) can move a row's amax and
so its quantization scale, shifting that whole row by up to one quantization step: those paths
use tol = one fp8 step (2^-4) for the per-element check and keep the similarity bound.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from moeprec.fused_moe_op import fused_moe

pytestmark = pytest.mark.interpret

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"


def _kernel_module():
    import moeprec.kernels.fused_moe_triton as m  # imports Triton: only inside tests

    return m


# the Gluon decode blocks' GPU tests (Triton imported only where there is a GPU)
NEEDS_GLUON = pytest.mark.skipif(not (ON_GPU and _kernel_module().gluon_decode_available()),
                                 reason="the Gluon decode blocks need a GPU and their Triton version")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    # intermediates start as NaN: any row read before it was written shows up in the output
    monkeypatch.setattr(_kernel_module(), "_POISON_INTERMEDIATE", True)


def make_case(M, H, I, E, k, quant="none", *, dtype=torch.bfloat16, bias=False, seed=0,  # noqa: E741
              device=DEV):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, H, generator=g).to(dtype)
    w1 = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    logits = torch.randn(M, E, generator=g)
    tw, ti = torch.topk(logits.softmax(-1), k)
    kw = {}
    if bias:
        kw["bias1"] = torch.randn(E, 2 * I, generator=g) * 0.1
        kw["bias2"] = torch.randn(E, H, generator=g) * 0.1
    if quant == "mxfp4":
        from moeprec.formats.mxfp4 import quantize_mxfp4

        w1, s1 = quantize_mxfp4(w1, backend="torch")
        w2, s2 = quantize_mxfp4(w2, backend="torch")
        kw.update(w1_scale=s1, w2_scale=s2)
    elif quant == "fp8":
        from moeprec.formats.fp8 import quantize_fp8

        w1, s1 = quantize_fp8(w1, "per_channel", backend="torch")
        w2, s2 = quantize_fp8(w2, "per_channel", backend="torch")
        kw.update(w1_scale=s1.reshape(E, 2 * I), w2_scale=s2.reshape(E, H))
    else:
        w1, w2 = w1.to(dtype), w2.to(dtype)
    to = lambda t: t.to(device)  # noqa: E731
    return to(x), to(w1), to(w2), to(tw), to(ti), {n: to(t) for n, t in kw.items()}


def assert_close(out, ref, tol=1e-2):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    o, r = out.double(), ref.double()
    assert not torch.isnan(o).any(), "NaN in the Triton output"
    frac = ((o - r).abs() > tol + tol * r.abs()).double().mean().item()
    denom = (o * o + r * r).sum().item()
    sim = 1 - 2 * (o * r).sum().item() / denom if denom > 0 else 0.0
    assert frac <= 0.05, f"{frac:.2%} of elements outside rtol=atol={tol}"
    assert sim <= 1e-2, f"similarity error {sim:.3g}"


def _run_both(x, w1, w2, tw, ti, **kw):
    ref = fused_moe(x, w1, w2, tw, ti, backend="torch", **kw)
    out = fused_moe(x, w1, w2, tw, ti, backend="triton", **kw)
    return out, ref


def _tol(act_dtype):
    return 1e-2 if act_dtype == "bf16" else 2.0**-4


# (quant, act_dtype, activation, gate_mode, bias, M, H, I, E, k)
CASES = [
    ("none", "bf16", "silu", "separated", False, 5, 64, 64, 4, 2),
    ("none", "bf16", "swiglu_oai", "interleaved", True, 7, 80, 48, 5, 2),  # sizes off the tile
    ("none", "bf16", "silu", "separated", False, 1, 64, 48, 4, 3),  # M = 1
    ("mxfp4", "bf16", "swiglu_oai", "interleaved", True, 6, 96, 64, 4, 2),
    ("mxfp4", "bf16", "silu", "separated", False, 1, 64, 96, 3, 2),
    ("mxfp4", "fp8", "silu", "separated", False, 6, 64, 64, 4, 2),
    ("mxfp4", "fp8", "swiglu_oai", "interleaved", True, 5, 128, 64, 4, 2),
    ("fp8", "fp8", "silu", "separated", True, 6, 80, 48, 4, 2),
    ("fp8", "bf16", "silu", "interleaved", False, 4, 64, 64, 4, 2),
    ("none", "fp8", "silu", "separated", False, 6, 64, 64, 4, 2),
    ("mxfp4", "fp4", "silu", "separated", False, 4, 64, 64, 4, 2),
]


@pytest.mark.parametrize("quant,act_dtype,activation,gate_mode,bias,M,H,I,E,k", CASES)
def test_matches_reference(quant, act_dtype, activation, gate_mode, bias, M, H, I, E, k):  # noqa: E741
    x, w1, w2, tw, ti, kw = make_case(M, H, I, E, k, quant, bias=bias)
    out, ref = _run_both(x, w1, w2, tw, ti, quant=quant, act_dtype=act_dtype,
                         activation=activation, gate_mode=gate_mode, **kw)
    assert_close(out, ref, _tol(act_dtype))


def test_expert_mask_masked_ids_and_router_weight_on_input():
    M, H, I, E, k = 6, 64, 48, 6, 3  # noqa: E741
    x, w1, w2, tw, ti, kw = make_case(M, H, I, E, k, bias=True, seed=1)
    ti = ti.clone()
    ti[0, 0] = E + 3  # out of range: treated as masked when the check is off
    ti[2, 1] = -1
    assert ti.dtype == torch.int64
    ti[4, 0] = 2**32 + 1  # would alias expert 1 if truncated to int32 before the range check
    mask = torch.ones(E, dtype=torch.bool, device=ti.device)
    mask[ti[1, 0]] = False
    out, ref = _run_both(x, w1, w2, tw, ti, expert_mask=mask, check_topk_ids=False,
                         apply_router_weight_on_input=True, **kw)
    assert_close(out, ref)
    # a token whose every slot is masked gets zeros
    ti_all = ti.clone()
    ti_all[3] = ti[1, 0]
    out = fused_moe(x, w1, w2, tw, ti_all, expert_mask=mask, check_topk_ids=False,
                    backend="triton", **kw)
    assert torch.equal(out[3], torch.zeros_like(out[3]))


def test_experts_without_tokens_and_fp16():
    M, H, I, E, k = 3, 64, 64, 8, 1  # noqa: E741
    x, w1, w2, tw, ti, kw = make_case(M, H, I, E, k, dtype=torch.float16, seed=2)
    out, ref = _run_both(x, w1, w2, tw, ti, **kw)
    assert_close(out, ref)


def test_multi_program_align_path_and_store_reduction(monkeypatch):
    # batches past the single-program align kernel take the three-launch one; the non-atomic
    # combine writes [M*k, H] rows and sums them
    m = _kernel_module()
    monkeypatch.setattr(m, "_ALIGN_ONE_PROGRAM_MAX_SLOTS", 0)
    M, H, I, E, k = 5, 64, 48, 4, 2  # noqa: E741
    x, w1, w2, tw, ti, kw = make_case(M, H, I, E, k, seed=3)
    ref = fused_moe(x, w1, w2, tw, ti, backend="torch")
    from moeprec.kernels.tuning import default_config, fix_config

    cfg = fix_config(default_config("bf16", M, E, H, I, k), "bf16")
    for atomic in (True, False):
        cfg["atomic"] = atomic
        out = m.fused_moe_triton_impl(x, w1, w2, tw, ti, config=cfg)
        assert_close(out, ref)


@pytest.mark.parametrize("dtype,H", [(torch.bfloat16, 80), (torch.float16, 80),
                                     (torch.bfloat16, 1100)])
def test_store_combine_skips_masked_slots(dtype, H):
    # stage 2 without atomics: one fp32 row per kept slot (poisoned NaN before the run), then a
    # per-token sum that must skip masked, out-of-range and negative ids; k = 3 pads to 4 slots
    # in the sum, H = 80 is not a power of two, H = 1100 spans two column programs of the sum;
    # a token with every slot masked gets zeros
    m = _kernel_module()
    from moeprec.kernels.tuning import default_config, fix_config

    M, I, E, k = 6, 48, 6, 3  # noqa: E741
    x, w1, w2, tw, ti, kw = make_case(M, H, I, E, k, dtype=dtype, bias=True, seed=11)
    ti = ti.clone()
    ti[0, 0], ti[2, 1] = E + 3, -1
    mask = torch.ones(E, dtype=torch.bool, device=ti.device)
    mask[ti[1, 0]] = False
    ti[3] = ti[1, 0]
    args = dict(expert_mask=mask, **kw)
    ref = fused_moe(x, w1, w2, tw, ti, backend="torch", check_topk_ids=False, **args)
    cfg = dict(fix_config(default_config("bf16", M, E, H, I, k), "bf16"), atomic=False)
    out = m.fused_moe_triton_impl(x, w1, w2, tw, ti, config=cfg, **args)
    assert out.dtype == dtype
    assert_close(out, ref)
    assert torch.equal(out[3], torch.zeros_like(out[3]))
    empty = m.fused_moe_triton_impl(x[:0], w1, w2, tw[:0], ti[:0], config=cfg, **args)
    assert empty.shape == (0, H) and empty.dtype == dtype


def test_slot_rows_fall_back_to_atomics_past_their_memory_bound(monkeypatch):
    # "atomic": false holds M * k * H fp32 rows; past SLOT_ROWS_MAX_BYTES the call uses atomics
    m = _kernel_module()
    from moeprec.kernels.tuning import default_config, fix_config

    M, H, I, E, k = 5, 64, 48, 4, 2  # noqa: E741
    x, w1, w2, tw, ti, kw = make_case(M, H, I, E, k, seed=12)
    ref = fused_moe(x, w1, w2, tw, ti, backend="torch")
    cfg = dict(fix_config(default_config("bf16", M, E, H, I, k), "bf16"), atomic=False)
    sums = []
    real = m._sum_slot_rows
    monkeypatch.setattr(m, "_sum_slot_rows", lambda *a: sums.append(1) or real(*a))
    for bound, used in ((M * k * H * 4, 1), (M * k * H * 4 - 1, 0)):
        sums.clear()
        monkeypatch.setattr(m, "SLOT_ROWS_MAX_BYTES", bound)
        assert_close(m.fused_moe_triton_impl(x, w1, w2, tw, ti, config=cfg), ref)
        assert len(sums) == used


@pytest.mark.parametrize("one_program", [True, False])
@pytest.mark.parametrize("M,k,E,bm", [(9, 3, 6, 4), (8, 4, 130, 16), (50, 3, 6, 16),
                                       (70, 4, 40, 16), (70, 4, 130, 16)])
def test_align_blocks_layout(one_program, M, k, E, bm, monkeypatch):
    # both align paths; 27 and 32 slots are one tile of the one-program path (ids loaded once),
    # 150 and 280 slots span several chunks of both paths (three-launch: 64 slots a chunk up
    # to 64 experts, 128 past that), and its scan takes two chunks a step so that it loops
    m = _kernel_module()
    monkeypatch.setattr(m, "_ALIGN_ONE_PROGRAM_MAX_SLOTS", 1 << 30 if one_program else 0)
    monkeypatch.setattr(m, "_ALIGN_SCAN_ROWS", 2)
    g = torch.Generator().manual_seed(4 + M)
    ti = torch.randint(0, E, (M, k), generator=g).to(DEV)
    ti[0, 1] = E  # out of range
    ti[1, 0] = -1
    ti[2:4] = 1  # a crowded expert: several blocks
    mask = torch.ones(E, dtype=torch.bool, device=ti.device)
    mask[2] = False
    sorted_ids, expert_ids, routed = m._align(ti, E, bm, mask)
    # the two paths give the same layout (ascending flat ids within an expert)
    monkeypatch.setattr(m, "_ALIGN_ONE_PROGRAM_MAX_SLOTS", 0 if one_program else 1 << 30)
    other = m.align_blocks(ti, E, bm, mask)
    used = int((expert_ids >= 0).sum())  # rows of unused blocks are never written nor read
    if not one_program:  # kept slots per expert, the decode-first keep flags
        kept = torch.bincount(ti[(ti >= 0) & (ti < E)].cpu().long(), minlength=E)
        kept[~mask.cpu()] = 0
        assert torch.equal(routed[:E].cpu().long(), kept)
    assert torch.equal(other[1], expert_ids)
    assert torch.equal(other[0][: used * bm], sorted_ids[: used * bm])
    flat = ti.reshape(-1).cpu()
    S = flat.numel()
    sorted_ids, expert_ids = sorted_ids.cpu(), expert_ids.cpu()
    seen = []
    used = int((expert_ids >= 0).sum())
    assert (expert_ids[:used] >= 0).all() and (expert_ids[used:] == -1).all()
    assert (expert_ids[:used].diff() >= 0).all()  # ascending experts
    for b in range(used):
        ids = sorted_ids[b * bm : (b + 1) * bm]
        real = ids[ids < S]
        assert len(real) > 0 or b == 0
        assert (flat[real.long()] == expert_ids[b]).all()
        assert (real.diff() > 0).all()
        assert (ids[ids >= S] == S).all()
        seen += real.tolist()
    keep = [i for i in range(S) if 0 <= flat[i] < E and mask[flat[i]]]
    assert sorted(seen) == keep and len(seen) == len(set(seen))


def test_torch_compile_traces_custom_op():
    M, H, I, E, k = 4, 64, 64, 4, 2  # noqa: E741
    x, w1, w2, tw, ti, kw = make_case(M, H, I, E, k, seed=5)

    def f(x, w1, w2, tw, ti):
        return fused_moe(x, w1, w2, tw, ti, backend="triton", check_topk_ids=False) * 2

    backend = "inductor" if ON_GPU else "aot_eager"
    out = torch.compile(f, fullgraph=True, backend=backend)(x, w1, w2, tw, ti)
    ref = fused_moe(x, w1, w2, tw, ti, backend="torch") * 2
    assert_close(out, ref)


# ------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("quant,act_dtype", [("none", "bf16"), ("mxfp4", "bf16"),
                                             ("mxfp4", "fp8"), ("fp8", "fp8")])
@pytest.mark.parametrize("M", [1, 16, 300, 2000])
def test_gpu_matches_reference_model_shapes(quant, act_dtype, M):
    H, I, E, k = 512, 256, 16, 4  # noqa: E741
    x, w1, w2, tw, ti, kw = make_case(M, H, I, E, k, quant, seed=M)
    for activation, gate_mode in (("silu", "separated"), ("swiglu_oai", "interleaved")):
        out, ref = _run_both(x, w1, w2, tw, ti, quant=quant, act_dtype=act_dtype,
                             activation=activation, gate_mode=gate_mode, **kw)
        assert_close(out, ref, _tol(act_dtype))


@pytest.mark.gpu
def test_gpu_cuda_graph_decode():
    M, H, I, E, k = 16, 256, 128, 8, 2  # noqa: E741
    x, w1, w2, tw, ti, kw = make_case(M, H, I, E, k, seed=6)
    f = lambda: fused_moe(x, w1, w2, tw, ti, backend="triton", check_topk_ids=False)  # noqa: E731
    f()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = f()
    new_x, _, _, new_tw, new_ti, _ = make_case(M, H, I, E, k, seed=7)
    x.copy_(new_x), tw.copy_(new_tw), ti.copy_(new_ti)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, fused_moe(x, w1, w2, tw, ti, backend="torch"))


@pytest.mark.parametrize("fuse_quant", [True, False])
def test_fp8_quantization_placement(fuse_quant):
    # z quantized inside stage 2 (row amax gathered by stage 1) or by a row kernel in between
    m = _kernel_module()
    M, H, I, E, k = 5, 64, 48, 4, 2  # noqa: E741
    x, w1, w2, tw, ti, kw = make_case(M, H, I, E, k, "fp8", seed=8)
    ref = fused_moe(x, w1, w2, tw, ti, backend="torch", quant="fp8", act_dtype="fp8", **kw)
    from moeprec.kernels.tuning import default_config, fix_config

    cfg = fix_config(default_config("fp8", M, E, H, I, k), "fp8")
    cfg["fuse_quant"] = fuse_quant
    out = m.fused_moe_triton_impl(x, w1, w2, tw, ti, quant="fp8", act_dtype="fp8", config=cfg, **kw)
    assert_close(out, ref, _tol("fp8"))


# (quant, stage-2 K splits, BLOCK_K): BLOCK_M = 1 runs the CUDA-core product
GEMV_CASES = [("mxfp4", 1, 64), ("mxfp4", 3, 32), ("none", 2, 64), ("fp8", 1, 128)]


@pytest.mark.parametrize("quant,split_k,block_k", GEMV_CASES)
def test_gemv_product_matches_reference(quant, split_k, block_k):
    # sizes off every tile (H = 80 for plain weights; MXFP4 needs multiples of 32), biases, one
    # expert without tokens, one masked expert; split_k > K steps leaves some splits empty
    m = _kernel_module()
    from moeprec.kernels.tuning import fix_config

    M, I, E, k = 7, 96, 5, 2  # noqa: E741
    H = 80 if quant == "none" else 96
    x, w1, w2, tw, ti, kw = make_case(M, H, I, E, k, quant, bias=True, seed=11 + split_k)
    ti = torch.where(ti == 4, 3, ti)  # expert 4 gets no token
    mask = torch.ones(E, dtype=torch.bool, device=x.device)
    mask[1] = False
    args = dict(quant=quant, act_dtype="bf16", activation="swiglu_oai", gate_mode="interleaved",
                expert_mask=mask, **kw)
    ref = fused_moe(x, w1, w2, tw, ti, backend="torch", **args)
    st = {"BLOCK_N": 16, "BLOCK_K": block_k, "num_warps": 4, "num_stages": 2}
    path = {"none": "bf16", "mxfp4": "w4a16", "fp8": "w8a16"}[quant]
    cfg = fix_config({"BLOCK_M": 1, "s1": dict(st), "s2": dict(st, split_k=split_k)}, path)
    assert cfg["s2"]["split_k"] == split_k
    assert cfg["pair_blocks"]  # blocks of one flat slot each, no alignment launch
    out = m.fused_moe_triton_impl(x, w1, w2, tw, ti, config=cfg, **args)
    assert_close(out, ref)
    # the aligned blocks: the same products (the atomic adds of stage 2 come in another order:
    # equal up to that)
    aligned = m.fused_moe_triton_impl(x, w1, w2, tw, ti, config=dict(cfg, pair_blocks=False), **args)
    torch.testing.assert_close(aligned, out, rtol=1e-2, atol=1e-2)
    assert_close(aligned, ref)


@pytest.mark.parametrize("dot_scaled", [False, True])
@pytest.mark.parametrize("block_m,block_k", [(16, 128), (64, 64), (128, 64)])
def test_mxfp4_tiles_both_decodes(block_m, block_k, dot_scaled):
    # bf16 models: the explicit bf16-pair decode by default (its values are checked bit for bit
    # in test_mxfp4_tile_decode.py), tl.dot_scaled when a stage config asks (the GPU only: the
    # interpreter always decodes explicitly); K and N tails under the tiles (H = 96,
    # I = 160), an expert without tokens
    m = _kernel_module()
    from moeprec.kernels.tuning import fix_config

    M, H, I, E, k = 37, 96, 160, 5, 2  # noqa: E741
    x, w1, w2, tw, ti, kw = make_case(M, H, I, E, k, "mxfp4", bias=True, seed=61)
    ti = torch.where(ti == 3, 4, ti)
    args = dict(quant="mxfp4", activation="swiglu_oai", gate_mode="interleaved", **kw)
    ref = fused_moe(x, w1, w2, tw, ti, backend="torch", **args)
    st = {"BLOCK_N": 32, "BLOCK_K": block_k, "num_warps": 4, "num_stages": 2}
    if dot_scaled:
        st["dot_scaled"] = True
    cfg = fix_config({"BLOCK_M": block_m, "s1": dict(st), "s2": dict(st)}, "w4a16")
    assert not cfg["dequant"]
    assert_close(m.fused_moe_triton_impl(x, w1, w2, tw, ti, config=cfg, **args), ref)


@pytest.mark.parametrize("quant,act_dtype", [("none", "bf16"), ("mxfp4", "bf16"), ("mxfp4", "fp8"),
                                             ("fp8", "fp8")])
def test_tiles_with_k_a_multiple_of_block_k(quant, act_dtype):
    # K % BLOCK_K == 0 in both stages: the tensor-core loop runs without K masks (EVEN_K), the
    # output columns still end off the tile (stage 1: I = 192 under BLOCK_N = 128), an expert
    # without tokens
    m = _kernel_module()
    from moeprec.kernels.tuning import fix_config, path_name

    M, H, I, E, k = 9, 128, 192, 3, 2  # noqa: E741
    x, w1, w2, tw, ti, kw = make_case(M, H, I, E, k, quant, bias=True, seed=71)
    ti = torch.where(ti == 1, 0, ti)
    args = dict(quant=quant, act_dtype=act_dtype, **kw)
    ref = fused_moe(x, w1, w2, tw, ti, backend="torch", **args)
    st = {"num_warps": 4, "num_stages": 2}
    cfg = {"BLOCK_M": 16, "s1": dict(st, BLOCK_N=128, BLOCK_K=64),
           "s2": dict(st, BLOCK_N=64, BLOCK_K=64)}
    path = path_name(quant, act_dtype)
    cfg = fix_config(cfg, path)
    assert H % cfg["s1"]["BLOCK_K"] == 0 and I % cfg["s2"]["BLOCK_K"] == 0
    assert I % cfg["s1"]["BLOCK_N"] != 0
    assert_close(m.fused_moe_triton_impl(x, w1, w2, tw, ti, config=cfg, **args), ref,
                 _tol(act_dtype))


@pytest.mark.parametrize("act_dtype,block_m,dequant", [("bf16", 1, False), ("bf16", 16, False),
                                                     ("bf16", 16, True), ("fp8", 16, False),
                                                     ("fp8", 16, True)])
def test_mxfp4_smallest_scale_byte_is_not_flushed(act_dtype, block_m, dequant):
    # E8M0 byte 0 is 2^-127 (an fp32 subnormal), not zero: with every w2 block at that scale
    # the output is ~1e-37, and each decode (CUDA-core blocks, tiles, decoded first, fp8
    # activations) must give the reference's values, compared here scaled by 2^127 (outputs
    # below 2^-126 are bf16 subnormals, one ulp 2^-133: summation order moves them by 2^-6
    # scaled, so tol is one fp8 step; a flushed block is off by the whole value). fp8 runs the
    # explicit decode: tl.dot_scaled (its GPU default) reads byte 0 as zero on the H200 with
    # Triton 3.6 (docs/kernels.md), a loss below 6 * 2^-127 per weight, left to the compiler
    m = _kernel_module()
    from moeprec.kernels.tuning import fix_config, path_name

    M, H, I, E, k = 5, 64, 64, 4, 2  # noqa: E741
    x, w1, w2, tw, ti, kw = make_case(M, H, I, E, k, "mxfp4", seed=81)
    kw["w2_scale"] = torch.zeros_like(kw["w2_scale"])
    args = dict(quant="mxfp4", act_dtype=act_dtype, **kw)
    ref = fused_moe(x, w1, w2, tw, ti, backend="torch", **args)
    assert 0 < ref.float().abs().max() < 1e-35
    st = {"BLOCK_N": 16 if block_m == 1 else 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2,
          "dot_scaled": False}
    cfg = fix_config({"BLOCK_M": block_m, "dequant": dequant, "s1": dict(st), "s2": dict(st)},
                     path_name("mxfp4", act_dtype))
    assert cfg["dequant"] == dequant
    out = m.fused_moe_triton_impl(x, w1, w2, tw, ti, config=cfg, **args)
    assert_close(out.float() * 2.0**127, ref.float() * 2.0**127, 2.0**-4)


@pytest.mark.parametrize("quant,act_dtype,split_k", [("none", "bf16", 2), ("mxfp4", "bf16", 3),
                                                   ("mxfp4", "fp8", 2), ("fp8", "fp8", 5)])
def test_tiles_split_k_in_stage_2(quant, act_dtype, split_k):
    # tensor-core stage 2 split along K into programs that add into the fp32 output: K = I = 160
    # is 5 steps of 32 (fp8: 32) or 3 of 64 (MXFP4, the last one partly past K), so splits get
    # 1-2 steps or none (split_k = 5 over 5 steps; 3 over 3); bias added once, an expert without
    # tokens, a masked expert
    m = _kernel_module()
    from moeprec.kernels.tuning import fix_config, path_name

    M, H, I, E, k = 11, 64, 160, 5, 2  # noqa: E741
    x, w1, w2, tw, ti, kw = make_case(M, H, I, E, k, quant, bias=True, seed=91 + split_k)
    ti = torch.where(ti == 2, 0, ti)
    mask = torch.ones(E, dtype=torch.bool, device=x.device)
    mask[3] = False
    args = dict(quant=quant, act_dtype=act_dtype, expert_mask=mask, **kw)
    ref = fused_moe(x, w1, w2, tw, ti, backend="torch", **args)
    st = {"BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
    path = path_name(quant, act_dtype)
    cfg = fix_config({"BLOCK_M": 16, "s1": dict(st), "s2": dict(st, split_k=split_k)}, path)
    assert cfg["s2"]["split_k"] == split_k and cfg["s1"]["split_k"] == 1
    out = m.fused_moe_triton_impl(x, w1, w2, tw, ti, config=cfg, **args)
    assert_close(out, ref, _tol(act_dtype))
    # the same sums as the unsplit kernel, up to the order of the fp32 additions
    one = m.fused_moe_triton_impl(x, w1, w2, tw, ti, config=fix_config(
        dict(cfg, s2=dict(cfg["s2"], split_k=1)), path), **args)
    torch.testing.assert_close(out, one, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("masked", [False, True])
def test_pair_blocks_check_ids_in_the_kernel(masked):
    # "pair_blocks": no alignment; int64 ids past E (2**32 + 1 must not alias expert 1), negative
    # ids and masked experts are skipped by the GEMM kernels themselves; stored (non-atomic)
    # combine too, where skipped rows must stay zero
    m = _kernel_module()
    from moeprec.kernels.tuning import fix_config

    M, H, I, E, k = 5, 64, 64, 4, 3  # noqa: E741
    x, w1, w2, tw, ti, kw = make_case(M, H, I, E, k, "mxfp4", seed=51)
    ti = ti.to(torch.int64)
    ti[0, 0], ti[1, 1], ti[2, 2] = 2**32 + 1, -1, E
    mask = None
    if masked:
        mask = torch.ones(E, dtype=torch.bool, device=x.device)
        mask[int(ti[3, 0])] = False
    args = dict(quant="mxfp4", expert_mask=mask, **kw)
    ref = fused_moe(x, w1, w2, tw, ti, backend="torch", check_topk_ids=False, **args)
    st = {"BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}
    for atomic in (True, False):
        cfg = fix_config({"BLOCK_M": 1, "atomic": atomic, "pair_blocks": True, "s1": dict(st),
                          "s2": dict(st)}, "w4a16")
        assert cfg["pair_blocks"]
        out = m.fused_moe_triton_impl(x, w1, w2, tw, ti, config=cfg, **args)
        assert_close(out, ref)


@pytest.mark.parametrize("block_m", [1, 16])
def test_unaligned_mxfp4_weights_are_realigned(block_m):
    # a packed tensor starting off a 4-byte boundary (a view into a larger buffer): the
    # CUDA-core blocks read int32 words, and on the H200 the tensor-core path gave wrong numbers
    # for such a tensor; the op copies it to aligned storage (and says so) on both paths
    m = _kernel_module()
    from moeprec.kernels.tuning import fix_config

    M, H, I, E, k = 3, 64, 64, 4, 2  # noqa: E741
    x, w1, w2, tw, ti, kw = make_case(M, H, I, E, k, "mxfp4", seed=21)
    buf = torch.empty(w1.numel() + 1, dtype=torch.uint8, device=w1.device)
    w1_odd = buf[1:].view(w1.shape)
    w1_odd.copy_(w1)
    assert not m._packed_aligned(w1_odd) and m._packed_aligned(w2)
    ref = fused_moe(x, w1, w2, tw, ti, backend="torch", quant="mxfp4", **kw)
    st = {"BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}
    cfg = fix_config({"BLOCK_M": block_m, "s1": dict(st), "s2": dict(st)}, "w4a16")
    with pytest.warns(UserWarning, match="w1 is not stored"):
        out = m.fused_moe_triton_impl(x, w1_odd, w2, tw, ti, quant="mxfp4", config=cfg, **kw)
    assert_close(out, ref)


@pytest.mark.parametrize("act_dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("one_program_align", [True, False])
@pytest.mark.parametrize("workspace_experts", [1, 2, 5])
@pytest.mark.parametrize("atomic", [True, False])
def test_mxfp4_weights_decoded_before_the_gemms(workspace_experts, atomic, one_program_align,
                                                act_dtype, monkeypatch):
    # "dequant": MXFP4 weights decoded a chunk of experts at a time (to bf16, or to fp8 with a
    # power of two per row for fp8 activations), then the plain kernels; sizes off the tile,
    # biases, an expert without tokens, a masked expert
    m = _kernel_module()
    if not one_program_align:  # the three-launch alignment, which counts slots per expert
        monkeypatch.setattr(m, "_ALIGN_ONE_PROGRAM_MAX_SLOTS", 0)
    from moeprec.kernels import quantize as kq
    from moeprec.kernels.tuning import fix_config, path_name

    M, H, I, E, k = 9, 96, 160, 5, 2  # noqa: E741 (I = 160: 5 tiles of 32, K of stage 2 too)
    x, w1, w2, tw, ti, kw = make_case(M, H, I, E, k, "mxfp4", bias=True, seed=31)
    ti = torch.where(ti == 2, 0, ti)  # expert 2 gets no token
    mask = torch.ones(E, dtype=torch.bool, device=x.device)
    mask[3] = False
    args = dict(quant="mxfp4", act_dtype=act_dtype, activation="swiglu_oai",
                gate_mode="interleaved", expert_mask=mask, **kw)
    ref = fused_moe(x, w1, w2, tw, ti, backend="torch", **args)
    st = {"BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
    cfg = fix_config({"BLOCK_M": 16, "atomic": atomic, "dequant": True, "s1": dict(st),
                      "s2": dict(st)}, path_name("mxfp4", act_dtype))
    assert cfg["dequant"] and cfg["s1"]["BLOCK_K"] == 32  # plain tiles: no MXFP4 minimum
    # a workspace of `workspace_experts` experts' decoded stage-1 weights; count what gets decoded
    weight_bytes = 1 if act_dtype == "fp8" else 2
    workspace = workspace_experts * 2 * I * H * weight_bytes
    monkeypatch.setattr(m, "DEQUANT_WORKSPACE_BYTES", workspace)
    decoded = []  # (experts decoded, workspace bytes) per call
    name = "mxfp4_to_fp8_triton" if act_dtype == "fp8" else "dequantize_mxfp4_triton"
    real = getattr(kq, name)

    def spy(packed, scales, *rest):
        keep = rest[-1] if rest else None
        kept = packed.shape[0] if keep is None else int((keep != 0).sum())
        decoded.append((kept, packed.numel() * 2 * weight_bytes))
        return real(packed, scales, *rest)

    monkeypatch.setattr(kq, name, spy)
    # decoded weights (and row scales) start as NaN: the skipped experts' stay so, and no block
    # may read them
    monkeypatch.setattr(kq, "_empty", lambda shape, dtype, device: torch.full(
        shape, 0x7F if dtype == torch.uint8 else float("nan"), dtype=dtype, device=device))
    out = m.fused_moe_triton_impl(x, w1, w2, tw, ti, config=cfg, **args)
    assert_close(out, ref, _tol(act_dtype))
    # each stage decodes once, in chunks within the workspace, every unmasked expert; with the
    # slot counts of the three-launch alignment, only those that got a token
    skipped = 1 if one_program_align else 2
    assert sum(e for e, _ in decoded) == 2 * (E - skipped)
    assert all(b <= workspace for _, b in decoded)
    assert len(decoded) == 2 if workspace_experts >= E else len(decoded) > 2
    # the same values as the MXFP4 tiles' in-kernel decode: equal up to summation order (and
    # fp8 rounding of z, whose per-token scale may differ by that order)
    tiles = m.fused_moe_triton_impl(x, w1, w2, tw, ti, config=dict(cfg, dequant=False), **args)
    if act_dtype == "bf16":
        torch.testing.assert_close(out, tiles, rtol=1e-2, atol=1e-2)
    else:
        assert_close(out, tiles, _tol(act_dtype))


def test_dequant_config_rules():
    from moeprec.kernels.tuning import fix_config

    st = {"BLOCK_N": 64, "BLOCK_K": 32}
    cfg = {"BLOCK_M": 64, "dequant": True, "s1": dict(st), "s2": dict(st)}
    assert fix_config(cfg, "w4a16")["dequant"] and fix_config(cfg, "w4a8")["dequant"]
    for path in ("bf16", "fp8", "w8a16"):  # MXFP4 weights only
        assert not fix_config(cfg, path)["dequant"]
    assert not fix_config(dict(cfg, BLOCK_M=1), "w4a16")["dequant"]  # decode blocks read MXFP4
    assert not fix_config(dict(cfg, dequant=False), "w4a16")["dequant"]
    assert fix_config(dict(cfg, dequant=False), "w4a16")["s1"]["BLOCK_K"] == 64


def test_mxfp4_tiles_pick_their_decode():
    from moeprec.kernels.fused_moe_triton import use_dot_scaled

    bf16, fp16, fp8 = torch.bfloat16, torch.float16, torch.float8_e4m3fn
    assert not use_dot_scaled(bf16, False, {}, False)  # bf16: the explicit bf16-pair decode
    assert use_dot_scaled(fp16, False, {}, False)
    assert use_dot_scaled(fp8, True, {}, False)
    assert use_dot_scaled(bf16, True, {}, False)  # stage 2 quantizing bf16 rows to fp8
    assert use_dot_scaled(bf16, False, {"dot_scaled": True}, False)
    assert not use_dot_scaled(fp16, False, {"dot_scaled": False}, False)
    assert not use_dot_scaled(bf16, False, {"dot_scaled": True}, True)  # the interpreter
    assert not use_dot_scaled(torch.float32, False, {"dot_scaled": True}, False)  # fp32 models


def test_explicit_mxfp4_decode_counts_its_decoded_tile_in_shared_memory():
    # stage 1, BLOCK_M 128, 2 x 128 weight rows, BLOCK_K 128: 3 stages of A + packed weights
    # (144 KiB) fit, but not with the decoded bf16 tile (64 KiB more) on top
    from moeprec.kernels.tuning import fix_config

    st = {"BLOCK_N": 128, "BLOCK_K": 128, "num_stages": 3}
    cfg = {"BLOCK_M": 128, "s1": dict(st), "s2": dict(st)}
    assert fix_config(cfg, "w4a16")["s1"]["num_stages"] == 2
    assert fix_config(cfg, "w4a8")["s1"]["num_stages"] == 3  # fp8 activations: tl.dot_scaled


@pytest.mark.parametrize("act_dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dequant_with_fp16_and_fp32_models(dtype, act_dtype, monkeypatch):
    # 16-bit activations: fp16 weights are decoded to fp16 (rounded once, as the tiles'
    # decode); fp32 models keep the MXFP4 tiles (their explicit fp32 decode), whatever the
    # config says. fp8 activations decode to fp8 rows for either model dtype.
    m = _kernel_module()
    from moeprec.kernels import quantize as kq
    from moeprec.kernels.tuning import fix_config, path_name

    M, H, I, E, k = 6, 64, 96, 3, 2  # noqa: E741
    x, w1, w2, tw, ti, kw = make_case(M, H, I, E, k, "mxfp4", dtype=dtype, seed=41)
    args = dict(quant="mxfp4", act_dtype=act_dtype, **kw)
    ref = fused_moe(x, w1, w2, tw, ti, backend="torch", **args)
    st = {"BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}
    cfg = fix_config({"BLOCK_M": 16, "dequant": True, "s1": dict(st), "s2": dict(st)},
                     path_name("mxfp4", act_dtype))
    decoded = []
    for name in ("dequantize_mxfp4_triton", "mxfp4_to_fp8_triton"):
        real = getattr(kq, name)
        monkeypatch.setattr(kq, name, lambda *a, _r=real, _n=name: decoded.append(_n) or _r(*a))
    out = m.fused_moe_triton_impl(x, w1, w2, tw, ti, config=cfg, **args)
    assert out.dtype == dtype
    assert_close(out, ref, _tol(act_dtype))
    want = ("mxfp4_to_fp8_triton" if act_dtype == "fp8" else
            None if dtype == torch.float32 else "dequantize_mxfp4_triton")
    assert decoded == ([want] * 2 if want else [])


def test_decode_defaults_take_the_cuda_core_blocks_for_mxfp4_only():
    from moeprec.kernels.tuning import default_config

    assert default_config("w4a16", 1, 128, 2048, 768, 8)["BLOCK_M"] == 1
    assert default_config("w4a16", 64, 8, 4096, 14336, 2)["BLOCK_M"] > 1  # 16 tokens per expert
    assert default_config("bf16", 1, 128, 2048, 768, 8)["BLOCK_M"] == 16


def test_default_combine_stores_slot_rows_for_large_k_batches_only():
    from moeprec.kernels.tuning import default_config

    # (M, E, k) -> atomics? Qwen3 (k = 8) from 256 tokens per expert, gpt-oss (k = 4) from 128
    for M, E, k, atomic in ((1024, 128, 8, True), (4096, 128, 8, False), (16384, 256, 8, False),
                            (512, 32, 4, True), (1024, 32, 4, False), (16384, 8, 2, True)):
        assert default_config("bf16", M, E, 2048, 768, k)["atomic"] == atomic, (M, E, k)


def test_gemv_config_rules():
    from moeprec.kernels.tuning import fix_config

    st = {"BLOCK_N": 32, "BLOCK_K": 96, "split_k": 4}
    one = fix_config({"BLOCK_M": 1, "s1": dict(st), "s2": dict(st)}, "w4a16")
    # K steps are whole 32-blocks, a power of two of them; K splits only in stage 2
    assert one["s1"]["BLOCK_K"] == 128 and one["s1"]["split_k"] == 1 and one["s2"]["split_k"] == 4
    # fp8 activations run on the tensor cores only (whose stage 2 splits K too); K splits need
    # the atomic combine
    fp8 = fix_config({"BLOCK_M": 1, "s1": dict(st), "s2": dict(st)}, "w4a8")
    assert fp8["BLOCK_M"] == 16 and fp8["s1"]["split_k"] == 1 and fp8["s2"]["split_k"] == 4
    stored = fix_config({"BLOCK_M": 1, "atomic": False, "s1": dict(st), "s2": dict(st)}, "bf16")
    assert stored["s2"]["split_k"] == 1
    # pair blocks: decode blocks only, on unless the entry says otherwise
    assert one["pair_blocks"] and not fp8["pair_blocks"]
    assert not fix_config({"BLOCK_M": 1, "pair_blocks": False, "s1": dict(st), "s2": dict(st)}, "w4a16")["pair_blocks"]
    assert not fix_config({"BLOCK_M": 16, "pair_blocks": True, "s1": dict(st), "s2": dict(st)}, "w4a16")["pair_blocks"]
    assert not fix_config({"BLOCK_M": 1, "pair_blocks": True, "s1": dict(st), "s2": dict(st)}, "w4a8")["pair_blocks"]
    # the tensor-core decode blocks: on unless a config says false, MXFP4 with 16-bit
    # activations, one-pair blocks only
    assert one["s1"]["mma"] and one["s2"]["mma"]
    off = dict(st, mma=False)
    assert not fix_config({"BLOCK_M": 1, "s1": dict(off), "s2": dict(off)}, "w4a16")["s2"]["mma"]
    on = dict(st, mma=True)
    assert not fix_config({"BLOCK_M": 1, "s1": dict(on), "s2": dict(on)}, "bf16")["s2"]["mma"]
    assert not fix_config({"BLOCK_M": 16, "s1": dict(on), "s2": dict(on)}, "w4a16")["s2"]["mma"]
    for bad in (4, 24):
        with pytest.raises(ValueError, match="BLOCK_M"):
            fix_config({"BLOCK_M": bad, "s1": dict(st), "s2": dict(st)}, "bf16")


@pytest.mark.parametrize("quant,act_dtype", [("none", "bf16"), ("fp8", "fp8"), ("mxfp4", "bf16")])
def test_strided_inputs(quant, act_dtype):
    # column-strided activations, transposed-storage biases and a strided expert mask
    M, H, I, E, k = 4, 64, 64, 4, 2  # noqa: E741
    x, w1, w2, tw, ti, kw = make_case(M, H, I, E, k, quant, bias=True, seed=9)
    x_wide = torch.zeros(M, 2 * H, dtype=x.dtype, device=x.device)
    x_wide[:, ::2] = x
    xs = x_wide[:, ::2]
    kw["bias1"] = kw["bias1"].t().contiguous().t()
    mask = torch.ones(2 * E, dtype=torch.bool, device=x.device)[::2]
    out, ref = _run_both(xs, w1, w2, tw, ti, quant=quant, act_dtype=act_dtype, expert_mask=mask,
                         **kw)
    assert_close(out, ref, _tol(act_dtype))


@pytest.mark.parametrize("quant", ["none", "mxfp4"])
def test_fp32_model(quant):
    # fp32 activations: MXFP4 takes the explicit decode (dot_scaled wants 16-bit operands)
    M, H, I, E, k = 3, 64, 64, 4, 2  # noqa: E741
    x, w1, w2, tw, ti, kw = make_case(M, H, I, E, k, quant, dtype=torch.float32, seed=10)
    out, ref = _run_both(x, w1, w2, tw, ti, quant=quant, act_dtype="bf16", **kw)
    assert_close(out, ref)


def _packaged_tables():
    from importlib import resources

    names = sorted(p.name for p in resources.files("moeprec").joinpath("configs").iterdir()
                   if p.name.startswith("fused_moe_") and p.name.endswith(".json"))
    return names


# kernel path -> (quant, act_dtype) of fused_moe
_PATH_ARGS = {"bf16": ("none", "bf16"), "w4a16": ("mxfp4", "bf16"), "w4a8": ("mxfp4", "fp8"),
              "fp8": ("fp8", "fp8"), "w8a16": ("fp8", "bf16")}


@pytest.mark.gpu
@pytest.mark.parametrize("table", _packaged_tables())
def test_gpu_every_packaged_config_matches_reference(table):
    """Each distinct launch configuration in a tuned table, run on a ragged small case (tiles cut
    by M, H and I): tuning picks configs by speed alone, this holds them to the reference."""
    import json

    from moeprec.kernels.tuning import _load_table, fix_config

    data = _load_table(table)
    M, H, I, E, k = 37, 256, 192, 8, 2  # noqa: E741
    cases = {}
    for path, shapes in data.items():
        if path.startswith("_"):
            continue
        for per_m in shapes.values():
            for cfg in per_m.values():
                fixed = fix_config(cfg, path)
                cases[(path, json.dumps(fixed, sort_keys=True))] = fixed
    assert cases, f"{table}: no configurations"
    for (path, _), cfg in sorted(cases.items()):
        quant, act_dtype = _PATH_ARGS[path]
        x, w1, w2, tw, ti, kw = make_case(M, H, I, E, k, quant, seed=len(cases))
        ref = fused_moe(x, w1, w2, tw, ti, backend="torch", quant=quant, act_dtype=act_dtype, **kw)
        out = _kernel_module().fused_moe_triton_impl(x, w1, w2, tw, ti, quant=quant,
                                                     act_dtype=act_dtype, config=cfg, **kw)
        assert_close(out, ref, _tol(act_dtype))


# (quant, act_dtype, activation, gate_mode, bias, dequant, M, H, I, E, k)
TMA_CASES = [
    ("none", "bf16", "silu", "separated", False, False, 7, 80, 48, 5, 2),  # tile edges in N, K
    ("none", "bf16", "swiglu_oai", "interleaved", True, False, 9, 64, 40, 4, 2),
    ("fp8", "fp8", "silu", "separated", True, False, 6, 80, 48, 4, 2),
    ("fp8", "bf16", "silu", "interleaved", False, False, 4, 64, 64, 4, 2),  # fp8 tiles upcast
    ("fp8", "fp8", "silu", "separated", False, False, 5, 64, 40, 4, 2),  # w2 rows of 40 bytes
    ("mxfp4", "fp8", "silu", "separated", False, True, 6, 64, 64, 4, 2),  # decoded first
    ("mxfp4", "bf16", "swiglu_oai", "interleaved", True, True, 5, 64, 96, 4, 2),
]


@pytest.mark.parametrize("quant,act_dtype,activation,gate_mode,bias,dequant,M,H,I,E,k", TMA_CASES)
def test_weight_tiles_through_tma(quant, act_dtype, activation, gate_mode, bias, dequant,  # noqa: E741
                                  M, H, I, E, k, monkeypatch):
    # "tma_b": plain / fp8 weight tiles through a TMA descriptor (zeros past N and K), the same
    # products as the pointer loads; a stage whose weights TMA cannot address (rows of 40 fp8
    # bytes: strides off 16 bytes) falls back to the pointer loads
    m = _kernel_module()
    from moeprec.kernels.tuning import fix_config, path_name

    x, w1, w2, tw, ti, kw = make_case(M, H, I, E, k, quant, bias=bias, seed=7 + M)
    ti = torch.where(ti == 1, 0, ti)  # expert 1 gets no token
    args = dict(quant=quant, act_dtype=act_dtype, activation=activation, gate_mode=gate_mode, **kw)
    st = {"BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
    path = path_name(quant, act_dtype)
    split_k = 1 + M % 2  # odd M: stage 2 split along K, each split's boxes from its own K range
    cfg = fix_config({"BLOCK_M": 16, "dequant": dequant, "s1": dict(st, tma_b=True),
                      "s2": dict(st, tma_b=True, split_k=split_k)}, path)
    assert cfg["s1"]["tma_b"] and cfg["s2"]["tma_b"] and cfg["s2"]["split_k"] == split_k
    made = []
    real = m._weight_descriptor
    monkeypatch.setattr(m, "_weight_descriptor", lambda *a: made.append(real(*a)) or made[-1])
    out = m.fused_moe_triton_impl(x, w1, w2, tw, ti, config=cfg, **args)
    monkeypatch.setattr(m, "_weight_descriptor", real)
    addressable = I * w2.element_size() % 16 == 0
    assert [d is not None for d in made[:2]] == [True, addressable]
    ref = fused_moe(x, w1, w2, tw, ti, backend="torch", **args)
    assert_close(out, ref, _tol(act_dtype))
    ptr = m.fused_moe_triton_impl(x, w1, w2, tw, ti, config=fix_config(
        dict(cfg, s1=dict(cfg["s1"], tma_b=False), s2=dict(cfg["s2"], tma_b=False)), path), **args)
    if ON_GPU:  # same MMAs on the same values; only the route into shared memory differs
        torch.testing.assert_close(out, ptr, rtol=1e-2, atol=1e-2)
    else:
        assert torch.equal(out, ptr)


def test_tma_weight_tiles_config_and_descriptor_rules():
    m = _kernel_module()
    from moeprec.kernels.tuning import fix_config

    st = {"BLOCK_N": 64, "BLOCK_K": 64, "tma_b": True}
    cfg = {"BLOCK_M": 16, "s1": dict(st), "s2": dict(st)}
    assert fix_config(cfg, "bf16")["s1"]["tma_b"] and fix_config(cfg, "fp8")["s2"]["tma_b"]
    assert not fix_config(cfg, "w4a16")["s1"]["tma_b"]  # MXFP4 tiles: packed bytes, decoded
    assert fix_config(dict(cfg, dequant=True), "w4a8")["s1"]["tma_b"]  # decoded first: plain
    assert not fix_config(dict(cfg, BLOCK_M=1), "bf16")["s1"]["tma_b"]  # CUDA-core blocks
    assert not fix_config({"BLOCK_M": 16, "s1": {"BLOCK_N": 64, "BLOCK_K": 64},
                           "s2": {"BLOCK_N": 64, "BLOCK_K": 64}}, "bf16")["s1"]["tma_b"]
    w = torch.randn(3, 2 * 48, 64).to(torch.bfloat16)
    d = m._weight_descriptor(w, 2, 64, 32)  # separated gate / up rows: two parts in one box
    assert d.shape == [3, 2, 48, 64] and d.block_shape == [1, 2, 32, 32]
    assert d.strides == [w.stride(0), 48 * 64, 64, 1]
    assert m._weight_descriptor(w, 1, 512, 32) is None  # a box side over 256
    assert m._weight_descriptor(w.transpose(1, 2), 1, 32, 32) is None  # K not contiguous
    assert m._weight_descriptor(torch.empty(3, 8, 40, dtype=torch.float8_e4m3fn), 1, 8, 32) is None
    assert m._weight_descriptor(w[:, :, 1:], 1, 32, 32) is None  # base off 16 bytes


# Stage 2's fp32 atomic output, when small, is zero-filled by stage 1's programs (each its
# share, before any early exit) instead of a memset; with intermediates poisoned NaN, a share
# left unwritten shows in the output. Shapes: fewer elements than programs, several 256-wide
# steps per program, and most programs exiting early on masked experts.
@pytest.mark.parametrize("M,H,I,E,k,bm,masked", [  # noqa: E741
    (1, 8, 48, 4, 2, 1, 0), (16, 600, 16, 1, 1, 16, 0), (9, 72, 40, 6, 2, 16, 4),
    (5, 40, 32, 4, 2, 1, 4)])
@pytest.mark.parametrize("in_stage1", [True, False])
def test_stage1_zero_fills_the_atomic_output(M, H, I, E, k, bm, masked, in_stage1,  # noqa: E741
                                             monkeypatch):
    from moeprec.kernels.tuning import fix_config

    m = _kernel_module()
    monkeypatch.setattr(m, "ZERO_IN_STAGE1_MAX_BYTES", (4 << 20) if in_stage1 else 0)
    zeroed = []
    launch = m._launch_gemm
    monkeypatch.setattr(m, "_launch_gemm", lambda **kw: zeroed.append(kw.get("zero") is not None)
                        or launch(**kw))
    x, w1, w2, tw, ti, kw = make_case(M, H, I, E, k, seed=M + masked)
    mask = torch.ones(E, dtype=torch.bool, device=x.device)
    mask[:masked] = False  # masked == E: every stage-1 program exits early, the output is zeros
    st = {"BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}
    cfg = fix_config({"BLOCK_M": bm, "atomic": True, "s1": dict(st), "s2": dict(st)}, "bf16")
    out = m.fused_moe_triton_impl(x, w1, w2, tw, ti, expert_mask=mask, config=cfg)
    ref = fused_moe(x, w1, w2, tw, ti, backend="torch", expert_mask=mask)
    assert zeroed == [in_stage1, False]  # stage 1 zero-fills, stage 2 never does
    assert_close(out, ref)
    if masked == E:
        assert torch.equal(out, torch.zeros_like(out))
    # the same with stage 2 as a programmatic dependent launch (it adds into the zeros only
    # after its wait for stage 1)
    zeroed.clear()
    out = m.fused_moe_triton_impl(x, w1, w2, tw, ti, expert_mask=mask, config=dict(cfg, pdl=True))
    assert zeroed == [in_stage1, False]
    assert_close(out, ref)


# "pdl": stage 2 launched as a programmatic dependent of stage 1. In the interpreter the grid
# dependency instructions are left out (it has no inline PTX), so there this checks the launch
# plumbing; on the GPU, a stage 2 that read z before stage 1 finished would read the poisoned
# (NaN) intermediate.
_PDL_CASES = [  # (quant, act_dtype, BLOCK_M, atomic, fuse_quant)
    ("none", "bf16", 1, True, True), ("mxfp4", "bf16", 1, False, True),
    ("none", "bf16", 16, True, True), ("none", "bf16", 16, False, True),
    ("fp8", "fp8", 16, True, True), ("fp8", "fp8", 16, False, False),
]


@pytest.mark.parametrize("quant,act_dtype,bm,atomic,fuse_quant", _PDL_CASES)
def test_stage2_as_programmatic_dependent_launch(quant, act_dtype, bm, atomic, fuse_quant):
    from moeprec.kernels.tuning import fix_config, path_name

    m = _kernel_module()
    M, H, I, E, k = 7, 64, 96, 5, 3  # noqa: E741  (I off the 64-wide tiles)
    x, w1, w2, tw, ti, kw = make_case(M, H, I, E, k, quant, bias=True, seed=bm + atomic)
    ref = fused_moe(x, w1, w2, tw, ti, backend="torch", quant=quant, act_dtype=act_dtype, **kw)
    st = {"BLOCK_N": 32 if bm == 1 else 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}
    cfg = fix_config({"BLOCK_M": bm, "atomic": atomic, "fuse_quant": fuse_quant, "pdl": True,
                      "s1": dict(st), "s2": dict(st)}, path_name(quant, act_dtype))
    assert cfg["pdl"]  # kept by fix_config; off unless a config says so
    assert not fix_config({"BLOCK_M": bm, "s1": dict(st), "s2": dict(st)},
                          path_name(quant, act_dtype))["pdl"]
    out = m.fused_moe_triton_impl(x, w1, w2, tw, ti, quant=quant, act_dtype=act_dtype,
                                  config=cfg, **kw)
    assert_close(out, ref, _tol(act_dtype))


@pytest.mark.gpu
def test_gpu_cuda_graph_with_programmatic_dependent_launch():
    # the dependency is captured into the graph: replays on new inputs still see stage 1's rows
    from moeprec.kernels.tuning import fix_config

    m = _kernel_module()
    M, H, I, E, k = 4, 2048, 768, 16, 4  # noqa: E741  (stage 1 long enough to overlap)
    x, w1, w2, tw, ti, kw = make_case(M, H, I, E, k, seed=9)
    st = {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 2}
    cfg = fix_config({"BLOCK_M": 1, "pdl": True, "s1": dict(st), "s2": dict(st)}, "bf16")
    f = lambda: m.fused_moe_triton_impl(x, w1, w2, tw, ti, config=cfg)  # noqa: E731
    f()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = f()
    for seed in (10, 11, 12):
        new_x, _, _, new_tw, new_ti, _ = make_case(M, H, I, E, k, seed=seed)
        x.copy_(new_x), tw.copy_(new_tw), ti.copy_(new_ti)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, fused_moe(x, w1, w2, tw, ti, backend="torch"))


@pytest.mark.parametrize("M,K,one_pass_max", [(0, 64, 16384), (1, 96, 16384), (9, 768, 16384),
                                               (3, 1500, 16384), (11, 1500, 512)])
def test_fp8_row_quantization_matches_the_reference(M, K, one_pass_max):
    # the fp8 path's own row kernel (several rows per program, in registers or, past
    # one_pass_max columns, read twice in chunks; a last program with fewer rows) against
    # the reference quantizer Q, zero, NaN, huge and tiny rows included. Interpreted, the
    # division is IEEE: the same bytes and scales. On the GPU Triton's `/` is div.full.f32
    # (within 2 ulp; docs/kernels.md): scales within 2 ulp, codes within one E4M3 step.
    from moeprec.formats.fp8 import quantize_fp8_torch

    m = _kernel_module()
    g = torch.Generator().manual_seed(M + K)
    x = torch.randn(M, K, generator=g) * torch.exp2(torch.randint(-12, 12, (M, 1), generator=g).float())
    if M >= 9:
        x[2] = 0.0
        x[3, K // 2] = float("nan")
        x[4] *= 1e30
        x[5] *= 1e-30
    x = x.to(torch.bfloat16).to(DEV)
    q, s = m._quant_fp8_rows(x, one_pass_max)
    ref_q, ref_s = quantize_fp8_torch(x.cpu(), "per_token")
    assert q.dtype == torch.float8_e4m3fn and q.shape == (M, K) and s.shape == (M,)
    s, ref_s = s.cpu(), ref_s[:, 0]
    assert torch.equal(s.isnan(), ref_s.isnan())
    nan = ref_q.float().isnan()  # NaN bytes: the GPU's cast may not keep the NaN's sign
    assert torch.equal(q.cpu().float().isnan(), nan)
    qb, rb = q.cpu().view(torch.uint8)[~nan].int(), ref_q.view(torch.uint8)[~nan].int()
    if not ON_GPU:
        assert torch.equal(s.nan_to_num(), ref_s.nan_to_num()) and torch.equal(qb, rb)
        return
    ok = ~ref_s.isnan()
    assert torch.allclose(s[ok], ref_s[ok], rtol=2.0**-22, atol=0)
    mag_q, mag_r = qb & 0x7F, rb & 0x7F
    assert ((mag_q - mag_r).abs() <= 1).all()
    assert (((qb ^ rb) & 0x80 == 0) | ((mag_q == 0) & (mag_r == 0))).all()


# (activation, gate_mode, bias, masked, atomic, pdl, split_k, BLOCK_N, BLOCK_K, warps, M, H, I, E,
#  k, dtype): K off BLOCK_K (EVEN_K off) with empty K splits, N off BLOCK_N, warps splitting
#  rows (BLOCK_K 128: one group of 4 blocks per step) and block groups, 1 to 8 warps
MMA_DECODE_CASES = [
    ("silu", "separated", False, False, True, False, 1, 16, 128, 1, 1, 256, 128, 4, 2, torch.bfloat16),
    ("swiglu_oai", "interleaved", True, True, True, False, 3, 16, 128, 1, 7, 96, 96, 5, 2, torch.bfloat16),
    ("silu", "separated", True, False, False, True, 1, 64, 128, 4, 4, 96, 160, 4, 3, torch.float16),
    ("silu", "separated", False, False, True, True, 2, 64, 256, 8, 16, 2048, 768, 8, 2, torch.bfloat16),
    # K = 384 and 128 under BLOCK_K = 256: K tails of whole scale words
    ("swiglu_oai", "interleaved", False, False, True, True, 3, 32, 256, 4, 5, 384, 128, 6, 3, torch.bfloat16),
    # K = 2336: 19 steps of 128, staged in 4 chunks of 8 (4 pieces per thread), a K tail
    ("silu", "separated", False, False, True, False, 1, 16, 128, 1, 2, 2336, 64, 3, 2, torch.bfloat16),
]


def test_tensor_core_decode_ring_rules():
    # where the Gluon blocks may take their weights through the TMA ring ("ring": steps; host
    # rules on CPU tensors): a [experts * rows, K / 8] int32 view, one step of TR2 rows a box
    pytest.importorskip("triton.experimental.gluon")
    from moeprec.kernels import _decode_mma
    from moeprec.kernels.tuning import fix_config

    E, R, K = 4, 64, 256  # noqa: N806
    b = torch.zeros(E, R, K // 2, dtype=torch.uint8)
    st = {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "ring": 3}
    ch, _, kc = _decode_mma._staging_chunks(K, st, 1)

    def desc(b, stage1=False, interleaved=False, **over):
        return _decode_mma.ring_descriptor(b, stage1=stage1, interleaved=interleaved,
                                           st=dict(st, **over), k_chunks=kc, ch=ch)

    d = desc(b)  # stage 2: a box of BLOCK_N / 2 rows
    assert d.shape == [E * R, K // 8] and d.strides == [K // 8, 1] and d.block_shape == [16, 16]
    assert desc(b, stage1=True).block_shape == [32, 16]  # stage 1: BLOCK_N gate (or up) rows
    assert desc(b, stage1=True, interleaved=True) is None  # gate/up rows alternate
    assert desc(b, ring=0) is None
    assert desc(b[:, :48]) is None  # experts not back to back in one view
    padded = torch.zeros(E, R, K // 2 + 16, dtype=torch.uint8)  # rows 16 bytes apart: fine
    assert desc(padded[..., 16:]) is not None
    assert desc(torch.zeros(E, R, K // 2 + 4, dtype=torch.uint8)[..., 4:]) is None  # 132-byte rows
    assert desc(torch.zeros(E * R * K // 2 + 4, dtype=torch.uint8)[4:].view(E, R, K // 2)) is None
    assert desc(b, ring=64) is None  # over the shared-memory cap
    assert desc(b, num_warps=1) is None and desc(b, num_warps=8) is not None  # warpgroups
    # the config keeps a ring only for the Gluon blocks
    on = {"BLOCK_N": 32, "BLOCK_K": 256, "ring": 4}
    assert fix_config({"BLOCK_M": 1, "s1": dict(on), "s2": dict(on)}, "w4a16")["s2"]["ring"] == 4
    assert fix_config({"BLOCK_M": 1, "s1": dict(on), "s2": dict(on, mma=False)},
                      "w4a16")["s2"]["ring"] == 0
    assert fix_config({"BLOCK_M": 1, "s1": dict(on), "s2": dict(on)}, "bf16")["s2"]["ring"] == 0
    # and its register cap (programs per SM) with the ring only: 80 unless set, whole 8s, >= 40
    cfg = fix_config({"BLOCK_M": 1, "s1": dict(on, maxnreg=63), "s2": dict(on)}, "w4a16")
    assert (cfg["s1"]["maxnreg"], cfg["s2"]["maxnreg"]) == (56, 80)
    assert fix_config({"BLOCK_M": 1, "s1": dict(on, maxnreg=8), "s2": dict(on)},
                      "w4a16")["s1"]["maxnreg"] == 40
    assert "maxnreg" not in fix_config({"BLOCK_M": 1, "s1": dict(on, ring=0, maxnreg=64),
                                        "s2": dict(on)}, "w4a16")["s1"]


@pytest.mark.parametrize("cap,quant,act,pdl,need", [
    ((8, 0), "none", "bf16", False, None),       # bf16 compiles for sm_80
    ((8, 0), "mxfp4", "bf16", False, "8.9"),     # the MXFP4 decode blocks: fp8 conversions
    ((8, 0), "none", "fp8", False, "8.9"),
    ((8, 6), "fp8", "bf16", False, "8.9"),
    ((8, 9), "fp8", "fp8", False, None),
    ((8, 9), "mxfp4", "bf16", True, "9.0"),      # griddepcontrol
    ((9, 0), "mxfp4", "fp8", True, None),
    ((10, 0), "fp8", "fp8", True, None),
])
def test_kernels_name_the_compute_capability_they_need(cap, quant, act, pdl, need, monkeypatch):
    # on GPUs the kernels cannot compile for, a ValueError naming the argument and the
    # capability instead of a ptxas failure (host-side check; no GPU needed)
    import moeprec.backends as backends

    m = _kernel_module()
    monkeypatch.setattr(backends, "cuda_capability", lambda device: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    dev = torch.device("cuda", 0)
    if need is None:
        m.check_device(dev, quant, act, pdl)
    else:
        with pytest.raises(ValueError, match=rf"hidden_states: .*capability {re.escape(need)} "
                                             rf"or later; Test GPU is {cap[0]}\.{cap[1]}"):
            m.check_device(dev, quant, act, pdl)


@pytest.mark.parametrize("version,ok", [("3.6.0", True), ("3.6.1+git1234", True),
                                         ("3.5.1", False), ("3.9.0", False), ("4.0.0", False)])
def test_gluon_decode_blocks_only_with_their_triton(version, ok, monkeypatch):
    # Gluon's API moves between Triton releases (3.4, 3.5 and 3.9 do not compile the blocks):
    # other versions get the CUDA-core blocks and one warning naming the version
    pytest.importorskip("triton.experimental.gluon")
    import triton

    m = _kernel_module()
    monkeypatch.setattr(triton, "__version__", version)
    m.gluon_decode_available.cache_clear()
    try:
        if ok:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert m.gluon_decode_available()
        else:
            with pytest.warns(RuntimeWarning, match=f"Triton {re.escape(version)}.*CUDA-core"):
                assert not m.gluon_decode_available()
            with warnings.catch_warnings():  # once per process
                warnings.simplefilter("error")
                assert not m.gluon_decode_available()
    finally:
        m.gluon_decode_available.cache_clear()


def test_tensor_core_decode_fit_rules():
    # which BLOCK_M = 1 MXFP4 stages the Gluon blocks take (host-side rules; CPU tensors)
    pytest.importorskip("triton.experimental.gluon")
    from moeprec.kernels import _decode_mma

    E, N, K = 2, 64, 256  # noqa: N806
    a = torch.zeros(3, K, dtype=torch.bfloat16)
    b = torch.zeros(E, N, K // 2, dtype=torch.uint8)
    c = torch.zeros(3, N, dtype=torch.bfloat16)
    st = {"BLOCK_N": 16, "BLOCK_K": 128, "num_warps": 2}
    assert _decode_mma.fits(a=a, b=b, c=c, stage1=True, st=st)  # 16 lo rows over 2 row warps
    assert not _decode_mma.fits(a=a, b=b, c=c, stage1=False, st=st)  # 8 lo rows: too few
    assert _decode_mma.fits(a=a, b=b, c=c, stage1=False, st=dict(st, num_warps=1))
    assert not _decode_mma.fits(a=a, b=b, c=c, stage1=True, st=dict(st, BLOCK_K=64))  # < 4 blocks
    assert not _decode_mma.fits(a=a.float(), b=b, c=c, stage1=True, st=st)  # fp32 activations
    assert not _decode_mma.fits(a=a[:, 1:129], b=b, c=c, stage1=True, st=st)  # row off 16 bytes
    assert not _decode_mma.fits(a=a, b=b, c=c.t().contiguous().t(), stage1=True, st=st)
    # the activation staging: chunks of CH steps (REPS 16-byte pieces per thread, at most
    # _STAGING_REPS = 4), K_CHUNKS a power of two per K split
    assert _decode_mma._staging_chunks(14336, {"BLOCK_K": 256, "num_warps": 4}, 1) == (16, 4, 4)
    assert _decode_mma._staging_chunks(14336, {"BLOCK_K": 256, "num_warps": 4}, 2) == (16, 4, 2)
    assert _decode_mma._staging_chunks(4096, {"BLOCK_K": 256, "num_warps": 4}, 1) == (16, 4, 1)
    assert _decode_mma._staging_chunks(2048, {"BLOCK_K": 256, "num_warps": 4}, 1) == (8, 2, 1)
    assert _decode_mma._staging_chunks(96, {"BLOCK_K": 128, "num_warps": 1}, 3) == (2, 1, 1)
    # scales as one 4-byte word per row and group of 4 blocks: unit K stride, 4-byte aligned
    # rows, experts and base, K a multiple of 128; else the byte reads
    bs = torch.zeros(E, N, 8, dtype=torch.uint8)  # K = 256: 8 blocks per row
    assert _decode_mma.scale_words(bs, 256)
    assert not _decode_mma.scale_words(bs, 192)  # a partial group
    assert not _decode_mma.scale_words(bs.transpose(1, 2).contiguous().transpose(1, 2), 256)
    assert not _decode_mma.scale_words(torch.zeros(E, N, 10, dtype=torch.uint8)[:, :, :8], 256)
    assert not _decode_mma.scale_words(torch.zeros(E * N * 8 + 1, dtype=torch.uint8)[1:].view(E, N, 8), 256)


def _count_mma_launches(monkeypatch):
    """The stages (stage1 flags) that ran on the Gluon decode blocks: a silent fallback to the
    CUDA-core blocks would pass the comparisons."""
    from moeprec.kernels import _decode_mma

    launches = []
    real = _decode_mma.launch
    monkeypatch.setattr(_decode_mma, "launch", lambda **kw: launches.append(kw["stage1"]) or real(**kw))
    return launches


def _mma_decode_case(activation, gate_mode, bias, masked, atomic, pdl, split_k, bn, bk, warps,
                     M, H, I, E, k, dtype):  # noqa: E741
    """One MMA_DECODE_CASES case: inputs, the op's keyword arguments, the torch reference and
    the w4a16 config on the Gluon decode blocks."""
    from moeprec.kernels.tuning import fix_config

    x, w1, w2, tw, ti, kw = make_case(M, H, I, E, k, "mxfp4", dtype=dtype, bias=bias, seed=M + H)
    mask = None
    if masked:
        mask = torch.ones(E, dtype=torch.bool, device=x.device)
        mask[1] = False
    args = dict(quant="mxfp4", activation=activation, gate_mode=gate_mode, expert_mask=mask, **kw)
    ref = fused_moe(x, w1, w2, tw, ti, backend="torch", **args)
    st = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": 2, "mma": True}
    cfg = fix_config({"BLOCK_M": 1, "atomic": atomic, "pdl": pdl, "s1": dict(st),
                      "s2": dict(st, split_k=split_k)}, "w4a16")
    assert cfg["s1"]["mma"] and cfg["s2"]["mma"]
    return x, w1, w2, tw, ti, kw, args, ref, cfg


@pytest.mark.gpu
@NEEDS_GLUON
@pytest.mark.parametrize("activation,gate_mode,bias,masked,atomic,pdl,split_k,bn,bk,warps,M,H,I,E,k,dtype,scale_words",
                         # scales read bytewise on every case; as 4-byte words where both K are
                         # multiples of 128 (the default there)
                         [(*c, False) for c in MMA_DECODE_CASES]
                         + [(*c, True) for c in MMA_DECODE_CASES if c[11] % 128 == 0 == c[12] % 128])
def test_gpu_tensor_core_decode_blocks(activation, gate_mode, bias, masked, atomic, pdl, split_k,
                                       bn, bk, warps, M, H, I, E, k, dtype, scale_words,
                                       monkeypatch):  # noqa: E741
    # the Gluon decode blocks (stage config "mma") against the reference and the CUDA-core
    # blocks; a launch counter proves they ran (a silent fallback would pass the comparison)
    m = _kernel_module()
    launches = _count_mma_launches(monkeypatch)
    x, w1, w2, tw, ti, kw, args, ref, cfg = _mma_decode_case(
        activation, gate_mode, bias, masked, atomic, pdl, split_k, bn, bk, warps, M, H, I, E, k,
        dtype)
    from moeprec.kernels import _decode_mma

    if scale_words:
        assert _decode_mma.scale_words(kw["w1_scale"], H) and _decode_mma.scale_words(kw["w2_scale"], I)
    else:  # the bytewise scale reads (the path of K not a multiple of 128)
        monkeypatch.setattr(_decode_mma, "scale_words", lambda b_scale, K: False)
    out = m.fused_moe_triton_impl(x, w1, w2, tw, ti, config=cfg, **args)
    assert sorted(set(launches)) == [False, True]
    assert_close(out, ref)
    cores = m.fused_moe_triton_impl(x, w1, w2, tw, ti, config=_cuda_core_blocks(cfg), **args)
    _assert_same_sums(out, cores)


def _cuda_core_blocks(cfg):
    """The w4a16 config with both stages on the CUDA-core decode blocks ("mma" off)."""
    from moeprec.kernels.tuning import fix_config

    return fix_config({**cfg, "s1": dict(cfg["s1"], mma=False), "s2": dict(cfg["s2"], mma=False)},
                      "w4a16")


def _assert_same_sums(out, cores):
    # both blocks sum exact products in fp32, in other orders, and round z to the model dtype
    # in between: far closer than either is to the reference (a wrong scale on some blocks
    # passes assert_close's 5% of outliers, not this)
    o, c = out.double(), cores.double()
    assert (o - c).abs().max() <= 1e-2 * c.abs().max()
    assert (o - c).abs().mean() <= 1e-3 * c.abs().mean()


@pytest.mark.gpu
@NEEDS_GLUON
@pytest.mark.parametrize("activation,gate_mode,bias,masked,atomic,pdl,split_k,bn,bk,warps,M,H,I,E,k,dtype",
                         MMA_DECODE_CASES)
def test_gpu_tensor_core_decode_ring(activation, gate_mode, bias, masked, atomic, pdl, split_k,
                                     bn, bk, warps, M, H, I, E, k, dtype, monkeypatch):  # noqa: E741
    # the Gluon blocks with their weights through a 3-step TMA ring (a producer warp) against
    # the reference and the register path; every stage the ring can take must have taken it
    # (stage 1 with interleaved rows, and 1-warp programs, keep the registers)
    m = _kernel_module()
    from moeprec.kernels import _decode_mma

    rings = []
    real = _decode_mma.ring_descriptor

    def recorded(b, **kw):
        desc = real(b, **kw)
        rings.append((kw["stage1"], desc is not None))
        return desc

    monkeypatch.setattr(_decode_mma, "ring_descriptor", recorded)
    x, w1, w2, tw, ti, _, args, ref, regs = _mma_decode_case(
        activation, gate_mode, bias, masked, atomic, pdl, split_k, bn, bk, warps, M, H, I, E, k,
        dtype)
    ring = {**regs, "s1": dict(regs["s1"], ring=3), "s2": dict(regs["s2"], ring=3)}
    out = m.fused_moe_triton_impl(x, w1, w2, tw, ti, config=ring, **args)
    whole = warps % 4 == 0
    assert sorted(set(rings)) == [(False, whole), (True, whole and gate_mode != "interleaved")]
    assert_close(out, ref)
    _assert_same_sums(out, m.fused_moe_triton_impl(x, w1, w2, tw, ti, config=regs, **args))


@pytest.mark.gpu
@NEEDS_GLUON
@pytest.mark.parametrize("scale", [1e-30, 1.0, 3e4])
def test_gpu_tensor_core_decode_activation_range(scale, monkeypatch):
    # the f16 staging scales each program's activations into [1, 2) by a power of two: tiny and
    # large rows, and a row mixing magnitudes 2^20 apart, match the reference as well as unit ones
    m = _kernel_module()
    from moeprec.kernels.tuning import fix_config

    launches = _count_mma_launches(monkeypatch)

    M, H, I, E, k = 3, 128, 64, 4, 2  # noqa: E741
    x, w1, w2, tw, ti, kw = make_case(M, H, I, E, k, "mxfp4", seed=5)
    x = (x.float() * scale).to(x.dtype)
    x[2, ::2] *= 2.0**-20
    ref = fused_moe(x, w1, w2, tw, ti, backend="torch", quant="mxfp4", **kw)
    st = {"BLOCK_N": 16, "BLOCK_K": 128, "num_warps": 1, "num_stages": 2, "mma": True}
    cfg = fix_config({"BLOCK_M": 1, "s1": dict(st), "s2": dict(st)}, "w4a16")
    assert cfg["s1"]["mma"] and cfg["s2"]["mma"]
    out = m.fused_moe_triton_impl(x, w1, w2, tw, ti, quant="mxfp4", config=cfg, **kw)
    assert sorted(set(launches)) == [False, True]
    assert torch.isfinite(ref.float()).all()
    assert_close(out / scale, ref / scale)
    cores = m.fused_moe_triton_impl(x, w1, w2, tw, ti, quant="mxfp4", config=_cuda_core_blocks(cfg),
                                    **kw)
    _assert_same_sums(out / scale, cores / scale)
