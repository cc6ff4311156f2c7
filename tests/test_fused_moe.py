"""fused_moe / fused_moe_torch against a plain per-token fp64 reference written here."""

import importlib
import itertools
import math
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest
import torch

import moeprec
from moeprec import quantize_mxfp4
from moeprec.activations import convert_gate_up_order
from moeprec.fused_moe_op import fused_moe, fused_moe_torch
from tests._metrics import assert_close_aiter

M, H, I, E, K = 7, 64, 32, 4, 2
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


# ----------------------------------------------------------------------------- plain reference


def ref_dequant_mxfp4(packed, scales):
    """Nibble lookup times 2^(byte - 127), written out (fp64)."""
    lut = torch.tensor(E2M1 + [-v for v in E2M1], dtype=torch.float64)
    p = packed.long()
    vals = torch.stack([lut[p & 0xF], lut[p >> 4]], dim=-1).flatten(-2)  # [..., K]
    scale = torch.pow(2.0, scales.double() - 127).repeat_interleave(32, dim=-1)
    return vals * scale


def ref_q_fp8(v):
    """Per-row E4M3 fake quantization of a 1-D fp64 vector."""
    s = max(v.abs().max().item(), 1e-12) / 448.0
    return (v / s).clamp(-448, 448).to(torch.float8_e4m3fn).double() * s


def ref_q_fp4(v):
    """MXFP4 fake quantization (rceil scale: 2^ceil(log2(amax/6))) of a 1-D vector."""
    out = torch.empty_like(v)
    for b in range(0, v.numel(), 32):
        blk = v[b : b + 32]
        amax = np.float32(blk.abs().max().item())
        if amax == 0:
            out[b : b + 32] = 0
            continue
        e = min(max(math.ceil(math.log2(np.float32(amax / np.float32(6.0)))), -127), 127)
        q = (blk / 2.0**e).numpy().astype(ml_dtypes.float4_e2m1fn).astype(np.float64)
        out[b : b + 32] = torch.from_numpy(q) * 2.0**e
    return out


REF_Q = {"bf16": lambda v: v, "fp8": ref_q_fp8, "fp4": ref_q_fp4}


def reference(x, w1d, w2d, tw, ids, *, act_dtype, activation="silu", gate_mode="separated",
              alpha=1.702, limit=7.0, b1=None, b2=None, mask=None, on_input=False):
    """out_t = sum_j w_tj * (W2_e Q(z) + b2_e), z = act(W1_e Q(x_t) + b1_e) rounded to x.dtype."""
    q = REF_Q[act_dtype]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        xt = q(x[t].double())
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if mask is not None and not bool(mask[e]):
                continue
            w = tw[t, j].double()
            h = w1d[e] @ xt
            if on_input:
                h = h * w
            if b1 is not None:
                h = h + b1[e].double()
            n = h.numel() // 2
            g, u = (h[:n], h[n:]) if gate_mode == "separated" else (h[0::2], h[1::2])
            if activation == "silu":
                z = g * torch.sigmoid(g) * u
            else:
                g, u = g.clamp(max=limit), u.clamp(-limit, limit)
                z = g * torch.sigmoid(alpha * g) * (u + 1)
            z = q(z.to(x.dtype).double())
            y = w2d[e] @ z
            if b2 is not None:
                y = y + b2[e].double()
            out[t] += y if on_input else w * y
    return out


# ----------------------------------------------------------------------------- inputs


def make_weights(quant, m=M, h=H, i=I, e=E, gen=None):
    """Random float weights and their quantized form: (dense fp64 w1, w2, fused_moe kwargs)."""
    w1 = torch.randn(e, 2 * i, h, generator=gen) / math.sqrt(h)
    w2 = torch.randn(e, h, i, generator=gen) / math.sqrt(i)
    if quant == "none":
        w1b, w2b = w1.bfloat16(), w2.bfloat16()
        return w1b.double(), w2b.double(), dict(w1=w1b, w2=w2b)
    if quant == "mxfp4":
        q1, s1 = quantize_mxfp4(w1)
        q2, s2 = quantize_mxfp4(w2)
        return (ref_dequant_mxfp4(q1, s1), ref_dequant_mxfp4(q2, s2),
                dict(w1=q1, w2=q2, w1_scale=s1, w2_scale=s2))
    out = {}
    dense = []
    for name, w in (("w1", w1), ("w2", w2)):
        s = w.abs().amax(-1) / 448.0
        q = (w / s.unsqueeze(-1)).clamp(-448, 448).to(torch.float8_e4m3fn)
        out[name], out[name + "_scale"] = q, s
        dense.append(q.double() * s.double().unsqueeze(-1))
    return dense[0], dense[1], out


