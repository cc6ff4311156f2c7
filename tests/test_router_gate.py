"""RouterGatingLinearFunction, router_gating_linear, RouterGateLinear (SPEC 2)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moeprec import RouterGateLinear, RouterGatingLinearFunction, router_gating_linear
from moeprec.backends import triton_available, triton_interpret
from moeprec.routing import gate as gate_mod

# Backends of the fast plan's backward that can run its emulation on CPU: the torch plan always,
# the Triton kernels in the interpreter.
EMULATED_BACKENDS = [
    "torch",
    pytest.param("triton", marks=[
        pytest.mark.interpret,
        pytest.mark.skipif(not (triton_interpret() and triton_available()),
                           reason="Triton on CPU needs TRITON_INTERPRET=1"),
    ]),
]

D, E = 96, 24


def _inputs(shape, dtype, bias, w_dtype=None, b_dtype=None):
    x = torch.randn(*shape, D).to(dtype).requires_grad_()
    w = (torch.randn(E, D) * 0.05).to(w_dtype or dtype).requires_grad_()
    b = torch.randn(E).to(b_dtype or dtype).requires_grad_() if bias else None
    return x, w, b


def _upcast_reference(x, w, b, rd):
    """Autograd through F.linear on upcast copies: the semantics the Function must match."""
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    br = b.detach().clone().requires_grad_() if b is not None else None
    y = F.linear(xr.to(rd), wr.to(rd), br.to(rd) if br is not None else None)
    return y, [t for t in (xr, wr, br) if t is not None]


def _grads(y, leaves, g):
    return torch.autograd.grad(y, leaves, g)


@pytest.mark.parametrize("shape", [(37,), (3, 5), (1,), (0,)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rd", [torch.float32, torch.float64])
def test_bit_exact_vs_upcast_linear_on_cpu(shape, dtype, bias, rd):
    x, w, b = _inputs(shape, dtype, bias)
    y = RouterGatingLinearFunction.apply(x, w, b, rd)
    y_ref, leaves_ref = _upcast_reference(x, w, b, rd)
    assert y.dtype == rd and y.shape == (*shape, E)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    leaves = [t for t in (x, w, b) if t is not None]
    for got, want, leaf in zip(_grads(y, leaves, g), _grads(y_ref, leaves_ref, g), leaves):
        assert got.dtype == leaf.dtype
        assert torch.equal(got, want)


def test_gradient_dtypes_follow_each_input():
    # bf16 activations, fp32 master weight, fp16 bias: each grad comes back in its input's dtype.
    x, w, b = _inputs((7,), torch.bfloat16, True, w_dtype=torch.float32, b_dtype=torch.float16)
    y = RouterGatingLinearFunction.apply(x, w, b, torch.float32)
    assert y.dtype == torch.float32
    gx, gw, gb = torch.autograd.grad(y.square().sum(), [x, w, b])
    assert (gx.dtype, gw.dtype, gb.dtype) == (torch.bfloat16, torch.float32, torch.float16)
    g = 2 * y.detach()
    torch.testing.assert_close(gb, g.sum(0).to(torch.float16))
    torch.testing.assert_close(gw, g.t() @ x.detach().float())


def test_saves_only_the_original_tensors():
    x, w, b = _inputs((11,), torch.bfloat16, True)
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = RouterGatingLinearFunction.apply(x, w, b, torch.float32)
    assert len(packed) == 2
    assert {(t.dtype, t.data_ptr(), tuple(t.shape)) for t in packed} == {
        (x.dtype, x.data_ptr(), tuple(x.shape)),
        (w.dtype, w.data_ptr(), tuple(w.shape)),
    }
    assert all(t.dtype == torch.bfloat16 for t in packed)  # no fp32 copies kept alive
    y.sum().backward()


def test_saves_nothing_that_backward_does_not_read():
    x, w, _ = _inputs((5,), torch.bfloat16, False)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        RouterGatingLinearFunction.apply(x.detach(), w, None, torch.float32)  # only grad_w needed
    assert [p.data_ptr() for p in packed] == [x.data_ptr()]


def test_backward_returns_none_for_router_dtype():
    x, w, b = _inputs((4,), torch.bfloat16, True)
    y = RouterGatingLinearFunction.apply(x, w, b, torch.float32)
    # The grad_fn of a custom Function is its ctx: call backward directly to see all four outputs.
    out = RouterGatingLinearFunction.backward(y.grad_fn, torch.ones_like(y))
    assert len(out) == 4 and out[3] is None
    assert out[0].dtype == x.dtype and out[1].dtype == w.dtype and out[2].dtype == b.dtype


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("bias", [False, True])
def test_fullgraph_compile_matches_eager(backend, bias):
    torch._dynamo.reset()
    x, w, b = _inputs((2, 9), torch.bfloat16, bias)

    def fn(x, w, b):
        return router_gating_linear(x, w, "fp32", bias=b)

    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    y_eager = fn(x, w, b)
    y_comp = compiled(x, w, b)
    assert y_comp.dtype == torch.float32
    assert torch.equal(y_eager, y_comp)
    g = torch.randn_like(y_eager)
    leaves = [t for t in (x, w, b) if t is not None]
    for a, c in zip(_grads(y_eager, leaves, g), _grads(y_comp, leaves, g)):
        assert torch.equal(a, c)


def test_compiled_module_with_none_router_dtype():
    torch._dynamo.reset()
    lin = RouterGateLinear(D, E, router_dtype=None)
    x = torch.randn(3, D)
    assert torch.equal(torch.compile(lin, fullgraph=True, backend="eager")(x), lin(x))


def test_autocast_cannot_drop_the_gemm_to_bf16():
    x, w, b = _inputs((13,), torch.float32, True)
    want = RouterGatingLinearFunction.apply(x, w, b, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.linear(x, w, b).dtype == torch.bfloat16  # autocast is on...
        got = RouterGatingLinearFunction.apply(x, w, b, torch.float32)
        got_mod = router_gating_linear(x, w, torch.float32, bias=b)
    assert got.dtype == torch.float32 and torch.equal(got, want)  # ...but not inside the Function
    assert torch.equal(got_mod, want)
    g = torch.randn_like(want)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grads = _grads(got, [x, w, b], g)
    for a, c in zip(grads, _grads(want, [x, w, b], g)):
        assert torch.equal(a, c)


def test_fp64_gradcheck():
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: RouterGatingLinearFunction.apply(x, w, b, torch.float64), (x, w, b)
    )


def test_fp64_router_from_bf16_inputs_is_exact():
    # bf16 x bf16 products and their sums over 96 terms are exact in fp64 (up to rounding far
    # below fp32): the fp64 router is the ground truth the fp32 one is measured against.
    x, w, _ = _inputs((50,), torch.bfloat16, False)
    y64 = router_gating_linear(x, w, "fp64")
    y32 = router_gating_linear(x, w, "fp32")
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y32.double(), y64, rtol=1e-6, atol=1e-6)


def test_none_router_dtype_is_plain_linear():
    x, w, b = _inputs((6,), torch.bfloat16, True)
    y = router_gating_linear(x, w, None, bias=b)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.linear(x, w, b))
    assert "RouterGatingLinearFunction" not in type(y.grad_fn).__name__


def test_router_gate_linear_is_an_nn_linear_with_the_same_state_dict():
    ref = nn.Linear(D, E, bias=True)
    lin = RouterGateLinear(D, E, bias=True, router_dtype="fp32")
    assert isinstance(lin, nn.Linear)
    assert lin.router_dtype == torch.float32
    assert list(lin.state_dict()) == list(ref.state_dict())
    lin.load_state_dict(ref.state_dict())
    lin_bf16 = lin.to(torch.bfloat16)
    x = torch.randn(4, D, dtype=torch.bfloat16)
    want = F.linear(x.float(), ref.weight.to(torch.bfloat16).float(), ref.bias.to(torch.bfloat16).float())
    assert torch.equal(lin_bf16(x), want)
    assert "router_dtype=torch.float32" in repr(lin)
    assert RouterGateLinear(D, E).bias is None  # bias off by default, unlike nn.Linear


@pytest.mark.parametrize("splits", [1, 2, 3])
@pytest.mark.parametrize("backend", EMULATED_BACKENDS)
def test_fast_plan_numerics_emulated_on_cpu(monkeypatch, backend, splits):
    """The fast plan's code on CPU, its fp32-output GEMM emulated by an upcast GEMM."""
    monkeypatch.setattr(gate_mod, "_plan", lambda *a: "fast")
    monkeypatch.setattr(gate_mod, "_mm_f32", lambda a, b: a.float() @ b.float())
    monkeypatch.setattr(gate_mod, "BACKWARD_GRAD_SPLITS", splits)
    monkeypatch.setattr(gate_mod, "BACKWARD_BACKEND", backend)
    x = torch.randn(300, 256).bfloat16().requires_grad_()
    w = (torch.randn(64, 256) * 0.05).bfloat16().requires_grad_()
    y = RouterGatingLinearFunction.apply(x, w, None, torch.float32)
    y_ref, (xr, wr) = _upcast_reference(x, w, None, torch.float32)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-5)
    g = torch.randn_like(y) * torch.logspace(-6, 0, 64)  # gradients of very different sizes
    gx, gw = _grads(y, [x, w], g)
    rx, rw = _grads(y_ref, [xr, wr], g)
    # fp64 ground truth of each grad before its final rounding to bf16
    tx = g.double() @ w.detach().double()
    tw = g.double().t() @ x.detach().double()
    # sum of |products|: the scale of rounding errors in the inputs of the reduction
    ax = g.double().abs() @ w.detach().double().abs()
    aw = g.double().abs().t() @ x.detach().double().abs()
    for got, ref, truth, absdot, k in ((gx, rx, tx, ax, 64), (gw, rw, tw, aw, 300)):
        assert got.dtype == torch.bfloat16
        err = (got.double() - truth).abs()
        # the error bound: one bf16 rounding of the result, fp32 summation over k terms, and the
        # representation error of g by its bf16 pieces (2^-8, 2^-16, 0 for 1, 2, 3 pieces)
        piece_err = {1: 2.0**-8, 2: 2.0**-16, 3: 0.0}[splits]
        bound = 2.0**-8 * truth.abs() + (piece_err + k * 2.0**-24) * absdot
        assert (err <= bound).all()
        same = (got == ref).float().mean().item()
        print(f"splits={splits} k={k}: {same:.4f} of elements equal to the upcast path")
        if splits >= 2:
            assert same > 0.99  # bit-identical to the upcast path but for rare rounding ties
        else:
            assert same < 0.95  # rounding g first: visibly not the upcast path


