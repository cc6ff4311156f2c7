"""Triton kernels for the MoE combine and the dispatch backward (private: moeprec.reorder calls them).

The T*k routed copies of the tokens live in expert-sorted order: sorted row i holds the copy
`order[i]` = t*k + j, and `pos` is the inverse permutation (`pos[t*k + j]` is that copy's row).

- `sum_rows`: out[t] = sum_j w[t, j] * src[pos[t*k + j]] (w optional), accumulated in fp32 in
  slot order j = 0..k-1, written in out's dtype. The combine's forward (w = routing scores, out
  fp32) and the dispatch gather's backward (no w, out in the tokens' dtype): one read of the k
  rows per token, no [T*k, D] fp32 copy, no atomics (deterministic).
- `combine_backward`: for each copy t*k + j (sorted row i = pos[t*k + j]): grad_src[i] =
  w[t, j] * g[t] (in src's dtype) and grad_w[t, j] = sum_d g[t, d] * src[i, d] in fp32. One read
  of g and of the experts' outputs, one write of their gradient.
- `copy_rows`: dst[pos[t*k + j]] = src[t] for every slot j: the dispatch gather, reading each
  token once and writing its k copies where they go in expert order.

The torch references with the same numbers are in moeprec.reorder.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeprec.kernels._grid import next_power_of_2


@triton.jit
def _sum_rows_kernel(
    src_ptr, pos_ptr, w_ptr, out_ptr, D,
    K: tl.constexpr, HAS_W: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One token per program; each thread keeps its columns of all k rows (no cross-thread sum).
    t = tl.program_id(0).to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in tl.static_range(K):
            row = tl.load(pos_ptr + t * K + j).to(tl.int64)
            x = tl.load(src_ptr + row * D + cols, mask=cmask, other=0.0).to(tl.float32)
            if HAS_W:
                x = x * tl.load(w_ptr + t * K + j).to(tl.float32)
            acc += x
        tl.store(out_ptr + t * D + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _combine_backward_kernel(
    g_ptr, src_ptr, pos_ptr, w_ptr, grad_src_ptr, grad_w_ptr, D,
    K: tl.constexpr, HAS_W: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One token per program: its gradient row is read from HBM once (cache hits for the k slots).
    t = tl.program_id(0).to(tl.int64)
    for j in tl.static_range(K):
        row = tl.load(pos_ptr + t * K + j).to(tl.int64)
        if HAS_W:
            w = tl.load(w_ptr + t * K + j).to(tl.float32)
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            cmask = cols < D
            g = tl.load(g_ptr + t * D + cols, mask=cmask, other=0.0).to(tl.float32)
            if HAS_W:
                x = tl.load(src_ptr + row * D + cols, mask=cmask, other=0.0).to(tl.float32)
                acc += g * x
                g = g * w
            tl.store(grad_src_ptr + row * D + cols, g.to(grad_src_ptr.dtype.element_ty), mask=cmask)
        if HAS_W:
            tl.store(grad_w_ptr + t * K + j, tl.sum(acc, axis=0))


@triton.jit
def _copy_rows_kernel(src_ptr, pos_ptr, dst_ptr, D, K: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        x = tl.load(src_ptr + t * D + cols, mask=cmask)
        for j in tl.static_range(K):
            row = tl.load(pos_ptr + t * K + j).to(tl.int64)
            tl.store(dst_ptr + row * D + cols, x, mask=cmask)


def _empty(shape, dtype, device) -> torch.Tensor:
    """Output allocation (tests swap in a poisoned one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _block_d(d: int) -> int:
    return min(1024, next_power_of_2(max(d, 16)))  # 8 columns per thread at 4 warps


def sum_rows(src: torch.Tensor, pos: torch.Tensor, w: torch.Tensor | None, k: int,
             out_dtype: torch.dtype) -> torch.Tensor:
    """src [T*k, D] (contiguous), pos [T*k] int64, w [T, k] or None -> [T, D] in `out_dtype`."""
    rows, d = src.shape
    t = rows // k
    out = _empty((t, d), out_dtype, src.device)
    if out.numel() == 0:
        return out
    _sum_rows_kernel[(t,)](
        src, pos, w if w is not None else src, out, d,
        K=k, HAS_W=w is not None, BLOCK_D=_block_d(d), num_warps=4,
    )
    return out


def combine_backward(g: torch.Tensor, src: torch.Tensor | None, pos: torch.Tensor,
                     w: torch.Tensor | None, k: int,
                     src_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """g [T, D] (contiguous), src [T*k, D] (needed with w only), pos [T*k], w [T, k] or None ->
    (grad_src [T*k, D] in src_dtype, grad_w [T, k] fp32 or None)."""
    rows, d = pos.shape[0], g.shape[1]
    grad_src = _empty((rows, d), src_dtype, g.device)
    grad_w = None if w is None else _empty((rows // k, k), torch.float32, g.device)
    if grad_src.numel() == 0:
        if grad_w is not None:
            grad_w.zero_()
        return grad_src, grad_w
    _combine_backward_kernel[(rows // k,)](
        g, src if src is not None else g, pos, w if w is not None else g, grad_src,
        grad_w if grad_w is not None else g, d,
        K=k, HAS_W=w is not None, BLOCK_D=_block_d(d), num_warps=4,
    )
    return grad_src, grad_w


def copy_rows(src: torch.Tensor, pos: torch.Tensor, k: int) -> torch.Tensor:
    """src [T, D] (contiguous), pos [T*k] int64 -> dst [T*k, D], dst[pos[t*k + j]] = src[t]."""
    t, d = src.shape
    dst = _empty((t * k, d), src.dtype, src.device)
    if dst.numel() == 0:
        return dst
    _copy_rows_kernel[(t,)](src, pos, dst, d, K=k, BLOCK_D=_block_d(d), num_warps=4)
    return dst
