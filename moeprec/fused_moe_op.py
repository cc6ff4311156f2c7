"""The fused MoE op: experts' gated MLPs over routed tokens, combined per token (SPEC 4).

`fused_moe` validates its arguments, resolves the activation dtype (act_policy) and hands the
work to a backend chosen in one place (`moeprec.backends`): the pure-torch reference
`fused_moe_torch`, or the Triton kernels in `moeprec.kernels.fused_moe_triton`.

Reference semantics, for token t and slot j with e = topk_ids[t, j] (skipped when
expert_mask[e] == 0):
    h = Q(x_t) @ W1_e^T            (fp32 accumulate; `* w_tj` here when apply_router_weight_on_input)
        + bias1_e
    z = act(gate(h), up(h))        rounded to hidden_states.dtype
    y = Q(z) @ W2_e^T + bias2_e
    out_t += w_tj * y              (fp32 accumulator; no `w_tj` here when applied on input)
and out is cast to hidden_states.dtype. Q is the activation quantizer of the act dtype:
identity ("bf16"), per-token dynamic E4M3 ("fp8"), MXFP4 with rceil scales ("fp4"); each
quantizer works within one token's row, so a NaN in one token never reaches another.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from moeprec._validation import check_bool, check_choice, check_real, check_tensor
from moeprec.act_policy import ACT_DTYPE_CHOICES, QUANTS, resolve_act_dtype
from moeprec.activations import ACTIVATIONS, GATE_MODES, SWIGLU_ALPHA, SWIGLU_LIMIT, gated_activation
from moeprec.backends import BACKENDS, FP8_CAPABILITY, needs_fp8, resolve_backend
from moeprec.dispatch import INDEX_DTYPES, MASK_DTYPES
from moeprec.formats.fp8 import fake_quantize_fp8
from moeprec.formats.layout import check_expert_weights
from moeprec.formats.mxfp4 import MX_BLOCK, dequantize_mxfp4, fake_quantize_mxfp4

HIDDEN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- validation


def _validate(
    hidden_states, w1, w2, topk_weights, topk_ids, *, activation, gate_mode, swiglu_alpha,
    swiglu_limit, quant, w1_scale, w2_scale, act_dtype, bias1, bias2, expert_mask,
    apply_router_weight_on_input, backend, check_topk_ids,
) -> tuple[int, int]:
    """Check every argument (SPEC 6); returns (E, I)."""
    check_choice("quant", quant, QUANTS)
    check_choice("act_dtype", act_dtype, ACT_DTYPE_CHOICES)
    check_choice("activation", activation, ACTIVATIONS)
    check_choice("gate_mode", gate_mode, GATE_MODES)
    check_choice("backend", backend, BACKENDS)
    check_real("swiglu_alpha", swiglu_alpha)
    check_real("swiglu_limit", swiglu_limit, positive=True)
    check_bool("apply_router_weight_on_input", apply_router_weight_on_input)
    check_bool("check_topk_ids", check_topk_ids)

    check_tensor("hidden_states", hidden_states, ndim=2, dtypes=HIDDEN_DTYPES)
    dev = hidden_states.device
    M, H = hidden_states.shape
    if H == 0:
        raise ValueError("hidden_states: expected a non-empty hidden dim, got shape (M, 0)")
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES, device=dev)
    if topk_ids.shape[0] != M:
        raise ValueError(
            f"topk_ids: expected shape ({M}, k) to match hidden_states' {M} tokens, "
            f"got {tuple(topk_ids.shape)}"
        )
    k = topk_ids.shape[1]
    check_tensor("topk_weights", topk_weights, shape=(M, k), dtypes=_FLOAT_DTYPES, device=dev)

    # w1 [E, 2I, H or H/2]: E and 2I come from it, H from hidden_states.
    E, I, _ = check_expert_weights(
        quant, w1, w1_scale, w2, w2_scale, bias1, bias2,
        hidden_size=H, device=dev, bias_dtypes=_FLOAT_DTYPES,
    )
    check_tensor("expert_mask", expert_mask, shape=(E,), dtypes=MASK_DTYPES, device=dev,
                 optional=True)
    return E, I


def _check_ids_in_range(topk_ids: torch.Tensor, num_experts: int) -> None:
    bad = (topk_ids < 0) | (topk_ids >= num_experts)
    if bool(bad.any()):  # host sync: skipped with check_topk_ids=False
        value = int(topk_ids[bad][0])
        raise ValueError(
            f"topk_ids: expected expert ids in [0, {num_experts}), got {value} "
            f"(pass check_topk_ids=False to treat such ids as masked without a host sync)"
        )


# ----------------------------------------------------------------------------- torch reference


def _quantize_act(x: torch.Tensor, act_dtype: str) -> torch.Tensor:
    """Q(x) in fp32: what a low-precision GEMM sees of its activations (exact in fp32)."""
    x = x.float()
    # backend="torch": the reference stays pure torch even on CUDA.
    if act_dtype == "fp8":
        return fake_quantize_fp8(x, granularity="per_token", backend="torch")
    if act_dtype == "fp4":
        return fake_quantize_mxfp4(x, scale_mode="rceil", backend="torch")
    return x


def _expert_weight(w: torch.Tensor, scale: torch.Tensor | None, e: int, quant: str) -> torch.Tensor:
    """Expert e's weight matrix dequantized to fp32 (one expert at a time: bounded memory)."""
    if quant == "mxfp4":
        # E2M1 * 2^k with k in [-127, 127] is exact in fp32.
        return dequantize_mxfp4(w[e], scale[e], dtype=torch.float32)
    if quant == "fp8":
        return w[e].float() * scale[e].float().unsqueeze(-1)
    return w[e].float()