def make_routing(m=M, k=K, e=E, gen=None):
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(m)])
    tw = torch.rand(m, k, generator=gen) + 0.1
    return tw, ids


def make_case(quant, *, bias=False, dtype=torch.bfloat16, m=M):
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(m, H, generator=gen).to(dtype)
    w1d, w2d, wkw = make_weights(quant, m=m, gen=gen)
    tw, ids = make_routing(m=m, gen=gen)
    b1 = 0.1 * torch.randn(E, 2 * I, generator=gen) if bias else None
    b2 = 0.1 * torch.randn(E, H, generator=gen) if bias else None
    return x, w1d, w2d, wkw, tw, ids, b1, b2


AUTO_SMALL_M = {"none": "bf16", "mxfp4": "bf16", "fp8": "fp8"}


# ----------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("activation", ["silu", "swiglu_oai"])
@pytest.mark.parametrize("act_dtype", ["bf16", "fp8", "fp4", "auto"])
@pytest.mark.parametrize("quant", ["none", "mxfp4", "fp8"])
def test_matches_plain_reference(quant, act_dtype, activation, monkeypatch):
    monkeypatch.delenv("MOEPREC_FORCE_BF16_ACT", raising=False)
    monkeypatch.delenv("MOEPREC_BF16_FP8_BOUND", raising=False)
    ref_act = AUTO_SMALL_M[quant] if act_dtype == "auto" else act_dtype
    # swiglu with a small limit so that the clamps matter
    extra = dict(swiglu_alpha=1.5, swiglu_limit=1.0) if activation == "swiglu_oai" else {}
    for gate_mode, bias, masked, on_input in itertools.product(
        ["separated", "interleaved"], [False, True], [False, True], [False, True]
    ):
        x, w1d, w2d, wkw, tw, ids, b1, b2 = make_case(quant, bias=bias)
        mask = torch.tensor([True, False, True, True]) if masked else None
        if gate_mode == "interleaved":  # same experts, rows stored interleaved
            w1d = convert_gate_up_order(w1d, "separated", "interleaved")
            wkw["w1"] = convert_gate_up_order(wkw["w1"], "separated", "interleaved")
            if "w1_scale" in wkw:
                dim = -2 if quant == "mxfp4" else -1
                wkw["w1_scale"] = convert_gate_up_order(wkw["w1_scale"], "separated", "interleaved", dim)
            if b1 is not None:
                b1 = convert_gate_up_order(b1, "separated", "interleaved", dim=-1)
        want = reference(x, w1d, w2d, tw, ids, act_dtype=ref_act, activation=activation,
                         gate_mode=gate_mode, alpha=extra.get("swiglu_alpha", 1.702),
                         limit=extra.get("swiglu_limit", 7.0), b1=b1, b2=b2, mask=mask,
                         on_input=on_input)
        got = fused_moe(x, topk_weights=tw, topk_ids=ids, activation=activation, gate_mode=gate_mode,
                        quant=quant, act_dtype=act_dtype, bias1=b1, bias2=b2, expert_mask=mask,
                        apply_router_weight_on_input=on_input, backend="torch", **extra, **wkw)
        assert got.dtype == x.dtype and got.shape == x.shape
        assert_close_aiter(got, want)


