"""The combine / dispatch-backward row kernels (moeprec/kernels/combine.py) against the torch
references in moeprec.reorder, and the autograd ops built on them.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest) on small shapes; the tests
marked gpu repeat them at model size on CUDA.
"""

import pytest
import torch

pytest.importorskip("triton")

from moeprec import reorder  # noqa: E402
from moeprec.kernels import combine as ck  # noqa: E402
from tests._kernel_cases import kernel_devices, nan_empty  # noqa: E402

# T, k, D: ragged D (not a multiple of the column block), k not a power of two, one token,
# no token, a model-like row
CPU_CASES = [(7, 3, 40), (1, 1, 16), (0, 4, 32), (5, 8, 1100), (9, 2, 5)]
GPU_CASES = [(4099, 8, 2048), (1, 8, 2048), (0, 8, 64), (513, 4, 2880), (64, 6, 7168)]


@pytest.fixture
def poisoned(monkeypatch):
    """Outputs start as NaN: an unwritten element shows up."""
    monkeypatch.setattr(ck, "_empty", nan_empty)


def _case(t, k, d, device, dtype, gen):
    """Expert-sorted rows as MoE makes them: a random expert choice per slot, stable sort."""
    selected = torch.randint(0, 16, (t, k), generator=gen)
    scores = torch.rand(t, k, generator=gen)
    r = reorder.reorder_tokens(scores, selected)
    src = torch.randn(t * k, d, generator=gen).to(dtype)
    g = torch.randn(t, d, generator=gen)
    to = lambda x: x.to(device)  # noqa: E731
    return to(src), to(scores), to(r.pos), to(g)


def _tol(dtype):
    # the interpreter's fp32 -> bf16 cast truncates instead of rounding: one bf16 ulp
    return dict(rtol=2**-7, atol=1e-6) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device, cases", kernel_devices(CPU_CASES, GPU_CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("weighted", [True, False])
def test_sum_rows_matches_reference(poisoned, device, cases, dtype, weighted):
    gen = torch.Generator().manual_seed(0)
    for t, k, d in cases:
        src, w, pos, _ = _case(t, k, d, device, dtype, gen)
        w = w if weighted else None
        for out_dtype in (torch.float32, dtype):
            got = ck.sum_rows(src, pos, w, k, out_dtype)
            want = reorder._sum_rows_reference(src, pos, w, k, out_dtype)
            assert got.dtype == out_dtype and got.shape == (t, d)
            torch.testing.assert_close(got, want, **_tol(out_dtype), msg=f"{t=} {k=} {d=}")


@pytest.mark.parametrize("device, cases", kernel_devices(CPU_CASES, GPU_CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("weighted", [True, False])
def test_combine_backward_matches_reference(poisoned, device, cases, dtype, weighted):
    gen = torch.Generator().manual_seed(1)
    for t, k, d in cases:
        src, w, pos, g = _case(t, k, d, device, dtype, gen)
        w = w if weighted else None
        got_src, got_w = ck.combine_backward(g, src if weighted else None, pos, w, k, dtype)
        want_src, want_w = reorder._combine_backward_reference(g, src, pos, w, k, dtype)
        torch.testing.assert_close(got_src, want_src, **_tol(dtype), msg=f"{t=} {k=} {d=}")
        if weighted:
            # a dot product over D in another order
            torch.testing.assert_close(got_w, want_w, rtol=1e-4, atol=1e-4 * d**0.5)
        else:
            assert got_w is None


@pytest.mark.parametrize("device, cases", kernel_devices(CPU_CASES, GPU_CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_copy_rows_is_the_dispatch_gather(poisoned, device, cases, dtype):
    gen = torch.Generator().manual_seed(3)
    for t, k, d in cases:
        selected = torch.randint(0, 16, (t, k), generator=gen).to(device)
        r = reorder.reorder_tokens(torch.rand(t, k, generator=gen).to(device), selected)
        tokens = torch.randn(t, d, generator=gen).to(device, dtype)
        got = ck.copy_rows(tokens, r.pos, k)
        assert torch.equal(got, tokens.index_select(0, r.token_indices)), f"{t=} {k=} {d=}"
        assert torch.equal(reorder._copy_rows(tokens, r.pos, k), got)


@pytest.mark.parametrize("device, cases", kernel_devices(CPU_CASES, GPU_CASES))
@pytest.mark.parametrize("gather", ["torch", "triton"])
def test_autograd_ops_use_the_kernels_and_match_the_torch_path(device, cases, gather, monkeypatch):
    """combine_expert_outputs and gather_tokens, forward and backward, with the kernels on
    (CUDA, or the interpreter) against the same ops with the kernels off."""
    if device == "cpu":
        monkeypatch.setattr(reorder, "_use_kernels", lambda *ts: reorder._HAVE_KERNELS)
    monkeypatch.setattr(reorder, "DISPATCH_GATHER_BACKEND", gather)
    gen = torch.Generator().manual_seed(2)
    for t, k, d in cases[:2]:
        src, w, _, g = _case(t, k, d, device, torch.bfloat16, gen)
        selected = torch.randint(0, 16, (t, k), generator=gen).to(device)
        r = reorder.reorder_tokens(w, selected)
        tokens = torch.randn(t, d, generator=gen).to(device, torch.bfloat16)

        def run():
            x = tokens.clone().requires_grad_()
            y = src.clone().requires_grad_()
            s = w.clone().requires_grad_()
            rows = reorder.gather_tokens(x, r)
            out = reorder.combine_expert_outputs(y + rows, r, s)
            out.backward(g)
            return out, x.grad, y.grad, s.grad

        use_kernels = reorder._use_kernels
        fast = run()
        monkeypatch.setattr(reorder, "_use_kernels", lambda *ts: False)
        ref = run()
        monkeypatch.setattr(reorder, "_use_kernels", use_kernels)
        # x.grad is rounded to bf16 twice (its rows' gradient, then their sum): two bf16 ulps
        # where the interpreter truncates, one where the GPU rounds
        rtol = 2**-6 if device == "cpu" else 2**-7
        for a, b, name in zip(fast, ref, ("out", "x.grad", "y.grad", "scores.grad")):
            torch.testing.assert_close(a, b, rtol=rtol, atol=1e-4 * d**0.5,
                                       msg=lambda m, name=name: f"{name}: {m}")
