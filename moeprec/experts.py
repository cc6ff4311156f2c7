"""GroupedExperts: the routed experts' gated MLPs over tokens sorted by expert (training layer).

Layout and math are those of `fused_moe` (SPEC 4): `w1 [E, 2I, D]` holds the gate and up rows
(`gate_mode` says their order), `w2 [E, D, I]`, optional biases `b1 [E, 2I]`, `b2 [E, D]`:

    y_t = act(gate(h), up(h)) @ w2[e]^T + b2[e],   h = x_t @ w1[e]^T + b1[e],   e = expert of row t

Rows of `x` are grouped by expert; `num_tokens_per_expert[e]` rows belong to expert e, in order.

Two implementations of the grouped GEMM `out[rows of e] = a[rows of e] @ b[e]`, chosen in one place
(`grouped_mm`):
- native: `torch._grouped_mm` / `F.grouped_mm` for bf16 where the build supports the device
  (CUDA Hopper; CPU in torch 2.13, probed once). Other dtypes take the loop: torch 2.13 runs
  fp32/fp16 eagerly on CPU, but its compile-time (meta) implementation accepts bf16 only. Offsets are a device tensor:
  no host sync, and per-expert counts are data, so `torch.compile` never recompiles for them.
- loop: one GEMM per expert, wrapped as `torch.library` custom ops with a fake (shape-only)
  implementation and an autograd formula. The loop reads the offsets on the host, which is fine
  on CPU; wrapping it as an opaque op keeps `torch.compile(fullgraph=True)` free of graph breaks.
  On CUDA this path syncs once per GEMM (only reached for dtypes/shapes the native op rejects).

`grouped_experts_loop` is the plain, eager, readable reference of the whole layer.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moeprec._validation import (
    check_bool,
    check_choice,
    check_floating,
    check_positive_int,
    check_real,
    check_tensor,
)
from moeprec.activations import (
    ACTIVATIONS,
    GATE_MODES,
    SWIGLU_ALPHA,
    SWIGLU_LIMIT,
    gated_activation,
    training_gated_activation,
)
from moeprec.init import trunc_normal_

__all__ = ["GroupedExperts", "grouped_experts_loop", "grouped_mm", "native_grouped_mm_supported"]

_native_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


# ----------------------------------------------------------------------------------------------
# Reference: a readable loop over experts (eager only: it reads the counts on the host).
# ----------------------------------------------------------------------------------------------


def grouped_experts_loop(
    x: torch.Tensor,
    num_tokens_per_expert: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    activation: str = "silu",
    gate_mode: str = "separated",
    swiglu_alpha: float = SWIGLU_ALPHA,
    swiglu_limit: float = SWIGLU_LIMIT,
) -> torch.Tensor:
    """Reference of GroupedExperts.forward: one plain MLP per expert over its rows of `x`."""
    out = x.new_zeros(x.shape[0], w2.shape[1])
    start = 0
    for e, n in enumerate(num_tokens_per_expert.tolist()):
        rows = x[start : start + n]
        h = F.linear(rows, w1[e], None if b1 is None else b1[e])
        z = gated_activation(h, activation, gate_mode, swiglu_alpha, swiglu_limit)
        out[start : start + n] = F.linear(z, w2[e], None if b2 is None else b2[e])
        start += n
    return out


# ----------------------------------------------------------------------------------------------
# Loop grouped GEMM as custom ops (opaque to torch.compile, with fake impls and autograd).
# ----------------------------------------------------------------------------------------------


def _bounds(offs: torch.Tensor) -> list[tuple[int, int]]:
    ends = offs.tolist()
    return list(zip([0] + ends[:-1], ends))


@torch.library.custom_op("moeprec::grouped_mm_loop", mutates_args=())
def _grouped_mm_loop(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """out[s:t] = a[s:t] @ b[e] for expert e's rows [s, t) (ends in `offs`); other rows are 0."""
    out = a.new_zeros(a.shape[0], b.shape[-1])
    for e, (s, t) in enumerate(_bounds(offs)):
        if t > s:
            torch.mm(a[s:t], b[e], out=out[s:t])
    return out


@_grouped_mm_loop.register_fake
def _(a, b, offs):
    return a.new_empty(a.shape[0], b.shape[-1])