def test_fp32_hidden_states_tight():
    x, w1d, w2d, wkw, tw, ids, b1, b2 = make_case("none", bias=True, dtype=torch.float32)
    want = reference(x, w1d, w2d, tw, ids, act_dtype="bf16", b1=b1, b2=b2)
    got = fused_moe_torch(x, topk_weights=tw, topk_ids=ids, bias1=b1, bias2=b2, **wkw)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_output_dtype_and_quant_none_weight_dtypes(dtype):
    x, w1d, w2d, wkw, tw, ids, _, _ = make_case("none", dtype=dtype)
    wkw = dict(w1=wkw["w1"].to(dtype), w2=wkw["w2"].to(dtype))
    got = fused_moe_torch(x, topk_weights=tw, topk_ids=ids, **wkw)
    assert got.dtype == dtype
    assert_close_aiter(got, reference(x, wkw["w1"].double(), wkw["w2"].double(), tw, ids, act_dtype="bf16"))


@pytest.mark.parametrize("activation", ["silu", "swiglu_oai"])
@pytest.mark.parametrize("quant", ["none", "mxfp4", "fp8"])
def test_separated_and_interleaved_bit_identical(quant, activation):
    x, _, _, wkw, tw, ids, b1, b2 = make_case(quant, bias=True)
    common = dict(topk_weights=tw, topk_ids=ids, activation=activation, quant=quant, bias2=b2)
    for act_dtype in ("bf16", "fp8", "fp4"):
        sep = fused_moe_torch(x, **common, **wkw, bias1=b1, act_dtype=act_dtype)
        inter = dict(wkw)
        inter["w1"] = convert_gate_up_order(wkw["w1"], "separated", "interleaved")
        if quant != "none":
            dim = -2 if quant == "mxfp4" else -1
            inter["w1_scale"] = convert_gate_up_order(wkw["w1_scale"], "separated", "interleaved", dim)
        b1i = convert_gate_up_order(b1, "separated", "interleaved", dim=-1)
        got = fused_moe_torch(x, **common, **inter, bias1=b1i, gate_mode="interleaved",
                              act_dtype=act_dtype)
        assert torch.equal(sep, got)


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("quant", ["none", "mxfp4", "fp8"])
def test_zero_tokens(quant):
    x, _, _, wkw, tw, ids, _, _ = make_case(quant)
    for backend in ("torch", "auto"):
        out = fused_moe(x[:0], topk_weights=tw[:0], topk_ids=ids[:0], quant=quant,
                        backend=backend, **wkw)
        assert out.shape == (0, H) and out.dtype == x.dtype


def test_one_token_and_experts_without_tokens():
    x, w1d, w2d, wkw, tw, ids, b1, b2 = make_case("mxfp4", bias=True)
    ids = torch.where(ids % 2 == 1, ids - 1, ids)  # only experts 0 and 2 are used
    for m in (1, M):
        want = reference(x[:m], w1d, w2d, tw[:m], ids[:m], act_dtype="fp8", b1=b1, b2=b2)
        got = fused_moe_torch(x[:m], topk_weights=tw[:m], topk_ids=ids[:m], quant="mxfp4",
                              act_dtype="fp8", bias1=b1, bias2=b2, **wkw)
        assert_close_aiter(got, want)


def test_expert_mask_equals_zero_weights():
    x, _, _, wkw, tw, ids, _, b2 = make_case("none", bias=True)
    mask = torch.tensor([1, 0, 1, 0], dtype=torch.int32)
    got = fused_moe_torch(x, topk_weights=tw, topk_ids=ids, expert_mask=mask, bias2=b2, **wkw)
    tw0 = torch.where(mask[ids] == 0, torch.zeros_like(tw), tw)
    want = fused_moe_torch(x, topk_weights=tw0, topk_ids=ids, bias2=b2, **wkw)
    torch.testing.assert_close(got, want)
    none = fused_moe_torch(x, topk_weights=tw, topk_ids=ids, expert_mask=torch.zeros(E, dtype=torch.bool),
                           bias2=b2, **wkw)
    assert torch.equal(none, torch.zeros_like(none))


def test_out_of_range_ids_error_or_masked():
    x, _, _, wkw, tw, ids, _, _ = make_case("none")
    bad = ids.clone()
    bad[2, 1] = E
    bad[4, 0] = -1
    with pytest.raises(ValueError, match="topk_ids"):
        fused_moe_torch(x, topk_weights=tw, topk_ids=bad, **wkw)
    got = fused_moe_torch(x, topk_weights=tw, topk_ids=bad, check_topk_ids=False, **wkw)
    tw0 = tw.clone()
    tw0[2, 1] = 0
    tw0[4, 0] = 0
    want = fused_moe_torch(x, topk_weights=tw0, topk_ids=ids, **wkw)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("act_dtype", ["bf16", "fp8", "fp4"])
