"""MoE layer: per-token reference, bookkeeping, losses, precision threading, quantize_, compile."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import moeprec.fused_moe_op
from moeprec import MoE, MoEArgs, PrecisionConfig
from moeprec.activations import gated_activation
from moeprec.experts import GroupedExperts
from moeprec.reorder import combine_expert_outputs, reorder_tokens
from moeprec.formats.fp8 import dequantize_fp8
from moeprec.formats.mxfp4 import dequantize_mxfp4
from tests._metrics import assert_close_aiter, cos_diff

DIM, HIDDEN = 32, 32


def _moe(dim=DIM, hidden=HIDDEN, precision=None, std=0.2, **kw):
    kw.setdefault("num_experts", 4)
    kw.setdefault("top_k", 2)
    m = MoE(MoEArgs(**kw), dim, hidden, precision=precision)
    m.init_weights(std)  # larger than default so routing and activations are far from trivial
    with torch.no_grad():
        for mlp in (m.experts, m.shared_experts):
            if mlp is not None and mlp.b1 is not None:
                mlp.b1.normal_(0, 0.5)
                mlp.b2.normal_(0, 0.5)
        if m.router.gate.bias is not None:
            m.router.gate.bias.normal_(0, 0.5)
    return m


def _mlp(mlp, e, x):
    h = x @ mlp.w1[e].double().T
    if mlp.b1 is not None:
        h = h + mlp.b1[e].double()
    z = gated_activation(h, mlp.activation, mlp.gate_mode, mlp.swiglu_alpha, mlp.swiglu_limit)
    y = z @ mlp.w2[e].double().T
    return y if mlp.b2 is None else y + mlp.b2[e].double()


def reference_moe(m, x):
    """One token at a time in fp64, written from SPEC 2 and 4 (no reorder, no grouped GEMM)."""
    a = m.args
    gate = m.router.gate
    out = []
    for xt in x.reshape(-1, m.dim).double():
        logits = xt @ gate.weight.double().T
        if gate.bias is not None:
            logits = logits + gate.bias.double()
        scores = logits.softmax(-1) if a.score_func == "softmax" else logits.sigmoid()
        choice = scores if m.expert_bias is None else scores + m.expert_bias.double()
        idx = choice.topk(a.top_k).indices
        s = scores[idx]
        if a.route_norm:
            s = s / (s.sum() + 1e-20)
        s = s * a.route_scale
        y = torch.zeros(m.dim, dtype=torch.float64)
        for j, e in enumerate(idx.tolist()):
            if a.score_before_experts:
                y = y + _mlp(m.experts, e, xt * s[j])
            else:
                y = y + s[j] * _mlp(m.experts, e, xt)
        if m.shared_experts is not None:
            y = y + _mlp(m.shared_experts, 0, xt)
        out.append(y)
    return torch.stack(out).reshape(x.shape) if out else x.double().clone()


CONFIGS = [
    dict(top_k=1),
    dict(top_k=2, route_norm=True),
    dict(top_k=3, score_func="sigmoid", route_norm=True, route_scale=2.5),
    dict(top_k=2, score_before_experts=True),
    dict(top_k=2, num_shared_experts=2),
    dict(top_k=2, activation="swiglu_oai", gate_mode="interleaved", mlp_bias=True, gate_bias=True),
    dict(top_k=2, num_experts=8, load_balance_coeff=1e-3, score_func="sigmoid"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_forward_and_grads_match_per_token_reference(cfg):
    m = _moe(**cfg)
    if m.expert_bias is not None:
        with torch.no_grad():
            m.expert_bias.normal_(0, 0.05)
    x = torch.randn(3, 7, DIM, requires_grad=True)
    out = m(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    ref = reference_moe(m, x)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)

    g = torch.randn_like(out)
    out.backward(g)
    got = {n: p.grad.clone() for n, p in m.named_parameters()}
    gx = x.grad.clone()
    m.zero_grad()
    x.grad = None
    reference_moe(m, x).backward(g.double())
    for n, p in m.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
    torch.testing.assert_close(gx, x.grad, rtol=1e-4, atol=1e-5)
    assert got["router.gate.weight"].abs().max() > 0  # the router learns through the scores


def test_shapes_empty_and_single_token():
    m = _moe()
    assert m(torch.randn(0, DIM)).shape == (0, DIM)
    assert m(torch.randn(2, 0, DIM)).shape == (2, 0, DIM)
    one = torch.randn(DIM)
    torch.testing.assert_close(m(one), m(one[None])[0])
    torch.testing.assert_close(m(one).double(), reference_moe(m, one[None])[0], rtol=1e-4, atol=1e-5)


def test_bf16_model_close_to_fp32():
    m = _moe(num_shared_experts=1)
    x = torch.randn(16, DIM)
    ref = m(x)
    mb = _moe(num_shared_experts=1).to(torch.bfloat16)
    mb.load_state_dict(m.state_dict())
    out = mb(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert_close_aiter(out.float(), ref, rtol=5e-2, atol=5e-2)


def test_tokens_per_expert_counted_in_training_only():
    m = _moe(num_experts=4, top_k=2)
    x = torch.randn(10, DIM)
    m.eval()
    m(x)
    assert m.tokens_per_expert.abs().max() == 0
    m.train()
    m(x)
    m(x)
    _, selected, _ = m.router(x)
    want = 2 * torch.bincount(selected.flatten(), minlength=4).float()
    assert m.tokens_per_expert.dtype == torch.float32
    torch.testing.assert_close(m.tokens_per_expert, want)
    assert m.tokens_per_expert.sum() == 2 * 10 * 2
    assert "tokens_per_expert" not in m.state_dict()


def test_expert_bias_update_across_steps():
    m = _moe(num_experts=4, top_k=1, load_balance_coeff=0.01)
    assert m.expert_bias.dtype == torch.float32 and "expert_bias" in m.state_dict()
    with torch.no_grad():  # make expert 0 win for every token
        m.router.gate.weight.zero_()
        m.router.gate.weight[0].fill_(1.0)
    x = torch.rand(32, DIM)
    biases = []
    for _ in range(3):
        m(x)
        counts = m.tokens_per_expert.clone()
        before = m.expert_bias.clone()
        m.update_expert_bias()
        delta = 0.01 * torch.sign(counts.mean() - counts)
        torch.testing.assert_close(m.expert_bias, before + delta - delta.mean())
        assert m.tokens_per_expert.abs().max() == 0
        biases.append(m.expert_bias.clone())
    assert biases[-1][0] < biases[0][0] < 0  # the overloaded expert keeps losing bias
    assert (biases[-1][1:] > 0).all()


def test_update_without_load_balancing_resets_counts():
    m = _moe()
    assert m.expert_bias is None
    m(torch.randn(4, DIM))
    m.update_expert_bias()
    assert m.tokens_per_expert.abs().max() == 0


def test_aux_loss():
    m = _moe(num_experts=4, top_k=2, aux_loss_coeff=0.1, z_loss_coeff=0.01)
    x = torch.randn(12, DIM)
    m(x)
    r = m.router.route(x)
    f = torch.bincount(r.selected_experts.flatten(), minlength=4).float() / (12 * 2)
    want = 0.1 * 4 * (f * r.scores.mean(0)).sum() + 0.01 * (torch.logsumexp(r.logits.float(), -1) ** 2).mean()
    assert m.aux_loss.dim() == 0
    torch.testing.assert_close(m.aux_loss, want)
    m.aux_loss.backward()
    assert m.router.gate.weight.grad.abs().max() > 0
    m.eval()
    m(x)
    assert m.aux_loss is None
    m2 = _moe()
    m2(x)
    assert m2.aux_loss is None


def test_precision_config_threads_router_dtype():
    args = dict(router_dtype="fp32")
    assert _moe(**args).router.gate.router_dtype == torch.float32
    assert _moe(**args, precision=PrecisionConfig(moe_router_dtype="fp64")).router.gate.router_dtype == torch.float64
    assert _moe(**args, precision=PrecisionConfig(moe_router_dtype=None)).router.gate.router_dtype is None
    assert _moe().router.gate.router_dtype is None
    # an fp64 router: logits and scores in fp64, still a fp32 model
    m = _moe(precision=PrecisionConfig(moe_router_dtype="fp64"))
    assert m.router.route(torch.randn(3, DIM)).logits.dtype == torch.float64
    assert m(torch.randn(3, DIM)).dtype == torch.float32


def test_precision_act_policy_reaches_fused_moe(monkeypatch):
    prec = PrecisionConfig(act_dtype="fp8")
    m = _moe(precision=prec, mlp_bias=True, activation="swiglu_oai", gate_mode="interleaved")
    m.eval()
    m.quantize_("mxfp4")
    seen = {}
    real = moeprec.fused_moe_op.fused_moe

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(moeprec.fused_moe_op, "fused_moe", spy)
    x = torch.randn(9, DIM)
    out = m(x)
    assert seen["precision"] is prec and seen["quant"] == "mxfp4"
    assert seen["activation"] == "swiglu_oai" and seen["gate_mode"] == "interleaved"
    assert seen["bias1"].dtype == torch.float32
    top, sel, _ = m.router(x)
    e = m.experts
    direct = real(x, e.w1, e.w2, top, sel, activation="swiglu_oai", gate_mode="interleaved",
                  quant="mxfp4", w1_scale=e.w1_scale, w2_scale=e.w2_scale, act_dtype="fp8",
                  bias1=e.b1, bias2=e.b2)
    torch.testing.assert_close(out, direct)
    bf16 = real(x, e.w1, e.w2, top, sel, activation="swiglu_oai", gate_mode="interleaved",
                quant="mxfp4", w1_scale=e.w1_scale, w2_scale=e.w2_scale, act_dtype="bf16",
                bias1=e.b1, bias2=e.b2)
    assert (out - bf16).abs().max() > 0  # the fp8 policy really changed the activations


@pytest.mark.parametrize("quant", ["fp8", "mxfp4"])
@pytest.mark.parametrize("cfg", [dict(), dict(score_before_experts=True, num_shared_experts=1),
                                 dict(mlp_bias=True, activation="swiglu_oai", gate_mode="interleaved")])
def test_quantize_then_forward(quant, cfg):
    m = _moe(dim=64, hidden=64, std=0.1, **cfg).eval()
    x = torch.randn(24, 64)
    ref = m(x)
    deq = copy.deepcopy(m)
    m.quantize_(quant)
    e = m.experts
    assert m.quant == quant and e.w1.dtype == {"fp8": torch.float8_e4m3fn, "mxfp4": torch.uint8}[quant]
    assert {"experts.w1", "experts.w1_scale", "experts.w2_scale"} <= set(m.state_dict())
    # the same layer with the dequantized weights, through GroupedExperts
    with torch.no_grad():
        if quant == "mxfp4":
            deq.experts.w1.copy_(dequantize_mxfp4(e.w1, e.w1_scale, torch.float32))
            deq.experts.w2.copy_(dequantize_mxfp4(e.w2, e.w2_scale, torch.float32))
        else:
            deq.experts.w1.copy_(dequantize_fp8(e.w1, e.w1_scale.unsqueeze(-1)))
            deq.experts.w2.copy_(dequantize_fp8(e.w2, e.w2_scale.unsqueeze(-1)))
    out = m(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if quant == "mxfp4":  # 24 tokens: bf16-policy activations, fp32 here -> the same math
        torch.testing.assert_close(out, deq(x), rtol=1e-5, atol=1e-5)
        assert cos_diff(out, ref) < 5e-2  # MXFP4 weights vs the fp32 originals
    else:  # fp8 activations on top of fp8 weights
        assert_close_aiter(out, deq(x), rtol=5e-2, atol=5e-2, max_cos_diff=2e-3)
        assert_close_aiter(out, ref, rtol=0.1, atol=5e-2, max_cos_diff=5e-3)
    with pytest.raises(RuntimeError, match="quantized"):
        m.experts(x, torch.tensor([24, 0, 0, 0]))


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_compile_fullgraph_matches_eager_without_recompiles(backend):
    torch._dynamo.reset()
    m = _moe(num_shared_experts=1, load_balance_coeff=1e-3, aux_loss_coeff=0.01, z_loss_coeff=1e-3)
    counter = CompileCounterWithBackend(backend)
    f = torch.compile(m, fullgraph=True, backend=counter)
    for step in range(3):
        x = torch.randn(2, 6, DIM, requires_grad=True)
        out = f(x)
        (out.square().sum() + m.aux_loss).backward()
        got = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
        aux, counts = m.aux_loss.detach(), m.tokens_per_expert.clone()
        m.zero_grad()
        x.grad = None
        ref = m(x)
        (ref.square().sum() + m.aux_loss).backward()
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(aux, m.aux_loss.detach())
        for a, b in zip(got, [x.grad] + [p.grad for p in m.parameters()]):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(m.tokens_per_expert, 2 * counts)  # compiled and eager counted alike
        assert counts.sum() == 12 * 2
        m.zero_grad()
        m.update_expert_bias()  # routing (and thus per-expert counts) changes every step
    assert counter.frame_count == 1


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MOEPREC_SLOW"), reason="inductor compile of the layer: ~1 min on CPU (MOEPREC_SLOW=1)")
def test_compile_inductor_forward_backward():
    torch._dynamo.reset()
    m = _moe(num_shared_experts=1)
    f = torch.compile(m, fullgraph=True)
    x = torch.randn(12, DIM, requires_grad=True)
    out = f(x)
    out.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    ref = m(x)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx, x.grad, rtol=1e-4, atol=1e-5)


def test_reorder_and_combine_helpers():
    selected = torch.tensor([[2, 0], [0, 1], [2, 1]])
    scores = torch.tensor([[0.5, 0.25], [0.75, 0.125], [1.0, 2.0]])
    r = reorder_tokens(scores, selected)
    assert r.order.tolist() == [1, 2, 3, 5, 0, 4]  # expert 0, 1, 2; slot order kept within one
    assert r.token_indices.tolist() == [0, 1, 1, 2, 0, 2]
    assert r.scores.tolist() == [0.25, 0.75, 0.125, 2.0, 0.5, 1.0]
    out = torch.randn(6, 3)
    combined = combine_expert_outputs(out, r, scores)
    want = torch.stack([0.25 * out[0] + 0.5 * out[4], 0.75 * out[1] + 0.125 * out[2], 2.0 * out[3] + out[5]])
    torch.testing.assert_close(combined, want)
    torch.testing.assert_close(combine_expert_outputs(out, r, scores, True),
                               torch.stack([out[0] + out[4], out[1] + out[2], out[3] + out[5]]))
    assert combine_expert_outputs(out.bfloat16(), r, scores).dtype == torch.float32


@pytest.mark.parametrize("score_before", [False, True])
def test_combine_gradients_and_what_it_keeps_for_backward(score_before):
    t, k, d, e = 7, 3, 5, 4
    g = torch.Generator().manual_seed(1)
    selected = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    scores = torch.rand(t, k, generator=g, dtype=torch.float64).requires_grad_()
    out = torch.randn(t * k, d, generator=g, dtype=torch.float64).requires_grad_()
    r = reorder_tokens(scores, selected)
    torch.autograd.gradcheck(lambda o, s: combine_expert_outputs(o, r, s, score_before), (out, scores))
    # bf16 expert outputs: backward keeps the outputs themselves for the scores' gradient (no
    # un-permuted or fp32 copy), and nothing of their size when the sum is unweighted
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        combine_expert_outputs(out.detach().bfloat16().requires_grad_(), r,
                               scores.detach().float().requires_grad_(), score_before)
    big = [(x.dtype, tuple(x.shape)) for x in saved if x.numel() >= t * k * d]
    assert big == ([] if score_before else [(torch.bfloat16, (t * k, d))]), big


def test_balancing_buffers_stay_fp32_under_dtype_casts():
    m = _moe(load_balance_coeff=1e-3).to(torch.bfloat16)
    assert m.experts.w1.dtype == torch.bfloat16
    assert m.expert_bias.dtype == torch.float32 and m.tokens_per_expert.dtype == torch.float32
    m(torch.randn(300, DIM, dtype=torch.bfloat16))
    assert m.tokens_per_expert.sum() == 600  # exact beyond bf16's 256
    m.update_expert_bias()


def test_nan_token_stays_in_its_row():
    m = _moe(num_shared_experts=1)
    x = torch.randn(9, DIM)
    ref = m(x)
    x[4, 3] = float("nan")
    out = m(x)
    assert torch.isnan(out[4]).all()
    keep = torch.arange(9) != 4
    torch.testing.assert_close(out[keep], ref[keep])


def test_shared_experts_shape():
    m = _moe(num_shared_experts=3)
    assert isinstance(m.shared_experts, GroupedExperts)
    assert m.shared_experts.w1.shape == (1, 2 * HIDDEN * 3, DIM)
    assert _moe().shared_experts is None


def test_bad_input():
    m = _moe()
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(4, DIM + 1))
    with pytest.raises(TypeError, match="x"):
        m(torch.ones(4, DIM, dtype=torch.int64))
    with pytest.raises(TypeError, match="args"):
        MoE({"num_experts": 4}, DIM, HIDDEN)
    with pytest.raises(TypeError, match="precision"):
        MoE(MoEArgs(), DIM, HIDDEN, precision="fp32")
    with pytest.raises(ValueError, match="quant"):
        m.quantize_("int4")
    with pytest.raises(ValueError, match="hidden_dim"):
        _moe(dim=32, hidden=48).quantize_("mxfp4")
    with pytest.raises(ValueError, match="dim"):
        MoE(MoEArgs(), 0, HIDDEN)


def test_plain_formula_one_expert():
    """With a single expert and top_k=1 the layer is a plain SwiGLU MLP scaled by 1 (softmax)."""
    m = _moe(num_experts=1, top_k=1)
    x = torch.randn(5, DIM)
    g, u = F.linear(x, m.experts.w1[0]).chunk(2, -1)
    torch.testing.assert_close(m(x), F.linear(F.silu(g) * u, m.experts.w2[0]))


# ------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_compiled_moe_matches_eager_without_host_sync():
    torch._dynamo.reset()
    m = MoE(MoEArgs(num_experts=8, top_k=2, num_shared_experts=1, load_balance_coeff=1e-3,
                    aux_loss_coeff=0.01), 256, 128, precision=PrecisionConfig()).cuda().bfloat16()
    m.init_weights(0.05)
    f = torch.compile(m, fullgraph=True)
    x = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = f(x)
    (out.float().square().mean() + m.aux_loss).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # the compiled forward never syncs
    try:
        out = f(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = m(x)
    assert_close_aiter(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    assert m.router.route(x.reshape(-1, 256)).logits.dtype == torch.float32


def test_load_quantized_experts_from_gpt_oss_tensors():
    """gpt-oss MXFP4 tensors (interleaved rows, bf16 biases) -> load_quantized_ -> same layer."""
    from moeprec.integrations.gpt_oss import MXFP4Experts, from_gpt_oss, to_gpt_oss

    cfg = dict(mlp_bias=True, activation="swiglu_oai", gate_mode="interleaved")
    m = _moe(dim=64, hidden=32, std=0.1, **cfg).eval()
    with torch.no_grad():  # biases exact in bf16, as a gpt-oss checkpoint stores them
        m.experts.b1.copy_(m.experts.b1.bfloat16())
        m.experts.b2.copy_(m.experts.b2.bfloat16())
    fresh = copy.deepcopy(m)
    m.quantize_("mxfp4")
    e = m.experts
    tensors = to_gpt_oss(MXFP4Experts(e.w1, e.w1_scale, e.w2, e.w2_scale, e.b1, e.b2, "interleaved"), layer=3)
    loaded = from_gpt_oss(tensors, layer=3)
    fresh.experts.load_quantized_("mxfp4", loaded.w1, loaded.w1_scale, loaded.w2, loaded.w2_scale,
                                  loaded.bias1, loaded.bias2)
    assert fresh.quant == "mxfp4"
    x = torch.randn(10, 64)
    torch.testing.assert_close(fresh(x), m(x))
    with pytest.raises(ValueError, match="w1"):
        GroupedExperts(64, 32, 4, bias=True).load_quantized_(
            "mxfp4", loaded.w1[:, :, :-1], loaded.w1_scale, loaded.w2, loaded.w2_scale, loaded.bias1, loaded.bias2)
    with pytest.raises(RuntimeError, match="already quantized"):
        fresh.experts.load_quantized_("mxfp4", loaded.w1, loaded.w1_scale, loaded.w2, loaded.w2_scale)


@pytest.mark.parametrize("cfg", [dict(), dict(score_before_experts=True),
                                 dict(mlp_bias=True, activation="swiglu_oai", gate_mode="interleaved")])
def test_same_layout_and_math_as_fused_moe(cfg):
    """The trainable path and fused_moe (quant="none", torch backend) agree on the same weights."""
    m = _moe(**cfg)
    x = torch.randn(11, DIM)
    top, sel, _ = m.router(x)
    e = m.experts
    want = moeprec.fused_moe_op.fused_moe(
        x, e.w1, e.w2, top, sel, activation=e.activation, gate_mode=e.gate_mode, bias1=e.b1, bias2=e.b2,
        apply_router_weight_on_input=m.args.score_before_experts, backend="torch")
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant", ["fp8", "mxfp4"])
def test_dtype_cast_after_quantize_keeps_the_quantized_buffers(quant):
    # `.bfloat16()` used to turn fp8 weights and fp32 scales/biases into bf16 (fp8: forward then
    # raised; the scales' and biases' bits were lost)
    torch.manual_seed(0)
    m = MoE(MoEArgs(num_experts=4, top_k=2, mlp_bias=True), 32, 32).eval()
    with torch.no_grad():
        m.experts.b1.normal_(0, 0.1)
        m.experts.b2.normal_(0, 0.1)
    m.router.bfloat16()
    m.quantize_(quant)
    before = {n: b.clone() for n, b in m.experts.named_buffers()}
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    want = m(x)
    m.bfloat16()
    for name, buf in m.experts.named_buffers():
        assert buf.dtype == before[name].dtype, name
        assert torch.equal(buf.view(torch.uint8), before[name].view(torch.uint8)), name
    torch.testing.assert_close(m(x), want, rtol=0, atol=0)
    m.float()  # the router follows the cast; the experts' buffers do not
    assert m.router.gate.weight.dtype == torch.float32
    assert m.experts.w1_scale.dtype == before["w1_scale"].dtype


def test_deepcopy_after_a_training_forward():
    args = MoEArgs(num_experts=4, top_k=2, aux_loss_coeff=0.01)
    moe = MoE(args, dim=16, hidden_dim=8).train()
    x = torch.randn(10, 16)
    moe(x).sum().backward()
    assert moe.aux_loss is not None and moe.aux_loss.grad_fn is not None
    clone = copy.deepcopy(moe)
    assert clone.aux_loss is None and moe.aux_loss is not None
    assert clone.experts.w1 is not moe.experts.w1
    assert torch.equal(clone.experts.w1, moe.experts.w1)
    clone.eval(), moe.eval()
    assert torch.equal(clone(x), moe(x))
