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