@pytest.mark.parametrize("quant", ["none", "mxfp4", "fp8"])
def test_nan_stays_in_its_token(quant, act_dtype):
    x, _, _, wkw, tw, ids, b1, b2 = make_case(quant, bias=True)
    kw = dict(topk_weights=tw, topk_ids=ids, quant=quant, act_dtype=act_dtype, bias1=b1, bias2=b2, **wkw)
    clean = fused_moe_torch(x, **kw)
    xn = x.clone()
    xn[3, 5] = float("nan")
    got = fused_moe_torch(xn, **kw)
    assert torch.isnan(got[3]).any()
    others = [t for t in range(M) if t != 3]
    assert not torch.isnan(got[others]).any()
    torch.testing.assert_close(got[others], clean[others])


def test_apply_router_weight_on_input_differs_with_bias():
    # with bias1 the two placements of w give different results: the flag must be honoured
    x, _, _, wkw, tw, ids, b1, _ = make_case("none", bias=True)
    a = fused_moe_torch(x, topk_weights=tw, topk_ids=ids, bias1=b1, **wkw)
    b = fused_moe_torch(x, topk_weights=tw, topk_ids=ids, bias1=b1, apply_router_weight_on_input=True, **wkw)
    assert not torch.allclose(a, b)


def test_auto_act_dtype_follows_policy_and_precision(monkeypatch):
    monkeypatch.delenv("MOEPREC_FORCE_BF16_ACT", raising=False)
    x, _, _, wkw, tw, ids, _, _ = make_case("mxfp4")
    kw = dict(topk_weights=tw, topk_ids=ids, quant="mxfp4", **wkw)
    bf16 = fused_moe_torch(x, act_dtype="bf16", **kw)
    fp8 = fused_moe_torch(x, act_dtype="fp8", **kw)
    assert not torch.equal(bf16, fp8)
    monkeypatch.setenv("MOEPREC_BF16_FP8_BOUND", str(M))
    assert torch.equal(fused_moe_torch(x, **kw), fp8)  # M == bound -> fp8 on CPU
    monkeypatch.setenv("MOEPREC_BF16_FP8_BOUND", str(M + 1))
    assert torch.equal(fused_moe_torch(x, **kw), bf16)
    monkeypatch.setenv("MOEPREC_FORCE_BF16_ACT", "1")
    monkeypatch.setenv("MOEPREC_BF16_FP8_BOUND", "0")
    assert torch.equal(fused_moe_torch(x, **kw), bf16)
    monkeypatch.delenv("MOEPREC_FORCE_BF16_ACT")
    monkeypatch.delenv("MOEPREC_BF16_FP8_BOUND")
    cfg = SimpleNamespace(act_dtype="auto", bf16_fp8_bound=1, force_bf16_act=False)
    assert torch.equal(fused_moe_torch(x, precision=cfg, **kw), fp8)
    cfg = SimpleNamespace(act_dtype="auto", bf16_fp8_bound=0, force_bf16_act=True)
    assert torch.equal(fused_moe_torch(x, precision=cfg, **kw), bf16)