@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("x_grad, w_grad", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("backend", EMULATED_BACKENDS)
def test_fast_plan_when_only_some_inputs_need_grad(monkeypatch, backend, splits, x_grad, w_grad):
    """Only what a needed gradient reads is saved (no weight when x needs none, as for a router
    fed by a frozen or detached input): the fast backward must not read what was not saved."""
    monkeypatch.setattr(gate_mod, "_plan", lambda *a: "fast")
    monkeypatch.setattr(gate_mod, "_mm_f32", lambda a, b: a.float() @ b.float())
    monkeypatch.setattr(gate_mod, "BACKWARD_GRAD_SPLITS", splits)
    monkeypatch.setattr(gate_mod, "BACKWARD_BACKEND", backend)
    x = torch.randn(40, 64).bfloat16().requires_grad_(x_grad)
    w = (torch.randn(16, 64) * 0.05).bfloat16().requires_grad_(w_grad)
    y = RouterGatingLinearFunction.apply(x, w, None, torch.float32)
    g = torch.randn_like(y)
    y.backward(g)
    ref_y, (xr, wr) = _upcast_reference(x, w, None, torch.float32)
    ref_y.backward(g)
    for leaf, ref, wanted in ((x, xr, x_grad), (w, wr, w_grad)):
        if not wanted:
            assert leaf.grad is None
            continue
        assert leaf.grad.dtype == torch.bfloat16
        torch.testing.assert_close(leaf.grad.float(), ref.grad.float(), rtol=2**-6, atol=2**-6 * ref.grad.abs().max().item())


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("backend", EMULATED_BACKENDS)
def test_fast_plan_emulated_compiles_fullgraph(monkeypatch, backend, splits):
    monkeypatch.setattr(gate_mod, "_plan", lambda *a: "fast")
    monkeypatch.setattr(gate_mod, "_mm_f32", lambda a, b: a.float() @ b.float())
    monkeypatch.setattr(gate_mod, "BACKWARD_GRAD_SPLITS", splits)
    monkeypatch.setattr(gate_mod, "BACKWARD_BACKEND", backend)
    torch._dynamo.reset()
    x, w, b = _inputs((17,), torch.bfloat16, True)
    fn = lambda x, w, b: router_gating_linear(x, w, "fp32", bias=b)  # noqa: E731
    y = fn(x, w, b)
    yc = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, w, b)
    assert torch.equal(y, yc)
    g = torch.randn_like(y)
    for a, c in zip(_grads(y, [x, w, b], g), _grads(yc, [x, w, b], g)):
        assert torch.equal(a, c)


