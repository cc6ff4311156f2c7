"""The router's gate GEMM in a chosen precision (SPEC 2).

Why: top-k selection is discrete, so the rounding of bf16 logits flips experts for a few percent of
tokens, and the softmax of bf16 logits is coarse. A router dtype of fp32 (or fp64) computes the
logits from the same bf16 inputs and weights without that rounding.

`RouterGatingLinearFunction` computes `x.to(rd) @ weight.to(rd).T [+ bias.to(rd)]` and saves only
the original tensors for backward, so the fp32 router costs no extra activation memory. Autocast is
disabled inside, so an enclosing `torch.autocast` cannot drop the GEMM back to bf16.

Two implementations, chosen in one place (`_plan`):
- "upcast": the reference. Upcast the operands to `rd` and run the GEMMs in `rd`; backward
  upcasts the incoming gradient, runs both GEMMs in `rd` and casts each result to its input's
  dtype. Used on CPU, for fp64, and whenever the fast path does not apply.
- "fast" (CUDA, x and weight both bf16 or both fp16, rd == float32, `torch.mm(out_dtype=)`
  available): tensor-core GEMMs that accumulate in fp32.
  * forward: `mm(x, W^T, out_dtype=float32)`. A product of two bf16 (or fp16) numbers is exact in
    fp32 and the sum is accumulated in fp32, so this equals the upcast GEMM up to summation order.
  * backward: the incoming gradient g is fp32, and a bf16 GEMM needs bf16 operands. Rounding g to
    bf16 once would add up to 2^-8 of every product, far beyond summation order. Instead g is
    split into `BACKWARD_GRAD_SPLITS` bf16 pieces, g = g_1 + g_2 (+ g_3), each the rounding of
    what is left, and the pieces are stacked along the GEMM's reduction (grad_x) or output
    (grad_w) dimension, so each GEMM still reads x once and accumulates in fp32.
    - 2 pieces (default): g is represented to within 2^-16 |g| per element. That is 256 times
      below the bf16 rounding each gradient ends with (the fast plan only runs for bf16 x and
      weight, and grads come back in their dtypes), and of the order of fp32's own worst-case
      summation error K * 2^-24 for the reduction lengths here (K = E >= 128, or T). Cost: the
      two backward GEMMs do twice the flops of a bf16 router's (same memory traffic).
    - 3 pieces: g is represented exactly (8 + 8 + 8 significant bits): equal to the upcast
      path up to summation order in the strict sense, at three times the backward flops.
    - 1 piece: the plain bf16 backward of a bf16 router (fastest; 2^-8 per product).
    fp16 inputs take the fast forward but the upcast backward (rounding small gradients to fp16
    could underflow).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from moeprec._validation import check_bool, check_floating, check_positive_int, check_tensor
from moeprec.backends import resolve_backend, triton_available
from moeprec.precision import parse_router_dtype

# Number of bf16 pieces the fp32 output gradient is split into by the fast backward (1, 2 or 3);
# see the module docstring for the numerics of each. The one numerics knob of the fast path.
BACKWARD_GRAD_SPLITS = 2

# Who splits g into its bf16 pieces for the fast backward: "triton" (one kernel,
# moeprec/kernels/router_grad_split.py), "torch" (`_split_to_bf16`, four elementwise passes) or
# "auto" (Triton on CUDA where installed). Bit-identical; the GEMMs are cuBLAS's either way.
BACKWARD_BACKEND = "auto"
_SPLIT_KERNEL = "moeprec.kernels.router_grad_split"
_HAVE_SPLIT_KERNEL = triton_available(_SPLIT_KERNEL)  # decided at import: compile-safe

# torch.mm(a, b, out_dtype=torch.float32) (aten::mm.dtype) has a CUDA kernel in recent torch
# builds (not on CPU). Asking the dispatcher needs no CUDA context and no kernel launch, so it
# is decided once at import and stays a plain constant under torch.compile.
try:
    MM_OUT_DTYPE_ON_CUDA = bool(
        torch._C._dispatch_has_kernel_for_dispatch_key("aten::mm.dtype", "CUDA")
    )
except Exception:  # an older torch without the overload or the private query
    MM_OUT_DTYPE_ON_CUDA = False

_FAST_DTYPES = (torch.bfloat16, torch.float16)

# Device types torch.autocast accepts; others (meta, used for shape inference) have no autocast
# to disable, and disabling the CPU one there is harmless.
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "maia")


def _no_autocast(device: torch.device) -> torch.autocast:
    """A context with autocast off for `device`: the router GEMM's dtype is the caller's choice."""
    kind = device.type if device.type in _AUTOCAST_DEVICES else "cpu"
    return torch.autocast(device_type=kind, enabled=False)


def _autocast_on(device: torch.device) -> bool:
    kind = device.type if device.type in _AUTOCAST_DEVICES else "cpu"
    return torch.is_autocast_enabled(kind)


def _plan(x: torch.Tensor, weight: torch.Tensor, router_dtype: torch.dtype) -> str:
    """"fast" or "upcast": the one place the gate GEMM implementation is chosen."""
    if (
        MM_OUT_DTYPE_ON_CUDA
        and router_dtype == torch.float32
        and x.is_cuda
        and weight.is_cuda
        and x.dtype in _FAST_DTYPES
        and weight.dtype == x.dtype
    ):
        return "fast"
    return "upcast"


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 output from bf16/fp16 operands on tensor cores (the fast plan's GEMM)."""
    return torch.mm(a, b, out_dtype=torch.float32)


