"""Gated activations of the expert MLPs and the row order of the fused gate/up projection.

`w1` stacks the gate and up projections along its output rows ([E, 2I, H]):
- "separated": rows [g0 .. g(I-1), u0 .. u(I-1)] (Qwen3-MoE, Mixtral, DeepSeek, vLLM);
- "interleaved": rows [g0, u0, g1, u1, ...] (gpt-oss).
The same order holds for the first bias and for the columns of h = x @ w1^T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeprec._validation import check_choice
from moeprec.backends import triton_available

ACTIVATIONS = ("silu", "swiglu_oai")
GATE_MODES = ("separated", "interleaved")
SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0


def split_gate_up(h: torch.Tensor, gate_mode: str = "separated") -> tuple[torch.Tensor, torch.Tensor]:
    """Split the last dim (2I) of h into (gate, up), each [..., I]."""
    check_choice("gate_mode", gate_mode, GATE_MODES)
    if h.shape[-1] % 2:
        raise ValueError(f"h: expected an even last dim (2 * intermediate), got {h.shape[-1]}")
    if gate_mode == "separated":
        return h.chunk(2, dim=-1)
    return h[..., 0::2], h[..., 1::2]


def silu_and_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


def swiglu_oai(
    g: torch.Tensor, u: torch.Tensor, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT
) -> torch.Tensor:
    """gpt-oss SwiGLU: the gate is clamped from above only, up on both sides, and up gets +1."""
    g = g.clamp(max=limit)
    u = u.clamp(min=-limit, max=limit)
    return g * torch.sigmoid(alpha * g) * (u + 1)


def gated_activation(
    h: torch.Tensor,
    activation: str = "silu",
    gate_mode: str = "separated",
    alpha: float = SWIGLU_ALPHA,
    limit: float = SWIGLU_LIMIT,
) -> torch.Tensor:
    """act(gate(h), up(h)) for h [..., 2I] -> [..., I], in h's dtype."""
    check_choice("activation", activation, ACTIVATIONS)
    g, u = split_gate_up(h, gate_mode)
    if activation == "silu":
        return silu_and_mul(g, u)
    return swiglu_oai(g, u, alpha, limit)


# ------------------------------------------------------------------------------------------------
# The experts' gated activation in training (GroupedExperts).

# Who computes it: "triton" (moeprec/kernels/gated_act.py: one kernel each way, fp32 math
# rounded once, backward reads h and grad_z once; opaque to torch.compile; used for CUDA tensors
# when Triton is installed, the torch ops otherwise) or "torch" (the ops of `gated_activation`,
# which Inductor fuses under torch.compile). "triton" as measured on an H200 (docs/training.md): eager
# fwd+bwd 1.12x (Qwen3-30B-A3B) and 1.25x (gpt-oss-20b) faster, compiled 1.02x and 0.98x.
TRAINING_ACT_BACKEND = "triton"
_ACT_KERNELS = "moeprec.kernels.gated_act"
_HAVE_ACT_KERNELS = triton_available(_ACT_KERNELS)  # decided at import: compile-safe


def _gated_act_forward_reference(h, swiglu, interleaved, alpha, limit):
    # the torch ops in fp32, rounded once to h's dtype (as the kernel)
    return gated_activation(h.float(), "swiglu_oai" if swiglu else "silu",
                            "interleaved" if interleaved else "separated", alpha, limit).to(h.dtype)


def _gated_act_backward_reference(h, grad_z, swiglu, interleaved, alpha, limit):
    g, u = (t.float() for t in split_gate_up(h, "interleaved" if interleaved else "separated"))
    gz = grad_z.float()
    if swiglu:
        gc, uc = g.clamp(max=limit), u.clamp(min=-limit, max=limit)
        s = torch.sigmoid(alpha * gc)
        dg = torch.where(g <= limit, gz * (uc + 1) * s * (1 + alpha * gc * (1 - s)), 0.0)
        du = torch.where((u >= -limit) & (u <= limit), gz * gc * s, 0.0)
    else:
        s = torch.sigmoid(g)
        dg, du = gz * u * s * (1 + g * (1 - s)), gz * g * s
    if interleaved:
        return torch.stack((dg, du), dim=-1).flatten(-2).to(h.dtype)
    return torch.cat((dg, du), dim=-1).to(h.dtype)


