"""Triton kernel splitting the fp32 router gradient into bf16 pieces (private: the fast backward of
moeprec.routing.gate calls it).

g [T, E] fp32 -> out [T, pieces * E] bf16 = [g_1 | g_2 | ...], the numbers of the torch reference
`gate._split_to_bf16`, bit for bit: each piece but the last is the leading 8 significant bits of
what is left (mantissa bits cleared: exact), the last is the rest rounded to nearest even. The
torch reference takes four elementwise passes (and four launches); this is one read of g and one
write of the pieces.

The backward GEMMs themselves stay on cuBLAS: Triton GEMMs that split g in registers were measured
at 2-3x cuBLAS's time at router shapes on the H200 (2026-12-02, benchmarks/results/README.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeprec.backends import triton_interpret
from moeprec.kernels._grid import cdiv, next_power_of_2


@triton.jit
def _to_bf16(x, INTERPRET: tl.constexpr):
    """fp32 -> bf16, round to nearest even. The CPU interpreter's cast truncates (and mangles
    subnormals), so there the rounding is done on the bits (finite values) and the high half
    taken as the bf16 bits."""
    if INTERPRET:
        b = x.to(tl.int32, bitcast=True)
        b = b + 0x7FFF + ((b >> 16) & 1)
        return (b >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return x.to(tl.bfloat16)


@triton.jit
def _split_kernel(
    g_ptr, out_ptr, T, E,
    PIECES: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, INTERPRET: tl.constexpr,
):
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask = (offs_t < T)[:, None] & (offs_e < E)[None, :]
    rest = tl.load(g_ptr + offs_t[:, None] * E + offs_e[None, :], mask=mask)
    out = out_ptr + offs_t[:, None] * (PIECES * E) + offs_e[None, :]
    for i in tl.static_range(PIECES - 1):
        hi = (rest.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)
        tl.store(out + i * E, _to_bf16(hi, INTERPRET), mask=mask)  # exact
        rest = rest - hi  # exact in fp32
    tl.store(out + (PIECES - 1) * E, _to_bf16(rest, INTERPRET), mask=mask)


def _empty(shape, dtype, device) -> torch.Tensor:
    """Output allocation (tests swap in a poisoned one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def split_grad_to_bf16(g: torch.Tensor, pieces: int) -> torch.Tensor:
    """Contiguous fp32 g [T, E] -> bf16 [T, pieces * E]; see the module docstring."""
    t, e = g.shape
    out = _empty((t, pieces * e), torch.bfloat16, g.device)
    if out.numel() == 0:
        return out
    block_e = min(128, next_power_of_2(e))
    block_t = max(1, 4096 // block_e)
    grid = (cdiv(t, block_t), cdiv(e, block_e))
    _split_kernel[grid](
        g, out, t, e, PIECES=pieces, BLOCK_T=block_t, BLOCK_E=block_e,
        INTERPRET=triton_interpret(), num_warps=4,
    )
    return out


# A custom op with a fake implementation, so that torch.compile traces the backward through it;
# eager calls skip the dispatcher (`split_grad`).
@torch.library.custom_op("moeprec::router_split_grad", mutates_args=())
def _split_grad_op(g: torch.Tensor, pieces: int) -> torch.Tensor:
    return split_grad_to_bf16(g, pieces)


@_split_grad_op.register_fake
def _split_grad_fake(g, pieces):
    return g.new_empty((g.shape[0], pieces * g.shape[1]), dtype=torch.bfloat16)


def split_grad(g: torch.Tensor, pieces: int) -> torch.Tensor:
    g = g.contiguous()
    return (_split_grad_op if torch.compiler.is_compiling() else split_grad_to_bf16)(g, pieces)