def test_one_expert_dequantized_at_a_time(monkeypatch):
    fm = importlib.import_module("moeprec.fused_moe_op")

    shapes = []
    real = fm.dequantize_mxfp4

    def spy(packed, scales, dtype=torch.bfloat16):
        shapes.append(tuple(packed.shape))
        return real(packed, scales, dtype=dtype)

    monkeypatch.setattr(fm, "dequantize_mxfp4", spy)
    x, _, _, wkw, tw, ids, _, _ = make_case("mxfp4")
    fused_moe_torch(x, topk_weights=tw, topk_ids=ids, quant="mxfp4", act_dtype="bf16", **wkw)
    assert shapes and all(s in [(2 * I, H // 2), (H, I // 2)] for s in shapes)
    assert len(shapes) == 2 * len(set(ids.flatten().tolist()))


# ----------------------------------------------------------------------------- backends


def test_backend_choice(monkeypatch):
    fm = importlib.import_module("moeprec.fused_moe_op")

    x, _, _, wkw, tw, ids, _, _ = make_case("none")
    calls = []

    def fake_triton(*args, **kwargs):
        calls.append(kwargs)
        return torch.zeros_like(args[0])

    monkeypatch.setattr(fm, "_load_triton", lambda: fake_triton)
    kw = dict(topk_weights=tw, topk_ids=ids, **wkw)
    fused_moe(x, backend="auto", **kw)  # CPU tensors: torch
    assert not calls
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fused_moe(x, backend="triton", **kw)
    assert calls and calls[0]["act_dtype"] == "bf16"  # resolved before the backend sees it
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        fused_moe(x, backend="triton", **kw)


@pytest.mark.parametrize("cap,fp8,backend,expect", [
    ((8, 0), True, "auto", "torch"),      # fp8 / MXFP4 kernels cannot compile for sm_80
    ((8, 0), False, "auto", "triton"),    # bf16 ones can
    ((8, 9), True, "auto", "triton"),
    ((9, 0), True, "triton", "triton"),
    ((8, 6), True, "triton", ValueError),
])
def test_backend_choice_by_compute_capability(cap, fp8, backend, expect, monkeypatch):
    # on CUDA devices below what the call's kernels need, "auto" takes the reference and an
    # explicit "triton" raises naming the capability (host-side: no GPU needed)
    import moeprec.backends as backends

    fm = importlib.import_module("moeprec.fused_moe_op")
    monkeypatch.setattr(backends, "cuda_capability", lambda device: cap)
    monkeypatch.setattr(backends, "triton_available", lambda module=None: True)
    monkeypatch.setattr(fm, "_load_triton", lambda: "triton")
    dev = torch.device("cuda", 0)
    if expect is ValueError:
        with pytest.raises(ValueError, match=r"backend: 'triton' needs .* capability 8\.9 .* is 8\.6"):
            fm._pick_backend(backend, dev, fp8)
        return
    impl = fm._pick_backend(backend, dev, fp8)
    assert (impl == "triton") == (expect == "triton")
    # while torch.compile traces, the check stays out of the graph (the kernels check eagerly)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert fm._pick_backend(backend, dev, fp8) == "triton"


def test_public_name_is_the_function_whatever_the_import_order():
    import moeprec.fused_moe_op

    assert moeprec.fused_moe is moeprec.fused_moe_op.fused_moe


# ----------------------------------------------------------------------------- bad input


def _bad_cases():
    x, _, _, wn, tw, ids, b1, b2 = make_case("none", bias=True)
    _, _, _, wm, _, _, _, _ = make_case("mxfp4")
    _, _, _, wf, _, _, _, _ = make_case("fp8")
    base_none = dict(hidden_states=x, topk_weights=tw, topk_ids=ids, **wn)
    base_mx = dict(base_none, quant="mxfp4", **wm)
    base_f8 = dict(base_none, quant="fp8", **wf)
    c = []

    def add(base, exc, name, **over):
        c.append(pytest.param(dict(base, **over), exc, name, id=f"{name}-{len(c)}"))

    add(base_none, TypeError, "hidden_states", hidden_states=x.float().numpy())
    add(base_none, ValueError, "hidden_states", hidden_states=x[None])
    add(base_none, TypeError, "hidden_states", hidden_states=x.double())
    add(base_none, TypeError, "hidden_states", hidden_states=x.int())
    add(base_none, ValueError, "w1", w1=wn["w1"][:, :, :-1])
    add(base_none, ValueError, "w1", w1=wn["w1"][:, :-1])
    add(base_none, ValueError, "w1", w1=wn["w1"][0])
    add(base_none, TypeError, "w1", w1=wn["w1"].to(torch.int8))
    add(base_none, TypeError, "w1", w1=None)
    add(base_none, ValueError, "w2", w2=wn["w2"][:-1])
    add(base_none, ValueError, "w2", w2=wn["w2"][:, :, :-1])
    add(base_none, TypeError, "w2", w2=wn["w2"].float())
    add(base_none, ValueError, "w1_scale", w1_scale=torch.ones(E, 2 * I))
    add(base_none, ValueError, "w2_scale", w2_scale=torch.ones(E, H))
    add(base_none, ValueError, "topk_ids", topk_ids=ids[:-1])
    add(base_none, ValueError, "topk_ids", topk_ids=ids[0])
    add(base_none, TypeError, "topk_ids", topk_ids=ids.float())
    add(base_none, ValueError, "topk_ids", topk_ids=ids + E)
    add(base_none, ValueError, "topk_weights", topk_weights=tw[:, :1])
    add(base_none, TypeError, "topk_weights", topk_weights=tw.long())
    add(base_none, ValueError, "bias1", bias1=b1[:, :-1])
    add(base_none, TypeError, "bias1", bias1=b1.long())
    add(base_none, ValueError, "bias2", bias2=b2[:-1])
    add(base_none, ValueError, "expert_mask", expert_mask=torch.ones(E + 1, dtype=torch.bool))
    add(base_none, TypeError, "expert_mask", expert_mask=[1] * E)
    add(base_none, ValueError, "quant", quant="int4")
    add(base_none, ValueError, "act_dtype", act_dtype="fp16")
    add(base_none, ValueError, "activation", activation="gelu")
    add(base_none, ValueError, "gate_mode", gate_mode="zigzag")
    add(base_none, ValueError, "backend", backend="cuda")
    add(base_none, TypeError, "swiglu_alpha", swiglu_alpha="1.7")
    add(base_none, ValueError, "swiglu_alpha", swiglu_alpha=float("nan"))
    add(base_none, ValueError, "swiglu_limit", swiglu_limit=0.0)
    add(base_none, TypeError, "apply_router_weight_on_input", apply_router_weight_on_input=1)
    add(base_none, TypeError, "check_topk_ids", check_topk_ids="no")
    add(base_none, ValueError, "precision.act_dtype", precision=SimpleNamespace(act_dtype="int8"))
    add(base_none, TypeError, "precision", precision="fp8")
    # mxfp4
    add(base_mx, TypeError, "w1", w1=wm["w1"].to(torch.int8))
    add(base_mx, ValueError, "w1", w1=wm["w1"][:, :, :-1])
    add(base_mx, ValueError, "w2", w2=wm["w2"][:, :, :-1])
    add(base_mx, TypeError, "w1_scale", w1_scale=None)
    add(base_mx, ValueError, "w1_scale", w1_scale=wm["w1_scale"][:, :, :-1])
    add(base_mx, TypeError, "w2_scale", w2_scale=wm["w2_scale"].float())
    add(base_mx, ValueError, "hidden size", hidden_states=x[:, :48], w1=wm["w1"][:, :, :24],
        w1_scale=wm["w1_scale"][:, :, :1])
    # fp8
    add(base_f8, TypeError, "w1", w1=wf["w1"].bfloat16())
    add(base_f8, ValueError, "w1_scale", w1_scale=wf["w1_scale"][:, :-1])
    add(base_f8, TypeError, "w2_scale", w2_scale=wf["w2_scale"].double())
    add(base_f8, TypeError, "w2_scale", w2_scale=None)
    # fp4 activations need multiples of 32
    add(base_none, ValueError, "fp4", act_dtype="fp4", hidden_states=x[:, :48],
        w1=wn["w1"][:, :, :48], w2=wn["w2"][:, :48], bias2=b2[:, :48])
    return c


@pytest.mark.parametrize("kwargs,exc,name", _bad_cases())
def test_bad_input_names_the_argument(kwargs, exc, name):
    kwargs = dict(kwargs)
    args = [kwargs.pop(n) for n in ("hidden_states", "w1", "w2", "topk_weights", "topk_ids")]
    with pytest.raises(exc, match=name):
        fused_moe(*args, backend=kwargs.pop("backend", "torch"), **kwargs)


def test_devices_must_match():
    meta = torch.device("meta")
    x, _, _, wkw, tw, ids, _, _ = make_case("none")
    with pytest.raises(ValueError, match="w1"):
        fused_moe(x, wkw["w1"].to(meta), wkw["w2"], tw, ids)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["none", "mxfp4", "fp8"])
def test_torch_backend_on_cuda_matches_cpu(quant):
    x, _, _, wkw, tw, ids, b1, b2 = make_case(quant, bias=True)
    kw = dict(quant=quant, act_dtype="fp8", bias1=b1, bias2=b2)
    cpu = fused_moe_torch(x, topk_weights=tw, topk_ids=ids, **wkw, **kw)
    cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in dict(wkw, **kw).items()}
    gpu = fused_moe_torch(x.cuda(), topk_weights=tw.cuda(), topk_ids=ids.cuda(), **cuda)
    assert_close_aiter(gpu.cpu(), cpu.float())


def test_reference_has_no_backend_argument():
    x, _, _, wkw, tw, ids, _, _ = make_case("none")
    with pytest.raises(TypeError, match="backend"):
        fused_moe_torch(x, topk_weights=tw, topk_ids=ids, backend="triton", **wkw)


# backend="triton" runs on CUDA tensors, or on CPU ones under TRITON_INTERPRET=1 (set by conftest
# when there is no GPU)
_TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _on(device, *tensors):
    return [t.to(device) for t in tensors]


def _on_dict(device, d):
    return {k: v.to(device) for k, v in d.items()}


@pytest.mark.parametrize("backend,act_dtype", [
    ("torch", "bf16"), ("torch", "fp8"), ("triton", "bf16"),
    ("triton", "fp8"),
])
def test_nan_scale_block_stays_in_its_experts_tokens(backend, act_dtype):
    """A 0xFF (NaN) E8M0 scale in expert e poisons only the outputs of tokens routed to e:
    a w1 block -> the whole rows of those tokens; a w2 block -> their one output column."""
    dev = _TRITON_DEVICE if backend == "triton" else "cpu"
    x, _, _, wkw, tw, ids, _, _ = make_case("mxfp4")
    e = int(ids[0, 0])
    routed = (ids == e).any(dim=1)
    assert 0 < int(routed.sum()) < M  # some tokens go to e, some do not
    x, tw, ids = _on(dev, x, tw, ids)
    wkw = _on_dict(dev, wkw)
    kw = dict(topk_weights=tw, topk_ids=ids, quant="mxfp4", act_dtype=act_dtype, backend=backend)

    s1 = wkw["w1_scale"].clone()
    s1[e, 3, 1] = 0xFF
    out = fused_moe(x, **dict(wkw, w1_scale=s1), **kw).cpu()
    assert torch.equal(out.isnan().all(dim=1), routed)
    assert torch.isfinite(out[~routed]).all()

    s2 = wkw["w2_scale"].clone()
    s2[e, 5, 0] = 0xFF
    out = fused_moe(x, **dict(wkw, w2_scale=s2), **kw).cpu()
    want = torch.zeros(M, H, dtype=torch.bool)
    want[routed, 5] = True
    assert torch.equal(out.isnan(), want)

    # the same expert masked off: no NaN anywhere
    mask = torch.ones(E, dtype=torch.bool, device=dev)
    mask[e] = False
    out = fused_moe(x, **dict(wkw, w1_scale=s1), expert_mask=mask, **kw)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend,act_dtype", [
    ("torch", "bf16"), ("torch", "fp8"), ("torch", "fp4"), ("triton", "bf16"), ("triton", "fp4"),
    ("triton", "fp8"),
])
def test_nan_in_x_gives_nan_in_that_token_only_on_every_backend(backend, act_dtype):
    dev = _TRITON_DEVICE if backend == "triton" else "cpu"
    x, _, _, wkw, tw, ids, _, _ = make_case("mxfp4")
    x = x.clone()
    x[2, 5] = float("nan")
    x, tw, ids = _on(dev, x, tw, ids)
    out = fused_moe(x, topk_weights=tw, topk_ids=ids, quant="mxfp4", act_dtype=act_dtype,
                    backend=backend, **_on_dict(dev, wkw)).cpu()
    want = torch.zeros(M, dtype=torch.bool)
    want[2] = True
    assert torch.equal(out.isnan().any(dim=1), want)
