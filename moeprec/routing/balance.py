"""Load balancing of the router: aux-loss-free expert bias, switch aux loss and z-loss (SPEC 2)."""

from __future__ import annotations


import torch

from moeprec._validation import check_floating, check_positive_int, check_real, check_tensor

_INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def count_tokens_per_expert(selected_experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 [E]: how many of the T*k assignments went to each expert.

    `bincount` in eager mode on CPU. On accelerators and under torch.compile the same counts come
    from a static-shape scatter-add: bincount sizes its output from the data, which costs a
    host-device sync on CUDA and a data-dependent shape in a graph.
    """
    flat = selected_experts.reshape(-1).to(torch.int64)
    if flat.device.type != "cpu" or torch.compiler.is_compiling():
        counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
        return counts.scatter_add_(0, flat, torch.ones_like(flat))
    return torch.bincount(flat, minlength=num_experts)


@torch.no_grad()
def update_expert_bias(
    expert_bias: torch.Tensor, tokens_per_expert: torch.Tensor, coeff: float
) -> torch.Tensor:
    """Aux-loss-free balancing, in place: raise the bias of under-loaded experts, lower the others.

    delta = coeff * sign(mean - counts); delta -= delta.mean(); expert_bias += delta.
    Returns `expert_bias`.
    """
    check_tensor("expert_bias", expert_bias, ndim=1, dtypes=(torch.float32,))
    check_tensor("tokens_per_expert", tokens_per_expert, shape=(expert_bias.shape[0],))
    check_real("coeff", coeff)
    counts = tokens_per_expert.to(device=expert_bias.device, dtype=torch.float32)
    delta = coeff * torch.sign(counts.mean() - counts)
    delta -= delta.mean()
    expert_bias += delta
    return expert_bias


def switch_aux_loss(
    scores: torch.Tensor, selected_experts: torch.Tensor, num_experts: int, top_k: int
) -> torch.Tensor:
    """E * sum_i f_i * P_i: f_i = share of the T*k assignments to expert i, P_i = mean score of i.

    Minimal (= 1 for softmax scores) when both are uniform; gradients flow through P only.
    Computed in at least fp32 (counts above 256 are not exact in bf16). Ids outside [0, E) raise
    on CPU; on accelerators and under torch.compile (no host sync) they count for no expert.
    """
    check_positive_int("num_experts", num_experts)
    check_positive_int("top_k", top_k)
    check_floating("scores", scores)
    check_tensor("scores", scores, ndim=2)
    if scores.shape[1] != num_experts:
        raise ValueError(
            f"scores: expected shape [T, {num_experts}] (num_experts), got {tuple(scores.shape)}"
        )
    check_tensor("selected_experts", selected_experts, shape=(scores.shape[0], top_k),
                 dtypes=_INDEX_DTYPES, device=scores.device)
    acc = torch.promote_types(scores.dtype, torch.float32)
    if scores.shape[0] == 0:
        return scores.new_zeros((), dtype=acc)
    ids = selected_experts.reshape(-1).to(torch.int64)
    valid = (ids >= 0) & (ids < num_experts)
    if ids.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(valid.all()):
            raise ValueError(
                f"selected_experts: expected expert ids in [0, {num_experts}), "
                f"got {int(ids[~valid][0])}"
            )
    # Static-shape count that never indexes past [E): invalid ids add 0 at a clamped slot.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, ids.clamp(0, num_experts - 1), valid.to(torch.int64))
    f = counts.to(acc) / (scores.shape[0] * top_k)
    p = scores.to(acc).mean(dim=0)
    return num_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean over tokens of logsumexp(logits)^2, computed in at least fp32."""
    check_floating("logits", logits)
    if logits.dim() < 1:
        raise ValueError(f"logits: expected a tensor of shape [..., E], got a 0-D tensor")
    if logits.numel() == 0:
        return logits.new_zeros((), dtype=torch.promote_types(logits.dtype, torch.float32))
    z = torch.logsumexp(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return (z * z).mean()
