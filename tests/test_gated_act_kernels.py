"""The training path's fused gated activation: its fp32 references against autograd of
`gated_activation`, the Triton kernels (moeprec/kernels/gated_act.py) against the references, and
the autograd op built on them.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest) on small shapes; the tests
marked gpu repeat them at model size on CUDA.
"""

import pytest
import torch

pytest.importorskip("triton")

from moeprec import activations as act  # noqa: E402
from moeprec.kernels import gated_act as gk  # noqa: E402
from tests._kernel_cases import kernel_devices, nan_empty  # noqa: E402

# R, I: ragged I (not a multiple of the column block, and past one block), one row, no row
CPU_CASES = [(7, 40), (1, 16), (0, 32), (3, 300)]
GPU_CASES = [(131072, 768), (4099, 1440), (1, 2880), (0, 64)]
VARIANTS = [(swiglu, interleaved) for swiglu in (False, True) for interleaved in (False, True)]
ALPHA, LIMIT = 1.702, 7.0


@pytest.fixture
def poisoned(monkeypatch):
    """Outputs start as NaN: an unwritten element shows up."""
    monkeypatch.setattr(gk, "_empty", nan_empty)


def _h(r, i, gen, dtype=torch.float32):
    """Gate/up values spread past the swiglu clamp, with values exactly on its bounds."""
    h = torch.randn(r, 2 * i, generator=gen, dtype=torch.float64) * 4
    edge = torch.tensor([LIMIT, -LIMIT, LIMIT + 1, -LIMIT - 1, 0.0], dtype=torch.float64)
    if r:  # at the start of the row and of its second half: gate and up values in both modes
        n = min(i, edge.numel())
        h[0, :n] = edge[:n]
        h[0, i : i + n] = edge[:n]
    return h.to(dtype)


def _mode(interleaved):
    return "interleaved" if interleaved else "separated"


@pytest.mark.parametrize("swiglu, interleaved", VARIANTS)
def test_references_equal_autograd_of_gated_activation(swiglu, interleaved):
    gen = torch.Generator().manual_seed(0)
    h = _h(6, 24, gen, torch.float64).requires_grad_()
    name = "swiglu_oai" if swiglu else "silu"
    z = act.gated_activation(h, name, _mode(interleaved), ALPHA, LIMIT)
    gz = torch.randn(z.shape, generator=gen, dtype=torch.float64)
    (grad_h,) = torch.autograd.grad(z, h, gz)
    # the references compute in fp32 (and return fp64 here): compare at fp32 precision
    with torch.no_grad():
        torch.testing.assert_close(
            act._gated_act_forward_reference(h, swiglu, interleaved, ALPHA, LIMIT), z,
            rtol=1e-6, atol=1e-6)
        ref = act._gated_act_backward_reference(h, gz, swiglu, interleaved, ALPHA, LIMIT)
    torch.testing.assert_close(ref, grad_h, rtol=1e-5, atol=1e-5)


def _tol(dtype):
    # the interpreter's fp32 -> bf16 cast truncates instead of rounding: one bf16 ulp
    return dict(rtol=2**-7, atol=1e-5) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device, cases", kernel_devices(CPU_CASES, GPU_CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("swiglu, interleaved", VARIANTS)
def test_kernels_match_references(poisoned, device, cases, dtype, swiglu, interleaved):
    gen = torch.Generator().manual_seed(1)
    for r, i in cases:
        h = _h(r, i, gen, dtype).to(device)
        gz = torch.randn(r, i, generator=gen).to(device, dtype)
        z = gk.gated_act_forward(h, swiglu, interleaved, ALPHA, LIMIT)
        torch.testing.assert_close(
            z, act._gated_act_forward_reference(h, swiglu, interleaved, ALPHA, LIMIT), **_tol(dtype))
        gh = gk.gated_act_backward(h, gz, swiglu, interleaved, ALPHA, LIMIT)
        torch.testing.assert_close(
            gh, act._gated_act_backward_reference(h, gz, swiglu, interleaved, ALPHA, LIMIT),
            **_tol(dtype))


@pytest.mark.parametrize("swiglu, interleaved", VARIANTS)
def test_autograd_op_compiles_and_matches_gated_activation(swiglu, interleaved):
    """The op (its reference on CPU) under autograd and torch.compile(fullgraph=True)."""
    gen = torch.Generator().manual_seed(2)
    h0 = _h(9, 20, gen)
    gz = torch.randn(9, 20, generator=gen)
    name = "swiglu_oai" if swiglu else "silu"

    def fused(h):
        return act._GatedActivation.apply(h, swiglu, interleaved, ALPHA, LIMIT)

    results = []
    for fn in (fused, torch.compile(fused, fullgraph=True, backend="aot_eager"),
               lambda h: act.gated_activation(h, name, _mode(interleaved), ALPHA, LIMIT)):
        h = h0.clone().requires_grad_()
        z = fn(h)
        z.backward(gz)
        results.append((z.detach(), h.grad))
    for z, g in results[1:]:
        torch.testing.assert_close(z, results[0][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g, results[0][1], rtol=1e-5, atol=1e-5)


def test_training_path_runs_the_kernels_only_on_cuda(monkeypatch):
    h = torch.randn(4, 8)
    calls = []
    monkeypatch.setattr(act._GatedActivation, "apply", lambda *a: calls.append(a))
    for backend in ("triton", "torch"):  # a CPU tensor: the torch ops either way
        monkeypatch.setattr(act, "TRAINING_ACT_BACKEND", backend)
        torch.testing.assert_close(act.training_gated_activation(h), act.gated_activation(h))
    assert calls == []


@pytest.mark.gpu
@pytest.mark.parametrize("activation, gate_mode", [("silu", "separated"),
                                                   ("swiglu_oai", "interleaved")])
def test_gpu_moe_trains_the_same_with_the_activation_kernels(monkeypatch, activation, gate_mode):
    from moeprec.args import MoEArgs
    from moeprec.moe import MoE

    torch.manual_seed(0)
    m = MoE(MoEArgs(num_experts=8, top_k=2, activation=activation, gate_mode=gate_mode,
                    mlp_bias=activation == "swiglu_oai"), 256, 128).cuda().bfloat16()
    m.init_weights(0.05)
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    runs = []
    for backend in ("torch", "triton", "triton-compiled"):
        monkeypatch.setattr(act, "TRAINING_ACT_BACKEND", backend.split("-")[0])
        torch._dynamo.reset()
        f = torch.compile(m, fullgraph=True) if backend.endswith("compiled") else m
        xi = x.clone().requires_grad_()
        out = f(xi)
        out.float().square().mean().backward()
        runs.append((out.float(), xi.grad.float(), m.experts.w1.grad.float()))
        m.zero_grad()
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            # one rounding of z (kernels) against two (torch ops in bf16): a bf16 ulp of z moves
            # an output by ~2^-9 of the tensor's scale, more than 2^-9 of a near-zero element
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2**-7 * b.abs().max().item())