@torch.library.custom_op("moeprec::grouped_mm_wgrad_loop", mutates_args=())
def _grouped_mm_wgrad_loop(a: torch.Tensor, g: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """grad_b[e] = a[s:t]^T @ g[s:t] (zeros for experts without rows)."""
    out = a.new_zeros(offs.shape[0], a.shape[-1], g.shape[-1])
    for e, (s, t) in enumerate(_bounds(offs)):
        if t > s:
            torch.mm(a[s:t].T, g[s:t], out=out[e])
    return out


@_grouped_mm_wgrad_loop.register_fake
def _(a, g, offs):
    return a.new_empty(offs.shape[0], a.shape[-1], g.shape[-1])


def _grouped_mm_loop_setup(ctx, inputs, output):
    a, b, offs = inputs
    ctx.save_for_backward(a, b, offs)


def _grouped_mm_loop_backward(ctx, grad):
    a, b, offs = ctx.saved_tensors
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_a = _grouped_mm_loop(grad, b.transpose(-2, -1), offs)
    if ctx.needs_input_grad[1]:
        grad_b = _grouped_mm_wgrad_loop(a, grad, offs)
    return grad_a, grad_b, None


_grouped_mm_loop.register_autograd(_grouped_mm_loop_backward, setup_context=_grouped_mm_loop_setup)


# ----------------------------------------------------------------------------------------------
# Native grouped GEMM, with its support probe and the stride-0 gradient fix.
# ----------------------------------------------------------------------------------------------


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    `_grouped_mm`'s backward rejects expanded (stride-0) gradients such as `out.sum().backward()`
    produces (seen on torch 2.11 CUDA and 2.13 CPU), so every native grouped GEMM output goes
    through this.
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


_PROBED: dict[tuple[str, torch.dtype], bool] = {}


@torch.compiler.assume_constant_result
def native_grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch build runs `_grouped_mm` forward and backward for (device, dtype).

    Probed once per pair with a tiny problem and cached; `torch.compile` treats the answer as a
    constant, so the probe never enters a graph.
    """
    key = (device_type, dtype)
    if key not in _PROBED:
        _PROBED[key] = _probe_native(device_type, dtype)
    return _PROBED[key]


def _probe_native(device_type: str, dtype: torch.dtype) -> bool:
    if _native_grouped_mm is None:
        return False
    try:
        with torch.enable_grad():
            a = torch.randn(32, 16, device=device_type, dtype=dtype, requires_grad=True)
            b = torch.randn(2, 16, 16, device=device_type, dtype=dtype, requires_grad=True)
            offs = torch.tensor([16, 32], device=device_type, dtype=torch.int32)
            out = _native_grouped_mm(a, b.transpose(-2, -1), offs=offs)
            out.backward(torch.ones_like(out))
            ref = a.detach()[:16] @ b.detach()[0].T
            ok = bool(torch.allclose(out.detach()[:16].float(), ref.float(), rtol=5e-2, atol=5e-1))
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False
    return ok


def _native_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    # bf16 only: the op runs other dtypes eagerly on some builds, but its meta (compile-time)
    # implementation accepts bf16 alone, and eager and compiled runs must take the same path.
    # Grouped GEMMs (TMA on CUDA, checked by the meta function everywhere) need 16-byte aligned
    # rows: K and N multiples of 8 bf16 elements.
    if a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16:
        return False
    if a.shape[-1] % 8 or b.shape[-1] % 8:
        return False
    return native_grouped_mm_supported(a.device.type, a.dtype)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Differentiable grouped GEMM: `out[rows of e] = a[rows of e] @ b[e]`.

    a [T, K], b [E, K, N] (any strides, e.g. `w.transpose(-2, -1)`), offs [E] int32 cumulative row
    ends. Rows past `offs[-1]` are unspecified. Picks the native op where supported, else the loop.
    """
    if _native_ok(a, b):
        return _ContiguousGrad.apply(_native_grouped_mm(a, b, offs=offs))
    return _grouped_mm_loop(a, b, offs)


# ----------------------------------------------------------------------------------------------
# The module.
# ----------------------------------------------------------------------------------------------


def _check_counts(counts: torch.Tensor, num_rows: int) -> None:
    if bool((counts < 0).any()):
        raise ValueError(f"num_tokens_per_expert: expected non-negative counts, got {counts.tolist()}")
    total = int(counts.sum())
    if total > num_rows:
        raise ValueError(
            f"num_tokens_per_expert: expected counts summing to at most x's {num_rows} rows, got {total}"
        )


class GroupedExperts(nn.Module):
    """E gated MLPs applied to tokens grouped by expert (the training path of MoE).

    forward(x [T, D] grouped by expert, num_tokens_per_expert [E]) -> [T, D], in the parameters'
    dtype (x is cast to it). With a single expert `num_tokens_per_expert` may be None (dense MLP:
    how MoE runs its shared experts). Rows of x past `sum(num_tokens_per_expert)` give zeros;
    `zero_uncounted_rows=False` leaves them unspecified and skips that [T, D] pass (MoE does:
    its counts cover every row). Counts that are negative or sum past T raise on CPU; on GPU
    (no sync) they are clamped.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        activation: str = "silu",
        gate_mode: str = "separated",
        bias: bool = False,
        swiglu_alpha: float = SWIGLU_ALPHA,
        swiglu_limit: float = SWIGLU_LIMIT,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("hidden_dim", hidden_dim)
        check_positive_int("num_experts", num_experts)
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("gate_mode", gate_mode, GATE_MODES)
        check_bool("bias", bias)
        check_real("swiglu_alpha", swiglu_alpha)
        check_real("swiglu_limit", swiglu_limit, positive=True)
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.num_experts = num_experts
        self.activation = activation
        self.gate_mode = gate_mode
        self.swiglu_alpha = float(swiglu_alpha)
        self.swiglu_limit = float(swiglu_limit)
        self.quant = "none"  # "mxfp4" | "fp8" after quantize_ (weights become buffers)
        kw = {"device": device, "dtype": dtype}
        self.w1 = nn.Parameter(torch.empty(num_experts, 2 * hidden_dim, dim, **kw))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim, **kw))
        if bias:
            self.b1 = nn.Parameter(torch.empty(num_experts, 2 * hidden_dim, **kw))
            self.b2 = nn.Parameter(torch.empty(num_experts, dim, **kw))
        else:
            self.register_parameter("b1", None)
            self.register_parameter("b2", None)
        self.init_weights()

    # After quantize_/load_quantized_ the weights are format data (fp8 or packed uint8, fp32
    # scales and biases): `.to(dtype)` / `.bfloat16()` must not convert them (fp8 is a floating
    # dtype torch would cast, and bf16 scales would lose their bits). Device moves still apply.
    _QUANTIZED_BUFFERS = ("w1", "w2", "w1_scale", "w2_scale", "b1", "b2")

    def _apply(self, fn, recurse=True):
        if self.quant == "none":
            return super()._apply(fn, recurse)
        kept = {n: self._buffers.pop(n) for n in self._QUANTIZED_BUFFERS if n in self._buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in kept.items():
                self._buffers[name] = t
        for name, t in kept.items():
            if t is not None:
                device = fn(t).device  # where the cast/move would put it; dtype left alone
                if device != t.device:
                    self._buffers[name] = t.to(device)
        return self

    @property
    def has_bias(self) -> bool:
        return self.b1 is not None

    def init_weights(self, init_std: float = 0.02) -> None:
        """Normal(0, init_std) weights (w1 and w2), zero biases, as torchtitan's experts."""
        with torch.no_grad():
            trunc_normal_(self.w1, std=init_std)  # in fp32: see moeprec.init
            trunc_normal_(self.w2, std=init_std)
            if self.has_bias:
                self.b1.zero_()
                self.b2.zero_()

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, "
            f"activation={self.activation!r}, gate_mode={self.gate_mode!r}, bias={self.has_bias}"
        )

    def forward(
        self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor | None = None, *,
        zero_uncounted_rows: bool = True,
    ) -> torch.Tensor:
        check_floating("x", x)
        check_tensor("x", x, shape=(None, self.dim), device=self.w1.device)
        check_bool("zero_uncounted_rows", zero_uncounted_rows)
        if self.quant != "none":
            raise RuntimeError(
                f"GroupedExperts: the weights are quantized ({self.quant!r}); quantized experts run "
                "through moeprec.fused_moe (MoE.forward does this after MoE.quantize_)"
            )
        x = x.to(self.w1.dtype)
        if num_tokens_per_expert is None:
            if self.num_experts != 1:
                raise ValueError(
                    f"num_tokens_per_expert: expected a [{self.num_experts}] tensor, got None "
                    "(None is only allowed with a single expert)"
                )
            return self._dense_forward(x)
        check_tensor("num_tokens_per_expert", num_tokens_per_expert, shape=(self.num_experts,))
        if num_tokens_per_expert.dtype.is_floating_point or num_tokens_per_expert.dtype == torch.bool:
            raise TypeError(
                f"num_tokens_per_expert: expected an integer tensor, got {num_tokens_per_expert.dtype}"
            )
        counts = num_tokens_per_expert
        if counts.device.type == "cpu" and not torch.compiler.is_compiling():
            _check_counts(counts, x.shape[0])  # free on the host; on a GPU it would sync
        # Clamped on device so that no count can make a GEMM read past x: negative counts act
        # as 0 and rows past the end of x are dropped.
        offs = torch.cumsum(counts.to(device=x.device).clamp(min=0), 0).clamp(max=x.shape[0])
        offs = offs.to(torch.int32)
        h = grouped_mm(x, self.w1.transpose(-2, -1), offs)
        row_expert = None
        if self.has_bias or zero_uncounted_rows:
            # expert of each row, from the offsets on device (no host sync); rows past the last
            # offset get expert E (out of range): they take expert E-1's bias and are zeroed.
            rows = torch.arange(x.shape[0], device=x.device, dtype=torch.int32)
            row_expert = torch.searchsorted(offs, rows, right=True)
        if self.has_bias:
            h = h + self.b1[row_expert.clamp(max=self.num_experts - 1)]
        z = training_gated_activation(h, self.activation, self.gate_mode, self.swiglu_alpha,
                                      self.swiglu_limit)
        y = grouped_mm(z, self.w2.transpose(-2, -1), offs)
        if self.has_bias:
            y = y + self.b2[row_expert.clamp(max=self.num_experts - 1)]
        if not zero_uncounted_rows:
            return y
        return torch.where((row_expert < self.num_experts).unsqueeze(-1), y, 0.0)

    @torch.no_grad()
    def quantize_(self, quant: str, scale_mode: str = "rceil") -> GroupedExperts:
        """Replace the weights by `fused_moe`'s quantized buffers (inference only), in place.

        "mxfp4": w1/w2 packed uint8 + E8M0 scales w1_scale/w2_scale (dim and hidden_dim multiples
        of 32). "fp8": float8_e4m3fn + fp32 per-output-channel scales [E, N]. Biases become fp32
        buffers, as fused_moe reads them. After this, forward raises: use fused_moe.
        """
        check_choice("quant", quant, ("mxfp4", "fp8"))
        if self.quant != "none":
            raise RuntimeError(f"GroupedExperts: already quantized ({self.quant!r})")
        if quant == "mxfp4":
            from moeprec.formats.layout import check_mxfp4_sizes
            from moeprec.formats.mxfp4 import quantize_mxfp4

            check_mxfp4_sizes(("dim", self.dim), ("hidden_dim", self.hidden_dim))
            (w1, s1), (w2, s2) = quantize_mxfp4(self.w1, scale_mode), quantize_mxfp4(self.w2, scale_mode)
        else:
            from moeprec.formats.fp8 import quantize_fp8

            (w1, s1), (w2, s2) = quantize_fp8(self.w1, "per_channel"), quantize_fp8(self.w2, "per_channel")
            s1, s2 = s1.squeeze(-1), s2.squeeze(-1)  # [E, N, 1] -> [E, N], fused_moe's layout
        b1, b2 = (self.b1, self.b2) if self.has_bias else (None, None)
        return self.load_quantized_(quant, w1, s1, w2, s2, b1, b2)

    @torch.no_grad()
    def load_quantized_(
        self,
        quant: str,
        w1: torch.Tensor,
        w1_scale: torch.Tensor,
        w2: torch.Tensor,
        w2_scale: torch.Tensor,
        b1: torch.Tensor | None = None,
        b2: torch.Tensor | None = None,
    ) -> GroupedExperts:
        """Take already quantized weights in `fused_moe`'s layout (e.g. a gpt-oss MXFP4 checkpoint
        read by `moeprec.integrations.gpt_oss`), in place of the dense ones. Inference only."""
        check_choice("quant", quant, ("mxfp4", "fp8"))
        if self.quant != "none":
            raise RuntimeError(f"GroupedExperts: already quantized ({self.quant!r})")
        from moeprec.formats.layout import check_expert_weights

        if self.has_bias:
            check_floating("b1", b1)
            check_floating("b2", b2)
        elif b1 is not None or b2 is not None:
            name = "b1" if b1 is not None else "b2"
            raise ValueError(f"{name}: expected None for experts built with bias=False, got a tensor")
        check_expert_weights(quant, w1, w1_scale, w2, w2_scale, b1, b2, bias_names=("b1", "b2"),
                             dims=(self.num_experts, self.hidden_dim, self.dim),
                             size_names=("dim", "hidden_dim"))
        tensors = {"w1": w1, "w2": w2, "w1_scale": w1_scale, "w2_scale": w2_scale}
        if self.has_bias:
            tensors.update(b1=b1.float(), b2=b2.float())
        for name, t in tensors.items():
            if name in self._parameters:
                del self._parameters[name]
            self.register_buffer(name, t.contiguous())
        self.quant = quant
        return self

    def _dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.w1[0], None if self.b1 is None else self.b1[0])
        z = training_gated_activation(h, self.activation, self.gate_mode, self.swiglu_alpha,
                                      self.swiglu_limit)
        return F.linear(z, self.w2[0], None if self.b2 is None else self.b2[0])