@pytest.mark.parametrize("splits", [1, 2, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_fast_plan_shapes_and_dtypes_with_the_real_out_dtype_gemm_on_meta(monkeypatch, splits, bias):
    """The fast plan's calls of torch.mm(out_dtype=) as written, checked by torch's meta kernels."""
    monkeypatch.setattr(gate_mod, "_plan", lambda *a: "fast")
    monkeypatch.setattr(gate_mod, "BACKWARD_GRAD_SPLITS", splits)
    monkeypatch.setattr(gate_mod, "BACKWARD_BACKEND", "torch")  # meta tensors: no kernel runs
    x = torch.empty(4, 7, D, device="meta", dtype=torch.bfloat16, requires_grad=True)
    w = torch.empty(E, D, device="meta", dtype=torch.bfloat16, requires_grad=True)
    b = torch.empty(E, device="meta", dtype=torch.float32, requires_grad=True) if bias else None
    y = RouterGatingLinearFunction.apply(x, w, b, torch.float32)
    assert y.dtype == torch.float32 and y.shape == (4, 7, E)
    leaves = [t for t in (x, w, b) if t is not None]
    for grad, leaf in zip(torch.autograd.grad(y, leaves, torch.empty_like(y)), leaves):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape


@pytest.mark.parametrize("splits", [1, 2, 3])
def test_split_to_bf16_pieces(splits):
    g = torch.randn(1000) * torch.logspace(-20, 20, 1000)
    gs = gate_mod._split_to_bf16(g.view(10, 100), splits)
    assert gs.shape == (10, 100 * splits) and gs.dtype == torch.bfloat16
    total = gs.double().view(10, splits, 100).sum(1).flatten()
    err = (total - g.double()).abs()
    bound = {1: 2.0**-8, 2: 2.0**-16, 3: 0.0}[splits]
    assert (err <= bound * g.double().abs()).all()


def test_plan_is_upcast_off_cuda_and_for_fp64():
    x = torch.randn(2, D, dtype=torch.bfloat16)
    w = torch.randn(E, D, dtype=torch.bfloat16)
    assert gate_mod._plan(x, w, torch.float32) == "upcast"
    if torch.cuda.is_available():
        assert gate_mod._plan(x.cuda(), w.cuda(), torch.float64) == "upcast"
        assert gate_mod._plan(x.cuda(), w.float().cuda(), torch.float32) == "upcast"


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: router_gating_linear(torch.randn(3, D), torch.randn(E, D + 1), "fp32"), ValueError, ["x", str(D + 1)]),
        (lambda: router_gating_linear(torch.randn(3, D), torch.randn(E, D, 2), "fp32"), ValueError, ["weight", "2-D"]),
        (lambda: router_gating_linear(torch.ones(3, D, dtype=torch.int64), torch.randn(E, D), "fp32"), TypeError, ["x", "int64"]),
        (lambda: router_gating_linear(torch.randn(3, D), torch.ones(E, D, dtype=torch.int32), "fp32"), TypeError, ["weight", "int32"]),
        (lambda: router_gating_linear(torch.randn(3, D), torch.randn(E, D), "fp32", bias=torch.randn(E + 1)), ValueError, ["bias", str(E + 1)]),
        (lambda: router_gating_linear(torch.randn(3, D), torch.randn(E, D), "bf16"), ValueError, ["moe_router_dtype", "bf16"]),
        (lambda: router_gating_linear(torch.randn(3, D), torch.randn(E, D), torch.float16), ValueError, ["moe_router_dtype", "float16"]),
        (lambda: router_gating_linear(torch.tensor(1.0), torch.randn(E, D), "fp32"), ValueError, ["x", "0-D"]),
        (lambda: RouterGateLinear(D, E, router_dtype="float32"), ValueError, ["moe_router_dtype", "float32"]),
    ],
)
def test_bad_input(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value)