@torch.library.custom_op("moeprec::gated_act_forward", mutates_args=())
def _gated_act_forward(h: torch.Tensor, swiglu: bool, interleaved: bool, alpha: float,
                       limit: float) -> torch.Tensor:
    if h.is_cuda:
        from moeprec.kernels.gated_act import gated_act_forward

        return gated_act_forward(h, swiglu, interleaved, alpha, limit)
    return _gated_act_forward_reference(h, swiglu, interleaved, alpha, limit)


@_gated_act_forward.register_fake
def _(h, swiglu, interleaved, alpha, limit):
    return h.new_empty((h.shape[0], h.shape[1] // 2))


@torch.library.custom_op("moeprec::gated_act_backward", mutates_args=())
def _gated_act_backward(h: torch.Tensor, grad_z: torch.Tensor, swiglu: bool, interleaved: bool,
                        alpha: float, limit: float) -> torch.Tensor:
    if h.is_cuda:
        from moeprec.kernels.gated_act import gated_act_backward

        return gated_act_backward(h, grad_z.contiguous(), swiglu, interleaved, alpha, limit)
    return _gated_act_backward_reference(h, grad_z, swiglu, interleaved, alpha, limit)


@_gated_act_backward.register_fake
def _(h, grad_z, swiglu, interleaved, alpha, limit):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


class _GatedActivation(torch.autograd.Function):
    """The fused gated activation; keeps only h for backward."""

    @staticmethod
    def forward(ctx, h, swiglu, interleaved, alpha, limit):
        ctx.save_for_backward(h)
        ctx.args = (swiglu, interleaved, alpha, limit)
        return _gated_act_forward(h, swiglu, interleaved, alpha, limit)

    @staticmethod
    def backward(ctx, grad_z):
        (h,) = ctx.saved_tensors
        return _gated_act_backward(h, grad_z, *ctx.args), None, None, None, None


def training_gated_activation(
    h: torch.Tensor,
    activation: str = "silu",
    gate_mode: str = "separated",
    alpha: float = SWIGLU_ALPHA,
    limit: float = SWIGLU_LIMIT,
) -> torch.Tensor:
    """`gated_activation` as the training path runs it: the Triton kernels where
    `TRAINING_ACT_BACKEND` is "triton" and h is a 2D CUDA tensor of a 16/32-bit float dtype with
    unit column stride; the torch ops otherwise."""
    if (
        TRAINING_ACT_BACKEND == "triton"
        and _HAVE_ACT_KERNELS
        and h.is_cuda
        and h.dim() == 2
        and h.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and h.stride(-1) == 1
        and h.shape[-1] % 2 == 0
    ):
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("gate_mode", gate_mode, GATE_MODES)
        return _GatedActivation.apply(h, activation == "swiglu_oai", gate_mode == "interleaved",
                                      float(alpha), float(limit))
    return gated_activation(h, activation, gate_mode, alpha, limit)


def convert_gate_up_order(t: torch.Tensor, src: str, dst: str, dim: int = -2) -> torch.Tensor:
    """Reorder the 2I gate/up rows of `t` along `dim` from gate mode `src` to `dst`.

    Use dim=-2 for weights [E, 2I, H] and dim=-1 for biases [E, 2I].
    """
    check_choice("src", src, GATE_MODES)
    check_choice("dst", dst, GATE_MODES)
    if src == dst:
        return t
    n = t.shape[dim]
    if n % 2:
        raise ValueError(f"t: expected an even size (2 * intermediate) on dim {dim}, got {n}")
    t = t.movedim(dim, 0)
    if src == "separated":  # [g..., u...] -> [g0, u0, g1, u1, ...]
        out = torch.stack(t.chunk(2, dim=0), dim=1).flatten(0, 1)
    else:  # interleaved -> separated
        out = torch.cat([t[0::2], t[1::2]], dim=0)
    return out.movedim(0, dim).contiguous()
