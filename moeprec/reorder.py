"""Token reordering around the experts: group the T*k routed copies by expert, then combine.

MoE.forward reads `router -> reorder_tokens -> gather_tokens -> experts ->
combine_expert_outputs`; expert parallelism calls the same steps around its all-to-all exchange.

All steps are device-side and sync-free (stable argsort, gathers, per-token row sums): no host
sync, no atomics, so dispatch and combine are deterministic on GPU too, forward and backward.
The row sums run as Triton kernels on CUDA (moeprec/kernels/combine.py): each token reads its k
rows where they lie, so no un-permuted or fp32 [T*k, D] copy is made. No forward-mode AD through
the autograd Functions here: a custom `jvp` makes Dynamo break the graph, and
`torch.compile(fullgraph=True)` is what training needs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moeprec.backends import triton_available


class ReorderedTokens(NamedTuple):
    """The T*k (token, slot) copies grouped by expert (ascending), token order kept within one."""

    order: torch.Tensor  # [T*k] int64: flat slot index t*k + j of each sorted copy
    token_indices: torch.Tensor  # [T*k] int64: its token t (= order // k)
    scores: torch.Tensor  # [T*k]: its routing score top_scores[t, j]
    pos: torch.Tensor  # [T*k] int64: the inverse of order, pos[t*k + j] = sorted row of that copy
    k: int  # top-k: copies per token


def reorder_tokens(top_scores: torch.Tensor, selected_experts: torch.Tensor) -> ReorderedTokens:
    """Group the copies of each token by expert: rows of `x[token_indices]` are expert-sorted.

    The per-expert counts (the router's `num_tokens_per_expert`) delimit the groups.
    """
    k = selected_experts.shape[-1]
    # stable: within an expert, copies stay in (token, slot) order, as in the loop references.
    order = torch.argsort(selected_experts.reshape(-1), stable=True)
    return ReorderedTokens(order, order // k, top_scores.reshape(-1)[order], _inverse(order), k)


def _inverse(order: torch.Tensor) -> torch.Tensor:
    """pos with pos[order[i]] = i: the sorted row of each (token, slot) copy."""
    rows = torch.arange(order.numel(), device=order.device)
    return torch.empty_like(order).index_copy_(0, order, rows)


# ------------------------------------------------------------------------------------------------
# The row kernels: Triton on CUDA (moeprec/kernels/combine.py), these torch references elsewhere
# (and for fp64). Opaque custom ops, so torch.compile neither re-lays out their results (a
# fused gather once got a layout `_grouped_mm` asserts on) nor splits them into [T*k, D] fp32
# intermediates.

_KERNELS = "moeprec.kernels.combine"
_HAVE_KERNELS = triton_available(_KERNELS)  # decided at import: compile-safe


def _use_kernels(*tensors: torch.Tensor) -> bool:
    return _HAVE_KERNELS and all(t.is_cuda and t.dtype != torch.float64 for t in tensors)


def _sum_rows_reference(src, pos, w, k, out_dtype):
    # one slot at a time, in slot order as the kernel sums: [T, D] temporaries only
    t = pos.numel() // k
    acc = torch.promote_types(src.dtype, torch.float32)
    pos = pos.view(t, k)
    out = torch.zeros((t, src.shape[-1]), dtype=acc, device=src.device)
    for j in range(k):
        rows = src.index_select(0, pos[:, j]).to(acc)
        out += rows if w is None else rows * w[:, j : j + 1].to(acc)
    return out.to(out_dtype)


@torch.library.custom_op("moeprec::sum_rows", mutates_args=())
def _sum_rows(src: torch.Tensor, pos: torch.Tensor, w: torch.Tensor | None, k: int,
              out_dtype: torch.dtype) -> torch.Tensor:
    """out[t] = sum_j w[t, j] * src[pos[t*k + j]] (w None: 1), fp32 (fp64) accumulation."""
    if _use_kernels(src):
        from moeprec.kernels.combine import sum_rows

        return sum_rows(src.contiguous(), pos, None if w is None else w.contiguous(), k, out_dtype)
    return _sum_rows_reference(src, pos, w, k, out_dtype)


@_sum_rows.register_fake
def _(src, pos, w, k, out_dtype):
    return src.new_empty((pos.shape[0] // k, src.shape[-1]), dtype=out_dtype)


def _combine_backward_reference(g, src, pos, w, k, src_dtype):
    # one slot at a time: [T, D] temporaries only
    t, d = g.shape
    pos = pos.view(t, k)
    grad_src = torch.empty((t * k, d), dtype=src_dtype, device=g.device)
    grad_w = g.new_empty((0,) if w is None else (t, k))
    for j in range(k):
        rows_grad = g if w is None else g * w[:, j : j + 1].to(g.dtype)
        grad_src.index_copy_(0, pos[:, j], rows_grad.to(src_dtype))
        if w is not None:
            grad_w[:, j] = (g * src.index_select(0, pos[:, j]).to(g.dtype)).sum(-1)
    return grad_src, grad_w


@torch.library.custom_op("moeprec::combine_rows_backward", mutates_args=())
def _combine_rows_backward(g: torch.Tensor, src: torch.Tensor | None, pos: torch.Tensor,
                           w: torch.Tensor | None, k: int,
                           src_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_src [T*k, D] in src_dtype, grad_w [T, k] in g's dtype, empty when w is None).

    src (the experts' outputs) is only read for grad_w: None when w is None.
    """
    if _use_kernels(g, *([] if src is None else [src])) and src_dtype != torch.float64:
        from moeprec.kernels.combine import combine_backward

        grad_src, grad_w = combine_backward(
            g.contiguous(), None if src is None else src.contiguous(), pos,
            None if w is None else w.contiguous(), k, src_dtype)
        return grad_src, g.new_empty(0) if grad_w is None else grad_w.to(g.dtype)
    return _combine_backward_reference(g, src, pos, w, k, src_dtype)


@_combine_rows_backward.register_fake
def _(g, src, pos, w, k, src_dtype):
    grad_src = g.new_empty((pos.shape[0], g.shape[-1]), dtype=src_dtype)
    return grad_src, g.new_empty((0,) if w is None else (g.shape[0], k))


class _CombineRows(torch.autograd.Function):
    """out[t] = sum_j w[t, j] * src[pos[t*k + j]] in `acc`; keeps pos, and src and w when
    weighted (for w's gradient), for backward: no [T*k, D] fp32 copy."""

    @staticmethod
    def forward(ctx, src, w, pos, k, acc):
        ctx.save_for_backward(None if w is None else src, w, pos)
        ctx.k, ctx.src_dtype = k, src.dtype
        return _sum_rows(src, pos, w, k, acc)

    @staticmethod
    def backward(ctx, g):
        src, w, pos = ctx.saved_tensors
        grad_src, grad_w = _combine_rows_backward(g, src, pos, w, ctx.k, ctx.src_dtype)
        if w is None or not ctx.needs_input_grad[1]:
            return grad_src, None, None, None, None
        return grad_src, grad_w.to(w.dtype), None, None, None


# Who makes the expert-sorted copies of the tokens: "triton" (`copy_rows` in
# moeprec/kernels/combine.py, on CUDA when Triton is installed: each token read once, its k
# copies written where they go; an opaque op) or "torch" (`index_select`, which Inductor fuses
# under torch.compile). "triton": within 1-3% either way on an H200, ahead where it counts most
# (Qwen3-30B-A3B compiled with the activation kernels, docs/training.md).
DISPATCH_GATHER_BACKEND = "triton"


@torch.library.custom_op("moeprec::copy_rows", mutates_args=())
def _copy_rows(tokens: torch.Tensor, pos: torch.Tensor, k: int) -> torch.Tensor:
    """[T*k, D] with row pos[t*k + j] = tokens[t]."""
    if _use_kernels(tokens):
        from moeprec.kernels.combine import copy_rows

        return copy_rows(tokens.contiguous(), pos, k)
    out = torch.empty((pos.numel(), tokens.shape[-1]), dtype=tokens.dtype, device=tokens.device)
    return out.index_copy_(0, pos, tokens.repeat_interleave(k, dim=0))


@_copy_rows.register_fake
def _(tokens, pos, k):
    return tokens.new_empty((pos.shape[0], tokens.shape[-1]))


class _GatherTokens(torch.autograd.Function):
    """tokens[token_indices]; backward sums each token's k row gradients in fp32 (no atomics)."""

    @staticmethod
    def forward(ctx, tokens, token_indices, pos, k):
        ctx.save_for_backward(pos)
        ctx.k = k
        if DISPATCH_GATHER_BACKEND == "triton" and _use_kernels(tokens):
            return _copy_rows(tokens, pos, k)
        return tokens.index_select(0, token_indices)

    @staticmethod
    def backward(ctx, grad):
        (pos,) = ctx.saved_tensors
        return _sum_rows(grad, pos, None, ctx.k, grad.dtype), None, None, None


def gather_tokens(tokens: torch.Tensor, reordered: ReorderedTokens) -> torch.Tensor:
    """[T, D] tokens -> [T*k, D] expert-sorted copies `tokens[reordered.token_indices]`.

    Backward: each token's gradient is the fp32 sum of its k copies' gradients, in slot order,
    rounded once to the tokens' dtype (deterministic; a scatter-add would round k times).
    """
    return _GatherTokens.apply(tokens, reordered.token_indices, reordered.pos, reordered.k)


def combine_expert_outputs(
    expert_out: torch.Tensor,
    reordered: ReorderedTokens,
    top_scores: torch.Tensor,
    score_before_experts: bool = False,
) -> torch.Tensor:
    """[T*k, D] expert-sorted outputs -> [T, D] `sum_j top_scores[t, j] * out[t, j]`, in fp32.

    (fp64 when the outputs are fp64.) With `score_before_experts` the scores were applied to the
    experts' inputs already, so the copies are summed unweighted. Each token reads its k rows
    where they lie (no un-permuted copy) and sums them in slot order; backward writes the
    outputs' gradient in their dtype and the scores' gradient in fp32.
    """
    t, k = top_scores.shape
    acc = torch.promote_types(expert_out.dtype, torch.float32)
    w = None if score_before_experts else top_scores
    return _CombineRows.apply(expert_out, w, reordered.pos, k, acc)