def _fused_moe_torch_impl(
    hidden_states, w1, w2, topk_weights, topk_ids, *, activation, gate_mode, swiglu_alpha,
    swiglu_limit, quant, w1_scale, w2_scale, act_dtype, bias1, bias2, expert_mask,
    apply_router_weight_on_input,
) -> torch.Tensor:
    """The reference: one expert at a time, gathering that expert's (token, slot) pairs.

    Takes validated arguments with `act_dtype` resolved; ids outside [0, E) count as masked.
    """
    M, H = hidden_states.shape
    E = w1.shape[0]
    k = topk_ids.shape[1]
    dev = hidden_states.device

    flat_ids = topk_ids.reshape(-1).long()
    flat_w = topk_weights.reshape(-1).float()
    token_of = torch.arange(M * k, device=dev) // k
    keep = (flat_ids >= 0) & (flat_ids < E)
    if expert_mask is not None:
        keep &= (expert_mask != 0)[flat_ids.clamp(0, E - 1)]
    key = torch.where(keep, flat_ids, torch.full_like(flat_ids, E))  # E = dropped
    order = torch.argsort(key, stable=True)
    # The reference loops over experts on the host, so it reads the counts once.
    counts = torch.bincount(key, minlength=E + 1).tolist()

    xq = _quantize_act(hidden_states, act_dtype)  # per token row: quantize once for all experts
    out = torch.zeros(M, H, dtype=torch.float32, device=dev)
    start = 0
    for e in range(E):
        n = counts[e]
        if n == 0:
            continue
        sel = order[start : start + n]
        start += n
        tok = token_of[sel]
        w = flat_w[sel].unsqueeze(-1)

        h = xq[tok] @ _expert_weight(w1, w1_scale, e, quant).T
        if apply_router_weight_on_input:
            h = h * w
        if bias1 is not None:
            h = h + bias1[e].float()
        z = gated_activation(h, activation, gate_mode, swiglu_alpha, swiglu_limit)
        z = z.to(hidden_states.dtype)
        y = _quantize_act(z, act_dtype) @ _expert_weight(w2, w2_scale, e, quant).T
        if bias2 is not None:
            y = y + bias2[e].float()
        if not apply_router_weight_on_input:
            y = y * w
        out.index_add_(0, tok, y)
    return out.to(hidden_states.dtype)


# ----------------------------------------------------------------------------- backends


_TRITON_KERNELS = "moeprec.kernels.fused_moe_triton"


def _load_triton() -> Callable[..., torch.Tensor]:
    from moeprec.kernels.fused_moe_triton import fused_moe_triton  # imports Triton: lazily

    return fused_moe_triton


def _pick_backend(backend: str, device: torch.device, fp8: bool) -> Callable[..., torch.Tensor]:
    """The implementation of `backend` (moeprec.backends decides which) on `device`; `fp8`: the
    kernels of this call convert through fp8 (fp8 or MXFP4 weights, fp8 activations)."""
    need = FP8_CAPABILITY if fp8 else None
    if resolve_backend(backend, device, _TRITON_KERNELS, min_capability=need) == "torch":
        return _fused_moe_torch_impl
    return _load_triton()


# ----------------------------------------------------------------------------- public entry