def _truncate_to_bf16(t: torch.Tensor) -> torch.Tensor:
    """fp32 t with the low 16 bits cleared: a value bf16 holds exactly, and t minus it is exact.

    Bit arithmetic, not a round trip through bf16: a compiler fusing `g - float(bf16(g))` into one
    kernel may skip the intermediate rounding (Inductor does by default) and make the rest zero.
    """
    return (t.view(torch.int32) & -65536).view(torch.float32)


def _split_to_bf16(g: torch.Tensor, pieces: int) -> torch.Tensor:
    """fp32 g [T, E] -> bf16 [T, pieces * E] = [g_1 | g_2 | ...], sum of the g_i ~= g.

    One piece: bf16(g), rounded to nearest. More: each piece but the last takes the leading 8
    significant bits of what is left (truncation, exact), the last is the rounded rest; so
    |g - sum| <= 2^-16 |g| for 2 pieces and 0 for 3. Written into one buffer (no concatenation).
    """
    t, e = g.shape
    out = torch.empty((t, pieces * e), dtype=torch.bfloat16, device=g.device)
    rest = g
    for i in range(pieces - 1):
        hi = _truncate_to_bf16(rest)
        out[:, i * e : (i + 1) * e].copy_(hi)  # exact
        rest = rest - hi  # exact in fp32
    out[:, (pieces - 1) * e :].copy_(rest)  # round to nearest even
    return out


class RouterGatingLinearFunction(torch.autograd.Function):
    """y = x.to(rd) @ weight.to(rd).T [+ bias.to(rd)] in dtype rd; grads in the inputs' dtypes."""

    @staticmethod
    def forward(ctx, x, weight, bias, router_dtype):
        # A public entry point (SPEC 6): checked here too, not only in router_gating_linear.
        _check_gate_args(x, weight, bias)
        rd = _function_router_dtype(router_dtype)
        plan = _plan(x, weight, rd)
        ctx.plan = plan
        ctx.router_dtype = rd
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        ctx.w_dtype = weight.dtype
        ctx.has_bias = bias is not None
        ctx.b_dtype = bias.dtype if bias is not None else None
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Only what backward reads, and only the originals: grad_x needs weight, grad_w needs x.
        ctx.save_for_backward(x if need_w else None, weight if need_x else None)
        with _no_autocast(x.device):
            if plan == "fast":
                y = _mm_f32(x.reshape(-1, x.shape[-1]), weight.t())
                y = y.view(*x.shape[:-1], weight.shape[0])
                if bias is not None:
                    y = y + bias.to(rd)
                return y
            b = bias.to(rd) if bias is not None else None
            return F.linear(x.to(rd), weight.to(rd), b)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        rd = ctx.router_dtype
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        with _no_autocast(grad_out.device):
            g = grad_out.to(rd).reshape(-1, grad_out.shape[-1])
            if ctx.plan == "fast" and ctx.x_dtype == torch.bfloat16:
                grad_x, grad_w = _fast_backward(g, x, weight, need_x, need_w, ctx.w_dtype)
            else:
                if need_x:
                    grad_x = g.mm(weight.to(rd)).to(ctx.x_dtype)
                if need_w:
                    x2d = x.reshape(-1, x.shape[-1]).to(rd)
                    grad_w = g.t().mm(x2d).to(ctx.w_dtype)
            if need_b and ctx.has_bias:
                grad_b = g.sum(0).to(ctx.b_dtype)
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, grad_w, grad_b, None