# ----------------------------------------------------------------------------------- GPU


def _ops_of(fn):
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_fast_path_takes_the_out_dtype_gemm(monkeypatch, backend):
    assert gate_mod.MM_OUT_DTYPE_ON_CUDA, "this torch build has no CUDA aten::mm.dtype"
    monkeypatch.setattr(gate_mod, "BACKWARD_BACKEND", backend)
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(32, 512, device="cuda") * 0.05).bfloat16().requires_grad_()
    assert gate_mod._plan(x, w, torch.float32) == "fast"
    holder = {}
    fwd = _ops_of(lambda: holder.setdefault("y", RouterGatingLinearFunction.apply(x, w, None, torch.float32)))
    assert "aten.mm.dtype" in fwd and not any("_to_copy" in op for op in fwd)  # no upcast copies
    bwd = _ops_of(lambda: holder["y"].sum().backward())
    assert "aten.mm.dtype" in bwd
    # the gradient's bf16 pieces: four torch passes, or one Triton kernel (no torch op)
    splits_in_torch = any(op.startswith("aten.bitwise_and") for op in bwd)
    assert splits_in_torch == (backend == "torch")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4096, 2048, 128), (1000, 7168, 256), (1, 64, 8), (0, 64, 8)])
@pytest.mark.parametrize("bias", [False, True])
def test_gpu_fast_path_equals_upcast_up_to_summation_order(monkeypatch, backend, dtype, shape, bias):
    monkeypatch.setattr(gate_mod, "BACKWARD_BACKEND", backend)
    t, d, e = shape
    x = torch.randn(t, d, device="cuda").to(dtype).requires_grad_()
    w = (torch.randn(e, d, device="cuda") * 0.02).to(dtype).requires_grad_()
    b = torch.randn(e, device="cuda").to(dtype).requires_grad_() if bias else None
    y = RouterGatingLinearFunction.apply(x, w, b, torch.float32)
    leaves = [v for v in (x, w, b) if v is not None]
    truth_leaves = [v.detach().double().requires_grad_() for v in leaves]
    truth = F.linear(*truth_leaves[:2], truth_leaves[2] if bias else None)
    assert y.dtype == torch.float32
    scale = (x.detach().double().abs() @ w.detach().double().abs().t()) + 1e-30
    # forward: exact products, fp32 accumulation: error within fp32 summation noise
    assert ((y.double() - truth).abs() <= 2.0**-24 * d * scale + 1e-6).all()
    g = torch.randn_like(y) * torch.logspace(-4, 0, e, device="cuda")
    _assert_grads_within_rounding_bounds(torch.autograd.grad(y, leaves, g), leaves, g)


