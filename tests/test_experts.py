"""GroupedExperts: grouped GEMM paths vs the loop reference, gradients, compile, bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from moeprec.activations import gated_activation
from moeprec.experts import (
    GroupedExperts,
    _grouped_mm_loop,
    grouped_experts_loop,
    grouped_mm,
    native_grouped_mm_supported,
)

CASES = [("silu", "separated"), ("swiglu_oai", "interleaved")]


def _experts(activation, gate_mode, bias, dtype=torch.float32, dim=16, hidden=8, num_experts=4):
    m = GroupedExperts(dim, hidden, num_experts, activation=activation, gate_mode=gate_mode, bias=bias, dtype=dtype)
    m.init_weights(0.3)  # larger than default so the activation's nonlinearity matters
    if bias:
        with torch.no_grad():
            m.b1.normal_()
            m.b2.normal_()
    return m


def _per_token_reference(m, x, counts):
    """Independent of the module: expert of each token from the counts, one token at a time, fp64."""
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts)), counts)
    out = []
    for t, e in enumerate(expert_of_row.tolist()):
        h = x[t].double() @ m.w1[e].double().T
        if m.b1 is not None:
            h = h + m.b1[e].double()
        z = gated_activation(h, m.activation, m.gate_mode, m.swiglu_alpha, m.swiglu_limit)
        y = z @ m.w2[e].double().T
        if m.b2 is not None:
            y = y + m.b2[e].double()
        out.append(y)
    return torch.stack(out) if out else x.new_zeros(0, m.dim, dtype=torch.float64)


@pytest.mark.parametrize("activation,gate_mode", CASES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 0, 1], [0, 0, 0, 0], [7, 0, 0, 0]])
def test_forward_matches_references(activation, gate_mode, bias, counts):
    m = _experts(activation, gate_mode, bias)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), 16)
    out = m(x, counts)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.double(), _per_token_reference(m, x, counts), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, grouped_experts_loop(x, counts, m.w1, m.w2, m.b1, m.b2, activation, gate_mode))


@pytest.mark.parametrize("activation,gate_mode", CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_gradients_match_loop_reference(activation, gate_mode, bias):
    m = _experts(activation, gate_mode, bias)
    counts = torch.tensor([4, 0, 1, 6])
    x = torch.randn(11, 16, requires_grad=True)
    g = torch.randn(11, 16)
    m(x, counts).backward(g)
    got = [x.grad] + [p.grad for p in m.parameters()]
    x2 = x.detach().clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    w1, w2, *b = params
    b1, b2 = b if bias else (None, None)
    grouped_experts_loop(x2, counts, w1, w2, b1, b2, activation, gate_mode).backward(g)
    want = [x2.grad] + [p.grad for p in params]
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-6)
    assert m.w1.grad[1].abs().max() == 0  # expert without tokens gets no gradient


@pytest.mark.parametrize("activation,gate_mode", CASES)
def test_gradcheck_fp64(activation, gate_mode):
    m = _experts(activation, gate_mode, bias=True, dtype=torch.float64, dim=4, hidden=2, num_experts=3)
    counts = torch.tensor([2, 0, 3])
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)

    def f(x, w1, w2, b1, b2):
        return torch.func.functional_call(m, {"w1": w1, "w2": w2, "b1": b1, "b2": b2}, (x, counts))

    assert torch.autograd.gradcheck(f, (x, *[p.detach().clone().requires_grad_() for p in m.parameters()]))


@pytest.mark.skipif(not native_grouped_mm_supported("cpu", torch.bfloat16), reason="no CPU _grouped_mm")
def test_native_grouped_mm_matches_loop_bf16_and_takes_expanded_grad():
    a = torch.randn(20, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(3, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    offs = torch.tensor([5, 5, 20], dtype=torch.int32)
    out = grouped_mm(a, w.transpose(-2, -1), offs)
    ref = _grouped_mm_loop(a.float(), w.float().transpose(-2, -1), offs)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    out.sum().backward()  # expanded (stride-0) incoming gradient: the trap this path guards
    ga, gw = a.grad.clone(), w.grad.clone()
    a.grad = w.grad = None
    ref = _grouped_mm_loop(a, w.transpose(-2, -1), offs)
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(ga, a.grad)
    torch.testing.assert_close(gw, w.grad)
    assert gw[1].abs().max() == 0


@pytest.mark.parametrize("counts", [[0, 0, 0, 0], [0, 0, 1, 0], [3, 0, 13, 0]])
def test_bf16_edge_counts_forward_backward(counts):
    """bf16 takes the native grouped GEMM where torch has it: empty, single-row and idle experts."""
    m = _experts("silu", "separated", bias=True, dtype=torch.bfloat16)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), 16, dtype=torch.bfloat16, requires_grad=True)
    out = m(x, counts)
    out.sum().backward()
    w = {n: p.detach().float() for n, p in m.named_parameters()}
    ref = grouped_experts_loop(x.detach().float(), counts, w["w1"], w["w2"], w["b1"], w["b2"])
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    idle = counts == 0
    assert m.w1.grad[idle].abs().sum() == 0 and m.b1.grad[idle].abs().sum() == 0
    assert torch.isfinite(m.w1.grad).all()


def test_bf16_module_close_to_fp32():
    m = _experts("silu", "separated", bias=False)
    counts = torch.tensor([3, 9, 0, 4])
    x = torch.randn(16, 16)
    ref = m(x, counts)
    mb = _experts("silu", "separated", bias=False, dtype=torch.bfloat16)
    mb.load_state_dict({k: v.bfloat16() for k, v in m.state_dict().items()})
    out = mb(x.bfloat16(), counts)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=2e-2)
    out.float().sum().backward()
    assert torch.isfinite(mb.w1.grad).all() and mb.w1.grad.abs().max() > 0


def test_rows_past_the_counts_give_zeros():
    m = _experts("silu", "separated", bias=True)
    x, counts = torch.randn(9, 16), torch.tensor([2, 3, 0, 1])
    out = m(x, counts)
    assert out[6:].abs().max() == 0 and out[:6].abs().min() > 0
    # without the zeroing pass (MoE's counts cover every row) the counted rows are the same
    assert torch.equal(m(x, counts, zero_uncounted_rows=False)[:6], out[:6])
    with pytest.raises(TypeError, match="zero_uncounted_rows"):
        m(x, counts, zero_uncounted_rows=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unchecked_counts_are_clamped_in_bounds(dtype):
    """Under compile (as on GPU) counts are not checked: they are clamped, never read past x."""
    m = _experts("silu", "separated", bias=True, dtype=dtype)
    f = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(10, 16, dtype=dtype)
    torch.testing.assert_close(f(x, torch.tensor([5, 5, 5, 5])), m(x, torch.tensor([5, 5, 0, 0])))
    torch.testing.assert_close(f(x, torch.tensor([4, -3, 2, 1])), m(x, torch.tensor([4, 0, 2, 1])))


def test_single_expert_dense_path_matches_grouped():
    m = _experts("swiglu_oai", "interleaved", bias=True, num_experts=1)
    x = torch.randn(7, 16)
    torch.testing.assert_close(m(x), m(x, torch.tensor([7])))


def test_init_weights():
    m = GroupedExperts(64, 32, 8, bias=True)
    m.init_weights(0.05)
    assert abs(m.w1.std().item() - 0.05) < 0.01 and abs(m.w2.std().item() - 0.05) < 0.01
    assert m.b1.abs().max() == 0 and m.b2.abs().max() == 0
    assert m.w1.shape == (8, 64, 64) and m.w2.shape == (8, 64, 32)
    assert m.b1.shape == (8, 64) and m.b2.shape == (8, 64)


# aot_eager traces dynamo and autograd (the graph-break and recompile questions); inductor once
# for the custom-op path (the GPU tests compile the native bf16 path with inductor).
@pytest.mark.parametrize(
    "backend,dtype",
    [("aot_eager", torch.float32), ("aot_eager", torch.bfloat16), ("inductor", torch.float32)],
)
def test_compile_fullgraph_no_recompile(backend, dtype):
    torch._dynamo.reset()
    m = _experts("silu", "separated", bias=True, dtype=dtype)
    counter = CompileCounterWithBackend(backend)
    f = torch.compile(m, fullgraph=True, backend=counter)
    for counts in ([3, 0, 5, 2], [1, 4, 4, 1], [0, 0, 10, 0]):
        counts = torch.tensor(counts)
        x = torch.randn(10, 16, dtype=dtype, requires_grad=True)
        out = f(x, counts)
        out.sum().backward()
        gx, gw = x.grad.clone(), m.w1.grad.clone()
        x.grad = None
        m.zero_grad()
        ref = m(x, counts)
        ref.sum().backward()
        for a, b in ((out, ref), (gx, x.grad), (gw, m.w1.grad)):
            if dtype == torch.float32:
                torch.testing.assert_close(a, b)
            else:  # inductor fuses bf16 roundings differently: compare relative error norms
                assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2
        m.zero_grad()
    assert counter.frame_count == 1


def test_bad_input():
    m = GroupedExperts(16, 8, 4)
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(5, 15), torch.tensor([5, 0, 0, 0]))
    with pytest.raises(ValueError, match="num_tokens_per_expert"):
        m(torch.randn(5, 16), torch.tensor([5, 0, 0]))
    with pytest.raises(TypeError, match="num_tokens_per_expert"):
        m(torch.randn(5, 16), torch.tensor([5.0, 0, 0, 0]))
    with pytest.raises(ValueError, match="num_tokens_per_expert"):
        m(torch.randn(5, 16))
    with pytest.raises(ValueError, match="num_tokens_per_expert.*summing"):
        m(torch.randn(5, 16), torch.tensor([3, 3, 0, 0]))
    with pytest.raises(ValueError, match="num_tokens_per_expert.*non-negative"):
        m(torch.randn(5, 16), torch.tensor([3, -1, 3, 0]))
    with pytest.raises(TypeError, match="x"):
        m([[1.0] * 16], torch.tensor([1, 0, 0, 0]))
    with pytest.raises(TypeError, match="x"):
        m(torch.ones(1, 16, dtype=torch.int64), torch.tensor([1, 0, 0, 0]))
    with pytest.raises(ValueError, match="activation"):
        GroupedExperts(16, 8, 4, activation="gelu")
    with pytest.raises(ValueError, match="gate_mode"):
        GroupedExperts(16, 8, 4, gate_mode="fused")
    with pytest.raises(ValueError, match="num_experts"):
        GroupedExperts(16, 8, 0)


def test_dense_reference_formula():
    """The loop reference itself against F.linear written out for one expert."""
    m = _experts("silu", "separated", bias=False, num_experts=2)
    x = torch.randn(3, 16)
    out = grouped_experts_loop(x, torch.tensor([0, 3]), m.w1, m.w2)
    g, u = (x @ m.w1[1].T).chunk(2, dim=-1)
    torch.testing.assert_close(out, (F.silu(g) * u) @ m.w2[1].T)


# ------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_native_grouped_path_matches_loop_and_has_no_host_sync():
    dev = "cuda"
    if torch.cuda.get_device_capability() >= (9, 0):
        assert native_grouped_mm_supported("cuda", torch.bfloat16)
    m = GroupedExperts(256, 128, 8, bias=True, device=dev, dtype=torch.bfloat16)
    with torch.no_grad():
        m.b1.normal_()
        m.b2.normal_()
    counts = torch.tensor([0, 37, 5, 0, 100, 1, 64, 49], device=dev)
    x = torch.randn(int(counts.sum()), 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    m(x, counts)  # warm-up: the support probe syncs once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = m(x, counts)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    out.sum().backward()  # expanded incoming gradient
    ref = grouped_experts_loop(x.detach().float(), counts, m.w1.float(), m.w2.float(), m.b1.float(), m.b2.float())
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
    x2 = x.detach().float().requires_grad_()
    w1 = m.w1.detach().float().requires_grad_()
    grouped_experts_loop(x2, counts, w1, m.w2.float(), m.b1.float(), m.b2.float()).sum().backward()
    assert ((x.grad.float() - x2.grad).norm() / x2.grad.norm()).item() < 2e-2
    assert ((m.w1.grad.float() - w1.grad).norm() / w1.grad.norm()).item() < 2e-2
    assert m.w1.grad[0].abs().max() == 0 and m.w1.grad[3].abs().max() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_compile_and_empty(dtype):
    torch._dynamo.reset()
    m = GroupedExperts(128, 64, 4, device="cuda", dtype=dtype)
    m.init_weights(0.1)
    counter = CompileCounterWithBackend("inductor")
    f = torch.compile(m, fullgraph=True, backend=counter)
    for counts in ([10, 0, 20, 2], [0, 0, 32, 0], [8, 8, 8, 8]):
        counts = torch.tensor(counts, device="cuda")
        x = torch.randn(32, 128, device="cuda", dtype=dtype)
        got, want = f(x, counts).float(), m(x, counts).float()
        assert want.norm() > 0 and ((got - want).norm() / want.norm()).item() < 1e-2
    assert counter.frame_count == 1
    out = m(torch.randn(0, 128, device="cuda", dtype=dtype), torch.zeros(4, dtype=torch.int64, device="cuda"))
    assert out.shape == (0, 128)


def test_x_on_another_device_names_x():
    m = GroupedExperts(16, 8, 4)
    with pytest.raises(ValueError, match="x.*meta"):
        m(torch.randn(5, 16, device="meta"), torch.tensor([5, 0, 0, 0]))
