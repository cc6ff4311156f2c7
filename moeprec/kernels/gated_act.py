"""Triton kernels for the experts' gated activation in training (private: moeprec.activations
calls them when `TRAINING_ACT_BACKEND` selects them).

h [R, 2I] holds gate and up columns ("separated": [g | u]; "interleaved": g0, u0, g1, u1, ...).
- forward: z [R, I] = act(g, u) in fp32, rounded once to h's dtype.
- backward: grad_h [R, 2I] (h's layout and dtype) from h and grad_z, in fp32: one read of h and
  grad_z, one write of grad_h.
act: "silu" z = silu(g) * u; "swiglu_oai" (gpt-oss) z = gc * sigmoid(alpha * gc) * (uc + 1) with
gc = min(g, limit), uc = clamp(u, -limit, limit); a clamped input gets no gradient (as
torch.clamp's backward, bounds included in the pass-through range).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeprec.kernels._grid import cdiv, next_power_of_2


@triton.jit
def _columns(h_ptr, rows, cols, I, stride_h, INTERLEAVED: tl.constexpr):
    """Pointers to the gate and up values of (rows, cols)."""
    base = h_ptr + rows[:, None].to(tl.int64) * stride_h
    if INTERLEAVED:
        return base + 2 * cols[None, :], base + 2 * cols[None, :] + 1
    return base + cols[None, :], base + I + cols[None, :]


@triton.jit
def _load_tile(h_ptr, R, I, stride_h, INTERLEAVED: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_I: tl.constexpr):
    """This program's rows and columns of z, their mask, and the gate and up values (fp32)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows < R)[:, None] & (cols < I)[None, :]
    gp, up = _columns(h_ptr, rows, cols, I, stride_h, INTERLEAVED)
    g = tl.load(gp, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up, mask=mask, other=0.0).to(tl.float32)
    return rows, cols, mask, g, u


@triton.jit
def _gated_act_fwd_kernel(
    h_ptr, z_ptr, R, I, stride_h, alpha, limit,
    SWIGLU: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr,
):
    rows, cols, mask, g, u = _load_tile(h_ptr, R, I, stride_h, INTERLEAVED, BLOCK_R, BLOCK_I)
    if SWIGLU:
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        z = g * tl.sigmoid(alpha * g) * (u + 1.0)
    else:
        z = g * tl.sigmoid(g) * u
    zp = z_ptr + rows[:, None].to(tl.int64) * I + cols[None, :]
    tl.store(zp, z.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_act_bwd_kernel(
    h_ptr, gz_ptr, gh_ptr, R, I, stride_h, alpha, limit,
    SWIGLU: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr,
):
    rows, cols, mask, g, u = _load_tile(h_ptr, R, I, stride_h, INTERLEAVED, BLOCK_R, BLOCK_I)
    gz = tl.load(gz_ptr + rows[:, None].to(tl.int64) * I + cols[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    if SWIGLU:
        gc = tl.minimum(g, limit)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        s = tl.sigmoid(alpha * gc)
        dg = gz * (uc + 1.0) * s * (1.0 + alpha * gc * (1.0 - s))
        du = gz * gc * s
        dg = tl.where(g <= limit, dg, 0.0)
        du = tl.where((u >= -limit) & (u <= limit), du, 0.0)
    else:
        s = tl.sigmoid(g)
        dg = gz * u * s * (1.0 + g * (1.0 - s))
        du = gz * g * s
    ggp, gup = _columns(gh_ptr, rows, cols, I, 2 * I, INTERLEAVED)
    tl.store(ggp, dg.to(gh_ptr.dtype.element_ty), mask=mask)
    tl.store(gup, du.to(gh_ptr.dtype.element_ty), mask=mask)


def _empty(shape, dtype, device) -> torch.Tensor:
    """Output allocation (tests swap in a poisoned one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _grid(r: int, i: int) -> tuple[tuple[int, int], int, int]:
    block_i = min(256, next_power_of_2(max(i, 16)))
    block_r = max(1, 2048 // block_i)
    return (cdiv(r, block_r), cdiv(i, block_i)), block_r, block_i


def gated_act_forward(h: torch.Tensor, swiglu: bool, interleaved: bool, alpha: float,
                      limit: float) -> torch.Tensor:
    """h [R, 2I] (unit column stride) -> z [R, I] in h's dtype."""
    r, i = h.shape[0], h.shape[1] // 2
    z = _empty((r, i), h.dtype, h.device)
    if z.numel() == 0:
        return z
    grid, block_r, block_i = _grid(r, i)
    _gated_act_fwd_kernel[grid](
        h, z, r, i, h.stride(0), float(alpha), float(limit),
        SWIGLU=swiglu, INTERLEAVED=interleaved, BLOCK_R=block_r, BLOCK_I=block_i, num_warps=4,
    )
    return z


def gated_act_backward(h: torch.Tensor, grad_z: torch.Tensor, swiglu: bool, interleaved: bool,
                       alpha: float, limit: float) -> torch.Tensor:
    """h [R, 2I] (unit column stride), grad_z [R, I] contiguous -> grad_h [R, 2I] contiguous."""
    r, i = h.shape[0], h.shape[1] // 2
    grad_h = _empty((r, 2 * i), h.dtype, h.device)
    if grad_h.numel() == 0:
        return grad_h
    grid, block_r, block_i = _grid(r, i)
    _gated_act_bwd_kernel[grid](
        h, grad_z, grad_h, r, i, h.stride(0), float(alpha), float(limit),
        SWIGLU=swiglu, INTERLEAVED=interleaved, BLOCK_R=block_r, BLOCK_I=block_i, num_warps=4,
    )
    return grad_h