def fused_moe(
    hidden_states: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "silu",
    gate_mode: str = "separated",
    swiglu_alpha: float = SWIGLU_ALPHA,
    swiglu_limit: float = SWIGLU_LIMIT,
    quant: str = "none",
    w1_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    act_dtype: str = "auto",
    bias1: torch.Tensor | None = None,
    bias2: torch.Tensor | None = None,
    expert_mask: torch.Tensor | None = None,
    apply_router_weight_on_input: bool = False,
    backend: str = "auto",
    precision: Any = None,
    check_topk_ids: bool = True,
) -> torch.Tensor:
    """MoE experts over routed tokens: `[M, H] -> [M, H]` in `hidden_states.dtype`.

    Weights: `w1 [E, 2I, H]` (gate/up rows per `gate_mode`), `w2 [E, H, I]` in bf16/fp16/fp32
    (`quant="none"`); packed MXFP4 uint8 `[E, 2I, H/2]`, `[E, H, I/2]` with E8M0 scales
    `[E, 2I, H/32]`, `[E, H, I/32]` (`"mxfp4"`); float8_e4m3fn with fp32 per-output-channel
    scales `[E, 2I]`, `[E, H]` (`"fp8"`). `bias1 [E, 2I]`, `bias2 [E, H]` optional.
    `act_dtype` "bf16" | "fp8" | "fp4" | "auto" (-> `select_act_dtype` with num_tokens=M, this
    device, and `precision`'s act fields: a PrecisionConfig or None). `expert_mask [E]`: nonzero
    for experts computed here (expert parallelism); others contribute nothing.
    `check_topk_ids=False` skips the host-syncing range check of `topk_ids`; ids outside
    [0, E) are then treated as masked. `backend`: "auto" (Triton on CUDA when installed, else
    torch), "torch", "triton" (CUDA, or CPU under TRITON_INTERPRET=1).
    The math is in the module docstring; `fused_moe_torch` is the reference.
    """
    E, I = _validate(
        hidden_states, w1, w2, topk_weights, topk_ids, activation=activation,
        gate_mode=gate_mode, swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit, quant=quant,
        w1_scale=w1_scale, w2_scale=w2_scale, act_dtype=act_dtype, bias1=bias1, bias2=bias2,
        expert_mask=expert_mask, apply_router_weight_on_input=apply_router_weight_on_input,
        backend=backend, check_topk_ids=check_topk_ids,
    )
    M, H = hidden_states.shape
    dev = hidden_states.device
    resolved = resolve_act_dtype(
        M, quant=quant, act_dtype=act_dtype, precision=precision, activation=activation,
        gate_mode=gate_mode, device=dev,
    )
    if resolved == "fp4" and (H % MX_BLOCK or I % MX_BLOCK):
        raise ValueError(
            f"act_dtype: 'fp4' (MXFP4 activations) needs hidden and intermediate sizes that are "
            f"multiples of {MX_BLOCK}, got {H} and {I}"
        )
    impl = _pick_backend(backend, dev, needs_fp8(quant, resolved))
    if check_topk_ids:
        _check_ids_in_range(topk_ids, E)
    if M == 0 or topk_ids.shape[1] == 0:
        return hidden_states.new_zeros(M, H)
    return impl(
        hidden_states, w1, w2, topk_weights, topk_ids, activation=activation,
        gate_mode=gate_mode, swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit, quant=quant,
        w1_scale=w1_scale, w2_scale=w2_scale, act_dtype=resolved, bias1=bias1, bias2=bias2,
        expert_mask=expert_mask, apply_router_weight_on_input=apply_router_weight_on_input,
    )


def fused_moe_torch(*args: Any, **kwargs: Any) -> torch.Tensor:
    """The pure-torch reference of `fused_moe`: same arguments (no `backend`) and math, any device.

    Processes one expert at a time: only that expert's weights are ever dequantized (to fp32),
    so a 128-expert MXFP4 layer needs little memory beyond its packed weights.
    """
    if "backend" in kwargs:
        raise TypeError("fused_moe_torch: unexpected argument 'backend' (it always runs 'torch')")
    return fused_moe(*args, backend="torch", **kwargs)


# Same signature as fused_moe minus `backend`, for help() and inspect.
_sig = inspect.signature(fused_moe)
fused_moe_torch.__signature__ = _sig.replace(  # type: ignore[attr-defined]
    parameters=[p for name, p in _sig.parameters.items() if name != "backend"]
)
del _sig