def _assert_grads_within_rounding_bounds(grads, leaves, g):
    """Each gradient is the exact (fp64) one up to: one rounding to its leaf's dtype, the error of
    the bf16 pieces of the fast backward, and fp32 summation error."""
    x, w = leaves[0], leaves[1]
    t, e = g.shape
    truth_leaves = [v.detach().double().requires_grad_() for v in leaves]
    truth = F.linear(*truth_leaves[:2], truth_leaves[2] if len(leaves) == 3 else None)
    truths = torch.autograd.grad(truth, truth_leaves, g.double())
    ag, ax, aw = g.double().abs(), x.detach().double().abs(), w.detach().double().abs()
    # sum of |products| and reduction length of each gradient: the scale of its rounding errors
    scales = [(ag @ aw, e), (ag.t() @ ax, t), (ag.sum(0), t)]
    fp16 = x.dtype == torch.float16
    piece_err = 0.0 if fp16 else 2.0**-16  # 2 bf16 pieces; fp16: upcast backward
    u = 2.0**-11 if fp16 else 2.0**-8
    # below the smallest normal, rounding error is absolute: half the subnormal spacing
    tiny = 2.0**-25 if fp16 else 2.0**-134
    for got, want, leaf, (absdot, k) in zip(grads, truths, leaves, scales):
        assert got.dtype == leaf.dtype
        bound = u * want.abs() + (1 + u) * (piece_err + k * 2.0**-24) * absdot + tiny
        ratio = ((got.double() - want).abs() / bound).max().item() if got.numel() else 0.0
        assert ratio <= 1.0, f"grad of {tuple(leaf.shape)}: error up to {ratio:.2f}x its bound"