def _fast_backward(g, x, weight, need_x, need_w, w_dtype):
    """Backward GEMMs on bf16 tensor cores with fp32 accumulation; g is the fp32 [T, E] gradient.

    The fast plan requires x.dtype == weight.dtype, so grad_x is produced in weight.dtype. Only
    what a needed gradient reads was saved: `weight` is None when x needs no gradient, hence
    `w_dtype`.
    """
    n = BACKWARD_GRAD_SPLITS
    if resolve_backend(BACKWARD_BACKEND, g.device, available=_HAVE_SPLIT_KERNEL) == "triton":
        from moeprec.kernels.router_grad_split import split_grad

        gs = split_grad(g, n)  # [T, n*E]
    else:
        gs = _split_to_bf16(g, n)
    grad_x = grad_w = None
    if need_x:
        # [g_1 | g_2 | ...] @ [W; W; ...]: one GEMM whose fp32 accumulator sums the pieces. Its
        # bf16 output is one rounding of that accumulator, as `.to(bf16)` of an fp32 result, at
        # half the memory traffic of an fp32 [T, D] output. (cuBLAS may reduce split-K partials in
        # bf16 when torch's allow_bf16_reduced_precision_reduction is on; the reduction here is
        # only n*E long, which it has no reason to split; the GPU test checks the result.)
        ws = torch.cat([weight] * n, dim=0) if n > 1 else weight
        grad_x = torch.mm(gs, ws)
    if need_w:
        # [g_1 | g_2 | ...]^T @ x: one GEMM reading x once, [n*E, D] fp32, then the pieces summed.
        x2d = x.reshape(-1, x.shape[-1])
        gw = _mm_f32(gs.t(), x2d)
        grad_w = gw.view(n, -1, gw.shape[-1]).sum(0).to(w_dtype)
    return grad_x, grad_w


def _function_router_dtype(router_dtype: Any) -> torch.dtype:
    """The Function's GEMM dtype: fp32/fp64 (None, plain F.linear, is router_gating_linear's)."""
    rd = parse_router_dtype(router_dtype)
    if rd is None:
        raise ValueError(
            "router_dtype: expected torch.float32 or torch.float64 ('fp32'/'fp64') for "
            "RouterGatingLinearFunction, got None (for the model dtype call "
            "router_gating_linear(x, weight, None, bias): plain F.linear)"
        )
    return rd


def _check_gate_args(x: Any, weight: Any, bias: Any) -> None:
    check_floating("x", x)
    check_floating("weight", weight)
    check_tensor("weight", weight, ndim=2, device=x.device)
    if x.dim() < 1:
        raise ValueError(f"x: expected a tensor of shape [..., {weight.shape[1]}], got a 0-D tensor")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x: expected last dim {weight.shape[1]} (weight.shape[1], the hidden size), "
            f"got shape {tuple(x.shape)}"
        )
    if bias is not None:
        check_floating("bias", bias)
        check_tensor("bias", bias, shape=(weight.shape[0],), device=x.device)


def router_gating_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    router_dtype: Any = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gate logits [..., E]: plain F.linear in the model dtype for router_dtype None, else in rd."""
    _check_gate_args(x, weight, bias)
    rd = parse_router_dtype(router_dtype)
    if rd is None:
        # plain F.linear in the model dtype: one dtype for all operands (autocast, which casts
        # them itself, excepted)
        checked = () if _autocast_on(x.device) else (("weight", weight), ("bias", bias))
        for name, t in checked:
            if t is not None and t.dtype != x.dtype:
                raise TypeError(
                    f"{name}: expected dtype {x.dtype} (x's; router_dtype None runs F.linear in "
                    f"the model dtype), got {t.dtype}"
                )
        return F.linear(x, weight, bias)
    return RouterGatingLinearFunction.apply(x, weight, bias, rd)


class RouterGateLinear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) whose GEMM runs in `router_dtype`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        router_dtype: Any = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        check_bool("bias", bias)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.router_dtype = parse_router_dtype(router_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return router_gating_linear(x, self.weight, self.router_dtype, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, router_dtype={self.router_dtype}"
