"""Token -> expert block layout for grouped expert GEMMs (SPEC 4, vLLM semantics).

A fused MoE kernel walks `sorted_token_ids` one block of `block_size` rows at a time; every
block belongs to exactly one expert (`expert_ids[block]`), so a kernel program loads one
expert's weights and the (token, slot) pairs routed to it.
"""

from __future__ import annotations

import torch

from moeprec._validation import check_positive_int, check_tensor

INDEX_DTYPES = (torch.int32, torch.int64)
# expert_mask: nonzero = local expert (integers or bools; a float mask has no clear meaning)
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64)


def max_num_tokens_padded(num_assignments: int, num_experts: int, block_size: int) -> int:
    """Static length of `sorted_token_ids`: every expert wastes at most `block_size - 1` pad slots."""
    return num_assignments + num_experts * (block_size - 1)


def moe_align_block_size(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_size: int,
    expert_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the flat (token, slot) ids `t * k + j` by expert, in blocks of `block_size`.

    Args:
        topk_ids: `[M, k]` int32/int64 expert of each (token, slot).
        num_experts: E. Ids outside `[0, E)` are left out of every block (callers that want an
            error check before calling, as `fused_moe` does).
        block_size: rows per block.
        expert_mask: optional `[E]` tensor, nonzero for experts local to this rank.

    Returns `(sorted_token_ids, expert_ids, num_tokens_post_padded)`:
        - `sorted_token_ids` int32 `[M*k + E*(block_size-1)]`: flat ids grouped by expert in
          ascending expert order, ascending within an expert; each expert's segment is padded to
          a multiple of `block_size` with the pad value `M*k`. Entries past the used length are
          the pad value too.
        - `expert_ids` int32 `[ceil(len(sorted_token_ids) / block_size)]`: expert of each block,
          -1 for blocks of experts that `expert_mask` marks non-local and for every block past
          the used ones. Experts with no tokens get no block.
        - `num_tokens_post_padded` int32 `[1]`: the used length (a multiple of `block_size`).

    The output sizes depend only on (M, k, E, block_size), never on the routing, so the result is
    computed without a device-to-host sync and fits CUDA graphs. Pure torch: any device.
    """
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES)
    check_positive_int("num_experts", num_experts)
    check_positive_int("block_size", block_size)
    check_tensor("expert_mask", expert_mask, shape=(num_experts,), dtypes=MASK_DTYPES,
                 device=topk_ids.device, optional=True)

    device = topk_ids.device
    num_slots = topk_ids.numel()  # M * k, also the pad value
    max_len = max_num_tokens_padded(num_slots, num_experts, block_size)
    max_blocks = -(-max_len // block_size)

    flat = topk_ids.reshape(-1).long()
    # Out-of-range ids go to a sink bucket E that gets no block.
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))

    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    padded = (counts[:num_experts] + block_size - 1) // block_size * block_size
    seg_end = torch.cumsum(padded, 0)  # end of each expert's padded segment
    seg_start = seg_end - padded
    first_of_expert = torch.cumsum(counts, 0) - counts  # start of each expert in sorted order

    # Stable sort keeps flat ids ascending within each expert.
    sorted_key, order = torch.sort(key, stable=True)
    rank = torch.arange(num_slots, device=device) - first_of_expert[sorted_key]
    # Sink entries (invalid ids) land on one extra slot that is cut off below.
    seg_start_ext = torch.cat([seg_start, seg_start.new_full((1,), max_len)])
    pos = torch.where(sorted_key < num_experts, seg_start_ext[sorted_key] + rank,
                      torch.full_like(rank, max_len))
    sorted_ids = torch.full((max_len + 1,), num_slots, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, pos, order.to(torch.int32))
    sorted_ids = sorted_ids[:max_len]

    # Block b starts at row b*block_size; its expert is the first whose segment ends after it.
    # Empty experts have zero-length segments and are never chosen; rows past the used length
    # find no segment (index E) and get -1.
    block_start = torch.arange(max_blocks, device=device) * block_size
    owner = torch.searchsorted(seg_end, block_start, right=True)
    local = owner < num_experts
    if expert_mask is not None:
        mask_ext = torch.cat([expert_mask.reshape(-1) != 0, local.new_zeros(1)])
        local = local & mask_ext[owner]
    expert_ids = torch.where(local, owner, torch.full_like(owner, -1)).to(torch.int32)

    total = seg_end[-1:].to(torch.int32)
    return sorted_ids, expert_ids, total