@pytest.mark.gpu
def test_gpu_compiled_fast_path_matches_eager():
    torch._dynamo.reset()
    x = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(64, 1024, device="cuda") * 0.02).bfloat16().requires_grad_()
    fn = lambda x, w: router_gating_linear(x, w, "fp32")  # noqa: E731
    y = fn(x, w)
    yc = torch.compile(fn, fullgraph=True)(x, w)
    torch.testing.assert_close(yc, y, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    # The compiled backward may pick another GEMM (summation order), so its bf16 grads can differ
    # from eager's by an ulp: hold both to the rigorous bound instead of to each other.
    _assert_grads_within_rounding_bounds(torch.autograd.grad(y, [x, w], g), [x, w], g)
    _assert_grads_within_rounding_bounds(torch.autograd.grad(yc, [x, w], g), [x, w], g)


# ------------------------------------------------------------------- direct Function calls


@pytest.mark.parametrize(
    "args, exc, words",
    [
        ((torch.randn(3, D), torch.randn(E, D + 1), None, torch.float32), ValueError, ["x", str(D + 1)]),
        ((torch.ones(3, D, dtype=torch.int64), torch.randn(E, D), None, torch.float32), TypeError, ["x", "int64"]),
        ((torch.randn(3, D), torch.randn(E, D), torch.randn(E + 1), torch.float32), ValueError, ["bias", str(E + 1)]),
        ((torch.randn(3, D), torch.randn(E, D), None, torch.bfloat16), ValueError, ["router_dtype", "bfloat16"]),
        ((torch.randn(3, D), torch.randn(E, D), None, None), ValueError, ["router_dtype", "None"]),
        ((torch.randn(3, D), torch.randn(E, D, device="meta"), None, torch.float32), ValueError, ["weight", "meta"]),
    ],
)
def test_function_apply_checks_its_arguments(args, exc, words):
    # SPEC 6: the autograd Function is a public entry point too (it used to fail deep in
    # F.linear with a RuntimeError, or silently run in the input dtype for router_dtype=None).
    with pytest.raises(exc) as info:
        RouterGatingLinearFunction.apply(*args)
    for word in words:
        assert word in str(info.value)


def test_function_apply_takes_the_spellings_parse_router_dtype_takes():
    x, w = torch.randn(2, 3, D, dtype=torch.bfloat16), torch.randn(E, D, dtype=torch.bfloat16)
    y = RouterGatingLinearFunction.apply(x, w, None, "fp32")
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, x.float() @ w.float().T, rtol=0, atol=0)


def test_router_gating_linear_rejects_operands_on_other_devices():
    with pytest.raises(ValueError, match="bias"):
        router_gating_linear(torch.randn(3, D), torch.randn(E, D), None, bias=torch.randn(E, device="meta"))


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_none_router_dtype_needs_one_dtype(which):
    # plain F.linear (router_dtype None) needs x, weight and bias in one dtype: a mismatch used
    # to surface as F.linear's RuntimeError, naming no argument
    x, w, b = torch.randn(3, D, dtype=torch.bfloat16), torch.randn(E, D, dtype=torch.bfloat16), None
    if which == "weight":
        w = w.float()
    else:
        b = torch.randn(E)
    with pytest.raises(TypeError, match=which) as info:
        router_gating_linear(x, w, None, b)
    assert "float32" in str(info.value) and "bfloat16" in str(info.value)


def test_none_router_dtype_under_autocast_mixes_dtypes_as_f_linear_does():
    x, w = torch.randn(3, D, dtype=torch.bfloat16), torch.randn(E, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = router_gating_linear(x, w, None, torch.randn(E))
        want = F.linear(x, w.bfloat16(), None)
    assert y.dtype == torch.bfloat16 and y.shape == want.shape


def test_none_router_dtype_compiles_fullgraph_with_its_checks():
    x, w = torch.randn(3, D), torch.randn(E, D)
    fn = torch.compile(lambda a, b: router_gating_linear(a, b, None), fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x, w), F.linear(x, w))
