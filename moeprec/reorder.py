"""Token reordering around the experts: group the T*k routed copies by expert, then combine.

MoE.forward reads `router -> reorder_tokens -> experts -> combine_expert_outputs`; expert
parallelism calls the same two steps around its all-to-all exchange.

Both steps are device-side and sync-free (stable argsort, gathers, a batched matmul): no host
sync, no atomics, so the combine is deterministic on GPU too.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class ReorderedTokens(NamedTuple):
    """The T*k (token, slot) copies grouped by expert (ascending), token order kept within one."""

    order: torch.Tensor  # [T*k] int64: flat slot index t*k + j of each sorted copy
    token_indices: torch.Tensor  # [T*k] int64: its token t (= order // k)
    scores: torch.Tensor  # [T*k]: its routing score top_scores[t, j]


def reorder_tokens(top_scores: torch.Tensor, selected_experts: torch.Tensor) -> ReorderedTokens:
    """Group the copies of each token by expert: rows of `x[token_indices]` are expert-sorted.

    The per-expert counts (the router's `num_tokens_per_expert`) delimit the groups.
    """
    k = selected_experts.shape[-1]
    # stable: within an expert, copies stay in (token, slot) order, as in the loop references.
    order = torch.argsort(selected_experts.reshape(-1), stable=True)
    return ReorderedTokens(order, order // k, top_scores.reshape(-1)[order])


@torch.library.custom_op("moeprec::gather_rows", mutates_args=())
def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] as a new row-major tensor."""
    return x.index_select(0, index)


@_gather_rows.register_fake
def _(x, index):
    return x.new_empty(index.shape[0], *x.shape[1:])


class _UnsortRows(torch.autograd.Function):
    """out[order[i]] = x[i] (undo the expert sort); backward gathers grad[order].

    Keeps only `order` for backward: `index_copy` would keep its source, a [T*k, D] copy of the
    experts' outputs, alive until the backward. No forward-mode AD: a custom `jvp` would make
    Dynamo break the graph here, and `torch.compile(fullgraph=True)` is what training needs.

    The backward's gather is an opaque op so that its result stays row-major under
    torch.compile: it is the down projection's incoming gradient, and `_grouped_mm` on CUDA
    asserts (device side) when a row-grouped operand is column-major and a group's row count is
    not a multiple of 8, which Inductor's free choice of layout for a fused gather produced.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(order)
        return torch.empty_like(x).index_copy_(0, order, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (order,) = ctx.saved_tensors
        return _gather_rows(grad, order), None


def combine_expert_outputs(
    expert_out: torch.Tensor,
    reordered: ReorderedTokens,
    top_scores: torch.Tensor,
    score_before_experts: bool = False,
) -> torch.Tensor:
    """[T*k, D] expert-sorted outputs -> [T, D] `sum_j top_scores[t, j] * out[t, j]`, in fp32.

    (fp64 when the outputs are fp64.) With `score_before_experts` the scores were applied to the
    experts' inputs already, so the copies are summed unweighted.
    """
    t, k = top_scores.shape
    acc = torch.promote_types(expert_out.dtype, torch.float32)
    # Undo the sort (a permutation, no atomics) in the experts' dtype, then upcast (exact: the
    # order of the two does not change a bit, but permuting first moves half the bytes and holds
    # one fp32 [T*k, D] copy instead of two, forward and backward), then a [1, k] x [k, D]
    # product per token.
    unsorted = _UnsortRows.apply(expert_out, reordered.order)
    per_slot = unsorted.view(t, k, expert_out.shape[-1]).to(acc)
    if score_before_experts:
        return per_slot.sum(dim=1)
    return torch.bmm(top_scores.to(acc).unsqueeze(1), per_slot).squeeze(1)
