"""Triton kernels of the fused MoE op (private: `fused_moe_triton.py` is the only caller).

The kernels:
- `_align_kernel` (one program, small batches) or `_align_count/scan/place_kernel` (three
  launches): group the flat (token, slot) ids by expert into blocks of BLOCK_M rows (vLLM's
  moe_align_block_size layout, masked experts and out-of-range ids left out entirely).
- `_moe_gemm_kernel`: one grouped GEMM over those blocks. Stage 1 multiplies by the gate and up
  rows of its output columns as one weight tile and applies the gated activation in the epilogue
  (optionally gathering each z row's amax for fp8, and zero-filling stage 2's atomic output when
  it is small); stage 2 multiplies by the routed weight and
  adds its rows into the fp32 output with atomics (no [M, k, H] pass), or stores them. The
  product itself runs on the tensor cores (`_mma_tiles`) or, for blocks of one (token, expert)
  pair with 16-bit activations, on the CUDA cores (`_gemv_tiles`, optionally split along K in
  stage 2).
- `_sum_slot_rows_kernel`: the per-token sum of stage 2's stored slot rows.
- `_cast_out_kernel`: the fp32 output to the model dtype, as a programmatic dependent launch
  of stage 2 (with `pdl`, in place of torch's cast).

Weight formats (B_FMT): 0 = plain float (bf16/fp16/fp32), 1 = MXFP4 (packed nibbles + E8M0
scales, decoded in registers), 2 = fp8 e4m3 with one fp32 scale per output channel.
"""

from __future__ import annotations

import triton
import triton.language as tl

from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from moeprec.kernels._e2m1_ptx import e2m1_to_e4m3
from moeprec.kernels.quantize import _decoded_to, _e2m1_to_f32, _e8m0_to_f32


@triton.jit
def _load_local_ids(topk_ids_ptr, expert_mask_ptr, offs, num_slots, num_experts,
                    HAS_MASK: tl.constexpr):
    """Expert ids of flat slots `offs`; -1 (and valid=False) for masked or out-of-range ones."""
    inb = offs < num_slots
    # Range-check in the loaded dtype: an int64 id of 2**32 + 3 must be masked, not expert 3.
    ids = tl.load(topk_ids_ptr + offs, mask=inb, other=-1)
    valid = inb & (ids >= 0) & (ids < num_experts)
    ids = tl.where(valid, ids, 0).to(tl.int32)
    if HAS_MASK:
        keep = tl.load(expert_mask_ptr + ids, mask=valid, other=0)
        valid = valid & (keep != 0)
    return tl.where(valid, ids, -1), valid


@triton.jit
def _block_layout(counts, BLOCK_M: tl.constexpr):
    """From the tokens per expert: each expert's segment padded to whole blocks, as
    (padded, ends, starts, total)."""
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    return padded, ends, ends - padded, tl.sum(padded, axis=0)


@triton.jit
def _write_pads(sorted_ids_ptr, counts, padded, starts, num_slots, BLOCK_M: tl.constexpr):
    """Pad each expert's last block with `num_slots` (disjoint from the slots placing writes)."""
    j = tl.arange(0, BLOCK_M)
    pad_pos = (starts + counts)[:, None] + j[None, :]
    tl.store(sorted_ids_ptr + pad_pos, num_slots, mask=j[None, :] < (padded - counts)[:, None])


@triton.jit
def _write_block_owners(expert_ids_ptr, ends, total, b_lo, b_hi, BLOCK_M: tl.constexpr,
                        CHUNK: tl.constexpr):
    """The expert of blocks b_lo..b_hi-1 (-1 past the used ones: the GEMMs skip those)."""
    for b0 in range(b_lo, b_hi, CHUNK):
        b = b0 + tl.arange(0, CHUNK)
        p = b * BLOCK_M
        owner = tl.sum((ends[None, :] <= p[:, None]).to(tl.int32), axis=1)
        owner = tl.where(p < total, owner, -1)
        tl.store(expert_ids_ptr + b, owner, mask=b < b_hi)


@triton.jit
def _place_chunk(topk_ids_ptr, expert_mask_ptr, sorted_ids_ptr, offs, base, num_slots,
                 num_experts, HAS_MASK: tl.constexpr, E_PAD: tl.constexpr):
    """Store the flat ids `offs` at base[e] + their rank among this chunk's slots of expert e
    (ascending flat id within an expert); returns the chunk's count per expert."""
    ids, valid = _load_local_ids(topk_ids_ptr, expert_mask_ptr, offs, num_slots, num_experts,
                                 HAS_MASK)
    onehot = (ids[:, None] == tl.arange(0, E_PAD)[None, :]).to(tl.int32)
    _place_onehot(sorted_ids_ptr, onehot, offs, valid, base)
    return tl.sum(onehot, axis=0)


@triton.jit
def _place_onehot(sorted_ids_ptr, onehot, offs, valid, base):
    """Store the flat ids `offs` (one-hot by expert: [chunk, E_PAD]) at base[e] + their rank."""
    pos = tl.sum(onehot * (tl.cumsum(onehot, axis=0) - 1 + base[None, :]), axis=1)
    tl.store(sorted_ids_ptr + pos, offs, mask=valid)


@triton.jit
def _align_kernel(
    topk_ids_ptr, expert_mask_ptr, sorted_ids_ptr, expert_ids_ptr,
    num_slots, num_experts, max_blocks,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
):
    """Small batches: the whole alignment in one program (one launch, for decode). ONE_CHUNK:
    every slot fits one CHUNK, whose ids are loaded and one-hot encoded once for both passes."""
    e_range = tl.arange(0, E_PAD)
    if ONE_CHUNK:
        offs = tl.arange(0, CHUNK)
        ids, valid = _load_local_ids(topk_ids_ptr, expert_mask_ptr, offs, num_slots, num_experts,
                                     HAS_MASK)
        onehot = (ids[:, None] == e_range[None, :]).to(tl.int32)
        counts = tl.sum(onehot, axis=0)
        padded, ends, starts, total = _block_layout(counts, BLOCK_M)
        _write_pads(sorted_ids_ptr, counts, padded, starts, num_slots, BLOCK_M)
        _write_block_owners(expert_ids_ptr, ends, total, 0, max_blocks, BLOCK_M, CHUNK)
        _place_onehot(sorted_ids_ptr, onehot, offs, valid, starts)
        return
    # pass 1: tokens per expert
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for c0 in range(0, num_slots, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        ids, valid = _load_local_ids(topk_ids_ptr, expert_mask_ptr, offs, num_slots, num_experts,
                                     HAS_MASK)
        counts += tl.sum((ids[:, None] == e_range[None, :]).to(tl.int32), axis=0)
    padded, ends, starts, total = _block_layout(counts, BLOCK_M)
    _write_pads(sorted_ids_ptr, counts, padded, starts, num_slots, BLOCK_M)
    _write_block_owners(expert_ids_ptr, ends, total, 0, max_blocks, BLOCK_M, CHUNK)
    # pass 2: place each slot at its expert's start + rank
    base = starts
    for c0 in range(0, num_slots, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        base += _place_chunk(topk_ids_ptr, expert_mask_ptr, sorted_ids_ptr, offs, base,
                             num_slots, num_experts, HAS_MASK, E_PAD)


# Larger batches: the same layout in three launches, the per-slot work spread over programs of
# CHUNK slots: count per chunk; scan the counts over chunks, a few experts per program (each
# chunk's offset per expert, and each expert's total); each chunk places its slots and writes
# its share of the block table. (One program scanning every expert took 140 us at 131072 slots
# and 128 experts on the H200: a latency-bound loop; spread over experts it is a few steps.)


@triton.jit
def _align_count_kernel(topk_ids_ptr, expert_mask_ptr, chunk_counts_ptr, num_slots,
                        num_experts, HAS_MASK: tl.constexpr, E_PAD: tl.constexpr,
                        CHUNK: tl.constexpr):
    c = tl.program_id(0)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    ids, valid = _load_local_ids(topk_ids_ptr, expert_mask_ptr, offs, num_slots, num_experts,
                                 HAS_MASK)
    e_range = tl.arange(0, E_PAD)
    tl.store(chunk_counts_ptr + c * E_PAD + e_range,
             tl.sum((ids[:, None] == e_range[None, :]).to(tl.int32), axis=0))


@triton.jit
def _align_scan_kernel(chunk_counts_ptr, totals_ptr, num_chunks, E_PAD: tl.constexpr,
                       EB: tl.constexpr, ROWS: tl.constexpr):
    """chunk_counts [num_chunks, E_PAD], columns EB * pid.. of it, becomes each chunk's offset
    within its expert's segment (exclusive prefix over chunks); totals gets the column sums."""
    e = tl.program_id(0) * EB + tl.arange(0, EB)
    run = tl.zeros([EB], dtype=tl.int32)
    for c0 in range(0, num_chunks, ROWS):
        c = c0 + tl.arange(0, ROWS)
        ptrs = chunk_counts_ptr + c[:, None] * E_PAD + e[None, :]
        m = c[:, None] < num_chunks
        n = tl.load(ptrs, mask=m, other=0)
        tl.store(ptrs, tl.cumsum(n, axis=0) - n + run[None, :], mask=m)
        run += tl.sum(n, axis=0)
    tl.store(totals_ptr + e, run)


@triton.jit
def _align_place_kernel(topk_ids_ptr, expert_mask_ptr, chunk_base_ptr, totals_ptr,
                        sorted_ids_ptr, expert_ids_ptr, num_slots, num_experts,
                        max_blocks, blocks_per_chunk, HAS_MASK: tl.constexpr,
                        BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    c = tl.program_id(0)
    counts = tl.load(totals_ptr + tl.arange(0, E_PAD))
    padded, ends, starts, total = _block_layout(counts, BLOCK_M)
    if c == 0:
        _write_pads(sorted_ids_ptr, counts, padded, starts, num_slots, BLOCK_M)
    b_lo = c * blocks_per_chunk
    _write_block_owners(expert_ids_ptr, ends, total, b_lo,
                        tl.minimum(b_lo + blocks_per_chunk, max_blocks), BLOCK_M, CHUNK)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    base = tl.load(chunk_base_ptr + c * E_PAD + tl.arange(0, E_PAD)) + starts
    _place_chunk(topk_ids_ptr, expert_mask_ptr, sorted_ids_ptr, offs, base, num_slots,
                 num_experts, HAS_MASK, E_PAD)


@triton.jit
def _load_b_tile(
    b_base, bs_base, rows, row_mask, k0, K,
    stride_bn, stride_bk, stride_bsn, stride_bsk,
    B_FMT: tl.constexpr, A_FP8: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, INTERP: tl.constexpr, EVEN_K: tl.constexpr,
):
    """B tile(s) for rows `rows` and K block k0 as dot operands (EVEN_K: K is a multiple of
    BLOCK_K, so only the row mask applies).

    Plain/fp8, and MXFP4 with 16-bit activations (decoded, then interleaved into K order): one
    [BLOCK_K, BN] tile (second and third results unused). MXFP4 with fp8 activations: the even
    and odd K rows as two [BLOCK_K/2, BN] fp8 tiles (the low and high nibbles), plus the
    per-column factor 2^smax to apply after the dot.
    """
    if B_FMT == 1:
        HALF: tl.constexpr = BLOCK_K // 2
        kp = k0 // 2 + tl.arange(0, HALF)
        packed = tl.load(
            b_base + rows[None, :] * stride_bn + kp[:, None] * stride_bk,
            mask=((kp[:, None] < (K // 2)) | EVEN_K) & row_mask[None, :], other=0,
        )
        NSB: tl.constexpr = BLOCK_K // 32
        ks = k0 // 32 + tl.arange(0, NSB)
        s = tl.load(
            bs_base + rows[None, :] * stride_bsn + ks[:, None] * stride_bsk,
            mask=((ks[:, None] < (K // 32)) | EVEN_K) & row_mask[None, :], other=127,
        ).to(tl.int32)
        PAIRS: tl.constexpr = not INTERP and not A_FP8 and COMPUTE_DTYPE == tl.bfloat16
        if PAIRS:  # bf16 straight from the bits, two values per instruction (_e2m1_bf16_pairs)
            sb = tl.reshape(tl.broadcast_to(_e8m0_to_bf16(s)[:, None, :], (NSB, 16, BLOCK_N)),
                            (HALF, BLOCK_N))
            w_lo, w_hi = _e2m1_bf16_pairs(packed, sb)
            col_scale = tl.full([BLOCK_N], 1.0, tl.float32)
        else:
            packed = packed.to(tl.int32)
            lo = _e2m1_to_f32(packed & 15)
            hi = _e2m1_to_f32(packed >> 4)
            if A_FP8:
                # fp8 weights as mxfp4_to_fp8_torch's rows, per K tile: each 32-block times
                # 2^(s - smax + 6) (<= 64: E2M1's 6 becomes 384 <= 448), 2^(smax - 133) per
                # column after the dot; exact for blocks within 14 binades of smax
                smax = tl.max(s, axis=0)
                rel = tl.maximum(s - smax[None, :] + 127 + 6, 0)
                rel_f = tl.reshape(tl.broadcast_to(_e8m0_to_f32(rel)[:, None, :], (NSB, 16, BLOCK_N)),
                                   (HALF, BLOCK_N))
                w_lo = _to_fp8(lo * rel_f, INTERP)
                w_hi = _to_fp8(hi * rel_f, INTERP)
                col_scale = _e8m0_to_f32(smax) * 0.015625  # 2^-6: exact, fp32 subnormals kept
            else:
                sf = tl.reshape(tl.broadcast_to(_e8m0_to_f32(s)[:, None, :], (NSB, 16, BLOCK_N)),
                                (HALF, BLOCK_N))
                w_lo = _decoded_to(lo * sf, COMPUTE_DTYPE)
                w_hi = _decoded_to(hi * sf, COMPUTE_DTYPE)
                col_scale = tl.full([BLOCK_N], 1.0, tl.float32)
        if not A_FP8:  # one K-ordered tile (value 2i + h from byte i, nibble h): a plain dot
            # with contiguous, pipelined A rows; even / odd A columns cost stride-2 gathers
            w_lo = tl.reshape(tl.permute(tl.join(w_lo, w_hi), (0, 2, 1)), (BLOCK_K, BLOCK_N))
            w_hi = w_lo
        return w_lo, w_hi, col_scale
    else:
        kk = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(
            b_base + rows[None, :] * stride_bn + kk[:, None] * stride_bk,
            mask=((kk[:, None] < K) | EVEN_K) & row_mask[None, :], other=0.0,
        )
        if not (A_FP8 and B_FMT == 2):  # fp8 weights meet bf16 activations: upcast (exact)
            w = _upcast(w, COMPUTE_DTYPE, INTERP)
        return w, w, tl.full([BLOCK_N], 1.0, tl.float32)


@triton.jit
def _e8m0_to_bf16(s):
    """E8M0 byte (int32) -> 2^(s-127) as bf16, exactly: 0xFF -> NaN, 0 -> the subnormal 2^-127."""
    bits = tl.where(s == 255, 0x7FC0, tl.where(s == 0, 0x0040, s << 7))
    return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _e2m1_bf16_pairs(packed, scale):
    """Packed MXFP4 bytes (uint8) and their block scales (bf16, same shape) -> the low and the
    high nibbles' values times the scale, as bf16 (GPU only: inline PTX).

    Per 4 bytes: each byte is spread to the high byte of a 16-bit half (prmt); the sign is then
    at bf16's sign bit (high nibble) or 4 bits below it, and the 3 exponent-mantissa bits go to
    bf16 bits 8..6, which reads as E2M1 times 2^-126 (E2M1's subnormal 0.5 lands on a bf16
    subnormal, exactly). Two bf16x2 FMAs then apply 2^126 and the scale: exact, as the
    reference's fp32 decode rounded to bf16 (the scale alone could overflow 2^126 * 2^(s-127)).
    """
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 z, nz, t0, t1, u, a, b, l0, l1, h0, h1;
        mov.b32 z, 0;
        mov.b32 nz, 0x80008000;
        prmt.b32 t0, $4, z, 0x1404;
        prmt.b32 t1, $4, z, 0x3424;
        and.b32 h0, t0, 0x80008000;
        shr.b32 a, t0, 6;
        and.b32 a, a, 0x01C001C0;
        or.b32 h0, h0, a;
        shl.b32 u, t0, 4;
        and.b32 l0, u, 0x80008000;
        shr.b32 a, u, 6;
        and.b32 a, a, 0x01C001C0;
        or.b32 l0, l0, a;
        and.b32 h1, t1, 0x80008000;
        shr.b32 a, t1, 6;
        and.b32 a, a, 0x01C001C0;
        or.b32 h1, h1, a;
        shl.b32 u, t1, 4;
        and.b32 l1, u, 0x80008000;
        shr.b32 a, u, 6;
        and.b32 a, a, 0x01C001C0;
        or.b32 l1, l1, a;
        mov.b32 b, 0x7E807E80;
        fma.rn.bf16x2 l0, l0, b, nz;
        fma.rn.bf16x2 l1, l1, b, nz;
        fma.rn.bf16x2 h0, h0, b, nz;
        fma.rn.bf16x2 h1, h1, b, nz;
        fma.rn.bf16x2 $0, l0, $5, nz;
        fma.rn.bf16x2 $1, l1, $6, nz;
        fma.rn.bf16x2 $2, h0, $5, nz;
        fma.rn.bf16x2 $3, h1, $6, nz;
        }""",
        constraints="=r,=r,=r,=r,r,r,r",
        args=[packed, scale], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)


@triton.jit
def _to_fp8(x, INTERP: tl.constexpr):
    """fp32 (already within +-448) -> e4m3, round to nearest even.

    The interpreter's own cast mis-rounds values that carry into the next binade (124.3 -> 64),
    so there we round in fp32 first (3 mantissa bits; 2^-9 steps below 2^-6) and cast exact values.
    It also turns NaN into 384, so NaN is put back as the E4M3 NaN code (sign kept, as torch
    does); the GPU's saturating cast keeps NaN itself.
    """
    if INTERP:
        bits = x.to(tl.int32, bitcast=True)
        rbits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & ~0xFFFFF
        normal = rbits.to(tl.float32, bitcast=True)
        mag = tl.abs(x)
        sub = ((mag * 512.0 + 12582912.0) - 12582912.0) / 512.0
        sub = tl.where(bits < 0, -sub, sub)  # the sign bit, so that -0.0 stays -0.0
        y = tl.where(tl.abs(x) < 0.015625, sub, normal).to(tl.float8e4nv)
        nan8 = (((bits >> 24) & 0x80) | 0x7F).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
        return tl.where(x != x, nan8, y)
    return x.to(tl.float8e4nv)


# NaN handling: the plain tl.maximum/tl.minimum return the non-NaN operand (on the GPU and in
# the interpreter alike; the GPU's tl.max reduction does too), which would turn a NaN token or a
# NaN scale block into finite garbage. The reference (torch clamp/amax) propagates NaN, so every
# clamp and max on data values below keeps it.


@triton.jit
def _clamp_nan(x, lo, hi):
    """min(max(x, lo), hi) that keeps NaN."""
    return tl.minimum(tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL), hi,
                      propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _max_nan(x, axis: tl.constexpr):
    """tl.max over `axis`, NaN where that slice holds a NaN."""
    has_nan = tl.max((x != x).to(tl.int32), axis=axis) > 0
    return tl.where(has_nan, float("nan"), tl.max(x, axis=axis))


@triton.jit
def _fp8_scale(amax):
    """fp32 per-row scale from amax, as formats.fp8.fp8_scale (floor 1e-12; NaN and Inf stay)."""
    return tl.maximum(amax, 1e-12, propagate_nan=tl.PropagateNan.ALL) / 448.0


@triton.jit
def _upcast(x, dtype: tl.constexpr, INTERP: tl.constexpr):
    """x.to(dtype); in the interpreter, whose fp8 upcast reads the E4M3 NaN code as 480, fp8
    NaN is restored, and whose bf16 -> fp32 upcast flushes subnormals, bf16 goes by its bits
    (the GPU's conversions keep both)."""
    y = x.to(dtype)
    if INTERP:
        if x.dtype == tl.float8e4nv:
            y = tl.where((x.to(tl.uint8, bitcast=True) & 0x7F) == 0x7F, float("nan"), y)
        if x.dtype == tl.bfloat16 and dtype == tl.float32:
            y = ((x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) << 16).to(tl.float32,
                                                                                bitcast=True)
    return y


@triton.jit
def _quant_a(a, a_div, A_QUANT: tl.constexpr, INTERP: tl.constexpr):
    """fp8 activations from model-dtype ones and their per-row scale (the reference's rounding)."""
    if A_QUANT:
        q = _clamp_nan(a.to(tl.float32) / a_div[:, None], -448.0, 448.0)
        out = _to_fp8(q, INTERP)
    else:
        out = a
    return out


@triton.jit
def _tile_dot(acc, a_base, a_rows_ok, a_div, k0, K, stride_ak, w_lo, w_hi,
              B_FMT: tl.constexpr, A_UPCAST: tl.constexpr, A_QUANT: tl.constexpr,
              BLOCK_K: tl.constexpr, INTERP: tl.constexpr, EVEN_K: tl.constexpr):
    """acc + A[:, k0:k0+BK] @ W for one K block (fp32). B_FMT == 1 (MXFP4 as even / odd fp8
    halves) splits A into even / odd columns.

    The accumulator goes into tl.dot itself: for fp8 operands a separate `acc += dot` keeps
    the compiler from overlapping consecutive MMAs.
    """
    if B_FMT == 1:
        HALF: tl.constexpr = BLOCK_K // 2
        kk = k0 + 2 * tl.arange(0, HALF)
        m = a_rows_ok[:, None] & ((kk[None, :] < K) | EVEN_K)
        a_e = _quant_a(tl.load(a_base + kk[None, :] * stride_ak, mask=m, other=0.0), a_div, A_QUANT,
                       INTERP)
        a_o = _quant_a(tl.load(a_base + (kk[None, :] + 1) * stride_ak, mask=m, other=0.0), a_div,
                       A_QUANT, INTERP)
        if INTERP:
            acc = tl.dot(_upcast(a_e, tl.float32, INTERP), _upcast(w_lo, tl.float32, INTERP), acc)
            acc = tl.dot(_upcast(a_o, tl.float32, INTERP), _upcast(w_hi, tl.float32, INTERP), acc)
        else:
            acc = tl.dot(a_e, w_lo, acc)
            acc = tl.dot(a_o, w_hi, acc)
    else:
        kk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_base + kk[None, :] * stride_ak,
                    mask=a_rows_ok[:, None] & ((kk[None, :] < K) | EVEN_K), other=0.0)
        a = _quant_a(a, a_div, A_QUANT, INTERP)
        if INTERP:
            acc = tl.dot(_upcast(a, tl.float32, INTERP), _upcast(w_lo, tl.float32, INTERP), acc)
        elif A_UPCAST:  # fp8 activations against plain weights: the dot runs in the weights' dtype
            acc = tl.dot(a.to(w_lo.dtype), w_lo, acc)
        else:
            acc = tl.dot(a, w_lo, acc)
    return acc


@triton.jit
def _mx_dot(a, acc, b_base, bs_base, rows, row_mask, k0, K, stride_bn, stride_bk, stride_bsn,
            stride_bsk, A_FMT: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """acc + a @ MXFP4 tile (rows `rows`, K block k0) with tl.dot_scaled (GPU only)."""
    kp = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    ks = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    packed = tl.load(b_base + rows[None, :] * stride_bn + kp[:, None] * stride_bk,
                     mask=((kp[:, None] < K // 2) | EVEN_K) & row_mask[None, :], other=0)
    scale = tl.load(bs_base + rows[:, None] * stride_bsn + ks[None, :] * stride_bsk,
                    mask=row_mask[:, None] & ((ks[None, :] < K // 32) | EVEN_K), other=127)
    return tl.dot_scaled(a, None, A_FMT, packed, scale, "e2m1", acc)


# one packed word ($8) -> its 8 values as fp32 times 2^-6 ($0..$7: low nibbles, then high)
_E2M1_WORD_F32 = tl.constexpr(
    "{\n.reg .b32 t0, t1, lo, hi, d0, d1, d2, d3;\n"
    ".reg .b16 a0, a1, b0, b1, f0, f1, f2, f3, f4, f5, f6, f7;\n"
    + e2m1_to_e4m3("$8", "lo", "hi")
    + "mov.b32 {a0, a1}, lo;\nmov.b32 {b0, b1}, hi;\n"
    + "".join(f"cvt.rn.f16x2.e4m3x2 d{i}, {r};\n" for i, r in enumerate(("a0", "a1", "b0", "b1")))
    + "".join(f"mov.b32 {{f{2 * i}, f{2 * i + 1}}}, d{i};\n" for i in range(4))
    + "".join(f"cvt.f32.f16 ${i}, f{i};\n" for i in range(8)) + "}")


@triton.jit
def _e2m1_words_to_f32(w, INTERP: tl.constexpr):
    """Packed MXFP4 words [TR, NSB, 4] (int32: 4 bytes, 8 E2M1 values each) -> their values
    [TR, NSB, 32] as fp32 times 2^-6 (the caller folds 2^6 into the block scale), in K order:
    value k of a 32-value scale block comes from byte k // 2, low nibble first.

    On the GPU, inline PTX decodes a whole word (nibbles to E4M3 bit positions, `_e2m1_ptx`,
    then cvt.rn.f16x2.e4m3x2 two at a time, exactly): ~2.5 instructions per value instead of
    ~10 for per-element integer code. The interpreter, which runs no PTX, shifts and masks
    instead.
    """
    if INTERP:
        vals = []
        for i in tl.static_range(4):
            for h in tl.static_range(2):
                c = (w >> (8 * i + 4 * h)) & 15
                f16 = (((c & 7) << 9) | ((c & 8) << 12)).to(tl.uint16).to(tl.float16, bitcast=True)
                vals.append(f16.to(tl.float32) * 256.0)
        l0, h0, l1, h1, l2, h2, l3, h3 = vals
    else:
        l0, l1, l2, l3, h0, h1, h2, h3 = tl.inline_asm_elementwise(
            asm=_E2M1_WORD_F32,
            constraints="=r,=r,=r,=r,=r,=r,=r,=r,r",
            args=[w], dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    # position 8q + 4*i1 + 2*i0 + h for byte i = 2*i1 + i0 of word q, nibble h: tl.join appends
    # the fastest dim last, so join over i1 first, then i0, then h
    y00 = tl.join(l0, l2)
    y01 = tl.join(l1, l3)
    y10 = tl.join(h0, h2)
    y11 = tl.join(h1, h3)
    v = tl.join(tl.join(y00, y01), tl.join(y10, y11))  # [..., 4(q), 2(i1), 2(i0), 2(h)]
    return tl.reshape(v, (w.shape[0], w.shape[1], w.shape[2] * 8))


@triton.jit
def _gemv_k_step(k0, k_end, a_ok, BLOCK_K: tl.constexpr):
    """Indices of one K step: its 32-value blocks `sb` [NSB] and their K offsets `kk` [NSB, 32],
    each with its mask (nothing at or past k_end, nothing for an empty row)."""
    sb = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    sb_ok = (sb * 32 < k_end) & ((sb * 0 + a_ok) > 0)
    kk = sb[:, None] * 32 + tl.arange(0, 32)[None, :]
    return sb, sb_ok, kk, (kk < k_end) & sb_ok[:, None]


@triton.jit
def _gemv_fetch(b_base, bs_base, rows, rows_ok, k0, k_end, a_ok, stride_bn, stride_bk,
                stride_bsn, stride_bsk, B_FMT: tl.constexpr, BLOCK_K: tl.constexpr):
    """Weight tile of one K step: MXFP4 packed words [TR, NSB, 4] and E8M0 scales [TR, NSB];
    plain/fp8 values [TR, NSB, 32] (scales unused). Nothing is read past k_end or for an
    empty row."""
    NSB: tl.constexpr = BLOCK_K // 32
    sb, sb_ok, kk, k_ok = _gemv_k_step(k0, k_end, a_ok, BLOCK_K)
    if B_FMT == 1:  # as int32 words (the wrapper keeps packed weights 16-byte aligned)
        kw = sb[:, None] * 4 + tl.arange(0, 4)[None, :]
        words = b_base.to(tl.pointer_type(tl.int32))
        w = tl.load(words + rows[:, None, None] * (stride_bn // 4) + kw[None, :, :],
                    mask=rows_ok[:, None, None] & sb_ok[None, :, None], other=0)
        s = tl.load(bs_base + rows[:, None] * stride_bsn + sb[None, :] * stride_bsk,
                    mask=rows_ok[:, None] & sb_ok[None, :], other=127)
    else:
        w = tl.load(b_base + rows[:, None, None] * stride_bn + kk[None, :, :] * stride_bk,
                    mask=rows_ok[:, None, None] & k_ok[None, :, :], other=0.0)
        s = tl.zeros([rows.shape[0], NSB], dtype=tl.uint8)
    return w, s


@triton.jit
def _gemv_tiles(a_ptr, a_row, a_row_ok, stride_am, b_base, bs_base, rows, rows_ok, k_begin,
                k_end, stride_ak, stride_bn, stride_bk, stride_bsn, stride_bsk,
                B_FMT: tl.constexpr, TILE_ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
                INTERP: tl.constexpr, GDC_WAIT: tl.constexpr):
    """[1, TILE_ROWS] = a[k_begin:k_end] @ W[rows, k_begin:k_end]^T for one activation row, on
    CUDA cores.

    A decode block holds one (token, expert) pair: the tensor cores would idle on padding and
    their operand shuffles cost. Each thread instead streams whole 32-value blocks of a weight
    row (MXFP4: 4 packed words, one vector load, one E8M0 scale) and reduces them in its own
    registers; the product keeps the layout of the weight load (no shared-memory round trip)
    and the E8M0 scale multiplies per-block partial sums, not each weight. The next step's
    weights are loaded before this step's arithmetic (these loads feed no tl.dot, so Triton's
    pipeliner would leave them synchronous). Weights: B_FMT 0 plain float, 1 MXFP4, 2 fp8
    (per-channel scales go on in the caller's epilogue). MXFP4 K ranges are whole 32-blocks;
    plain ones are masked per element. GDC_WAIT: a programmatic dependent launch waits for
    the activations' producer only after the first weight step is in flight.
    """
    NSB: tl.constexpr = BLOCK_K // 32
    acc = tl.zeros([TILE_ROWS, NSB], dtype=tl.float32)
    a_ptr += tl.sum(a_row, axis=0) * stride_am  # the block's single row ([1] tensor -> scalar)
    a_ok = tl.sum(a_row_ok.to(tl.int32), axis=0)
    w_next, s_next = _gemv_fetch(b_base, bs_base, rows, rows_ok, k_begin, k_end, a_ok, stride_bn,
                                 stride_bk, stride_bsn, stride_bsk, B_FMT, BLOCK_K)
    if GDC_WAIT:  # (the weights are never the launch before's output: no decode-first here)
        gdc_wait()
    for k0 in range(k_begin, k_end, BLOCK_K):
        w_cur, s_cur = w_next, s_next
        w_next, s_next = _gemv_fetch(b_base, bs_base, rows, rows_ok, k0 + BLOCK_K, k_end, a_ok,
                                     stride_bn, stride_bk, stride_bsn, stride_bsk, B_FMT, BLOCK_K)
        _, sb_ok, kk, k_ok = _gemv_k_step(k0, k_end, a_ok, BLOCK_K)
        if B_FMT == 1:  # whole 32-blocks: the block mask suffices (6 fewer instructions a step)
            a_mask = sb_ok[:, None]
        else:
            a_mask = k_ok
        a = tl.load(a_ptr + kk * stride_ak, mask=a_mask, other=0.0).to(tl.float32)  # [NSB, 32]
        if B_FMT == 1:
            w = _e2m1_words_to_f32(w_cur, INTERP)                             # [TR, NSB, 32]
            part = tl.sum(w * a[None, :, :], axis=2)
            acc += (part * 64.0) * _e8m0_to_f32(s_cur.to(tl.int32))
        else:
            acc += tl.sum(_upcast(w_cur, tl.float32, INTERP) * a[None, :, :], axis=2)
    return tl.sum(acc, axis=1)[None, :]


@triton.jit
def _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile `pid` in grouped order: GROUP_M consecutive blocks share
    each weight tile while it sits in L2."""
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    gsize = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % width) % gsize, (pid % width) // gsize


@triton.jit
def _store_down(c_ptr, acc, slot, row_ok, col, col_ok, top_k, stride_cm, stride_cn,
                ATOMIC_OUT: tl.constexpr):
    """Stage 2's combine: fp32 atomic adds into the token's row of [M, H], or the slot's own
    row of [M*k, H] (summed per token afterwards)."""
    c_mask = row_ok[:, None] & col_ok[None, :]
    if ATOMIC_OUT:
        tl.atomic_add(c_ptr + (slot // top_k)[:, None] * stride_cm + col[None, :] * stride_cn,
                      acc, mask=c_mask, sem="relaxed")
    else:
        tl.store(c_ptr + slot[:, None] * stride_cm + col[None, :] * stride_cn,
                 acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _load_b_tile_tma(b_desc, expert, row0, k0, A_FP8: tl.constexpr, B_FMT: tl.constexpr,
                     BLOCK_K: tl.constexpr, TILE_ROWS: tl.constexpr,
                     COMPUTE_DTYPE: tl.constexpr, INTERP: tl.constexpr):
    """Plain / fp8 weight tile [BLOCK_K, TILE_ROWS] through a TMA descriptor over the weights
    viewed as [E, parts, rows per part, K] (stage 1 with separated gate/up rows: the gate and
    up halves as parts 0 and 1, one box holding both). Rows and K past the ends read as zeros."""
    w = b_desc.load([expert, 0, row0, k0])
    w = tl.trans(tl.reshape(w, (TILE_ROWS, BLOCK_K)))
    if not (A_FP8 and B_FMT == 2):  # fp8 weights meet bf16 activations: upcast (exact)
        w = _upcast(w, COMPUTE_DTYPE, INTERP)
    return w


@triton.jit
def _mma_tiles(a_base, row_ok, a_sc, b_base, bs_base, rows, rows_ok, k_begin, k_end, K, stride_ak,
               stride_bn, stride_bk, stride_bsn, stride_bsk, b_desc, expert, b_row0,
               B_FMT: tl.constexpr, A_FP8: tl.constexpr, A_QUANT: tl.constexpr,
               COMPUTE_DTYPE: tl.constexpr, INTERP: tl.constexpr, DOT_SCALED: tl.constexpr,
               A_FMT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
               TILE_ROWS: tl.constexpr, EVEN_K: tl.constexpr, B_TMA: tl.constexpr):
    """[BLOCK_M, TILE_ROWS] = A[:, k_begin:k_end] @ W[rows, k_begin:k_end]^T on the tensor cores
    (fp32; the range is whole BLOCK_K steps, masked against K). EVEN_K (K a multiple of BLOCK_K)
    drops the per-step K masks: fewer compares and selects per weight. B_TMA: plain / fp8
    weights through `b_desc` (box at expert, b_row0), the A rows as before."""
    PER_ITER: tl.constexpr = A_FP8 and B_FMT == 1 and not DOT_SCALED
    A_UPCAST: tl.constexpr = A_FP8 and B_FMT == 0
    # MXFP4 with 16-bit activations is decoded to one K-ordered tile: then a plain dot
    DOT_FMT: tl.constexpr = 0 if (B_FMT == 1 and not A_FP8) else B_FMT
    acc = tl.zeros([BLOCK_M, TILE_ROWS], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        if DOT_SCALED:
            # MXFP4 through the compiler's scaled dot: pipelined loads, decode in registers
            kk = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_base + kk[None, :] * stride_ak,
                        mask=row_ok[:, None] & ((kk[None, :] < K) | EVEN_K), other=0.0)
            a = _quant_a(a, a_sc, A_QUANT, INTERP)
            acc = _mx_dot(a, acc, b_base, bs_base, rows, rows_ok, k0, K, stride_bn, stride_bk,
                          stride_bsn, stride_bsk, A_FMT, BLOCK_K, EVEN_K)
        elif B_TMA:
            w = _load_b_tile_tma(b_desc, expert, b_row0, k0, A_FP8, B_FMT, BLOCK_K, TILE_ROWS,
                                 COMPUTE_DTYPE, INTERP)
            acc = _tile_dot(acc, a_base, row_ok, a_sc, k0, K, stride_ak, w, w, B_FMT, A_UPCAST,
                            A_QUANT, BLOCK_K, INTERP, EVEN_K)
        else:
            w_lo, w_hi, w_cs = _load_b_tile(b_base, bs_base, rows, rows_ok, k0, K, stride_bn,
                                            stride_bk, stride_bsn, stride_bsk, B_FMT, A_FP8,
                                            BLOCK_K, TILE_ROWS, COMPUTE_DTYPE, INTERP, EVEN_K)
            if PER_ITER:  # per-column power of two of this K block (MXFP4 weights as fp8)
                part = _tile_dot(tl.zeros_like(acc), a_base, row_ok, a_sc, k0, K, stride_ak,
                                 w_lo, w_hi, B_FMT, A_UPCAST, A_QUANT, BLOCK_K, INTERP, EVEN_K)
                acc += part * w_cs[None, :]
            else:
                acc = _tile_dot(acc, a_base, row_ok, a_sc, k0, K, stride_ak, w_lo, w_hi, DOT_FMT,
                                A_UPCAST, A_QUANT, BLOCK_K, INTERP, EVEN_K)
    return acc


@triton.jit
def _zero_share(ptr, numel, ZBLOCK: tl.constexpr = 256):
    """This program's contiguous share of ptr[:numel] set to 0.0 (shares over the whole grid)."""
    nprog = tl.num_programs(0).to(tl.int64)
    per = tl.cdiv(numel, nprog)
    lo = tl.program_id(0).to(tl.int64) * per
    hi = tl.minimum(lo + per, numel)
    for z0 in range(lo, hi, ZBLOCK):
        offs = z0 + tl.arange(0, ZBLOCK)
        tl.store(ptr + offs, tl.zeros([ZBLOCK], dtype=tl.float32), mask=offs < hi)


@triton.jit
def _moe_gemm_kernel(
    a_ptr, a_scale_ptr, b_ptr, bs_ptr, bias_ptr, c_ptr, c_scale_ptr, b_desc,
    sorted_ids_ptr, expert_ids_ptr, topk_w_ptr, expert_mask_ptr, zero_ptr,
    N, K, num_slots, top_k, num_pid_m, num_experts, zero_numel,
    stride_am, stride_ak, stride_asm,
    stride_be, stride_bn, stride_bk, stride_bse, stride_bsn, stride_bsk,
    stride_biase, stride_cm, stride_cn, stride_csm,
    alpha, limit,
    STAGE1: tl.constexpr,        # gate/up GEMM + activation (else down GEMM + combine)
    INTERLEAVED: tl.constexpr,   # stage 1 gate/up rows [g0, u0, g1, u1, ...] (else [g..., u...])
    B_FMT: tl.constexpr,         # 0 plain, 1 mxfp4, 2 fp8 per-channel
    A_FP8: tl.constexpr,         # the GEMM runs on fp8 activations, one scale per row
    A_QUANT: tl.constexpr,       # A holds model-dtype rows and a_scale their amax: quantize here
    ACT: tl.constexpr,           # 0 silu, 1 swiglu_oai
    HAS_BIAS: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,    # multiply by the routed weight in this stage's epilogue
    ATOMIC_OUT: tl.constexpr,    # stage 2: fp32 atomic add into [M, H] (else store [M*k, H])
    QUANT_OUT: tl.constexpr,     # stage 1: also atomic-max each z row's |amax| into c_scale
    COMPUTE_DTYPE: tl.constexpr,
    INTERP: tl.constexpr,
    DOT_SCALED: tl.constexpr,    # MXFP4 via tl.dot_scaled (GPU); else the explicit decode
    A_FMT: tl.constexpr,         # dot_scaled's name of the activation format
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TILE_ROWS: tl.constexpr,     # weight rows per program: 2 * BLOCK_N in stage 1, else BLOCK_N
    GEMV: tl.constexpr,          # BLOCK_M = 1: CUDA-core product (16-bit activations)
    SPLIT_K: tl.constexpr,       # stage 2 with atomics: programs per output tile along K (CUDA-
                                 # core blocks and tensor-core tiles alike)
    PAIR_BLOCKS: tl.constexpr,   # BLOCK_M = 1 without alignment: block b is flat slot b, and
                                 # expert_ids_ptr points at the flat topk ids (range and mask
                                 # checked here; sorted_ids unused)
    HAS_MASK: tl.constexpr,      # PAIR_BLOCKS only: expert_mask_ptr holds the expert mask
    EVEN_K: tl.constexpr,        # K % BLOCK_K == 0: the tensor-core loop needs no K masks
    B_TMA: tl.constexpr,         # plain / fp8 weight tiles through the TMA descriptor b_desc
    B_PARTS: tl.constexpr,       # b_desc's parts: 2 for stage 1's separated gate/up rows, else 1
    PDL: tl.constexpr,           # stage 2 is launched as a programmatic dependent of stage 1
    ZERO_OUT: tl.constexpr,      # stage 1: also zero-fill zero_ptr[:zero_numel] (fp32), stage
                                 # 2's atomic output, each program its share
):
    if PDL and not INTERP:  # let the next launch's programs in as this grid drains (stage 1:
        gdc_launch_dependents()  # stage 2; stage 2: the output cast, `_cast_out_kernel`)
    if ZERO_OUT:  # before any early exit: every program owns a share
        _zero_share(zero_ptr, zero_numel)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = _grouped_tile(pid, num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if PAIR_BLOCKS:  # the raw id, range-checked and masked as the alignment does (-1: skip)
        ids, _ = _load_local_ids(expert_ids_ptr, expert_mask_ptr, offs_m, num_slots,
                                 num_experts, HAS_MASK)
        expert = tl.max(ids, axis=0)
    else:
        expert = tl.load(expert_ids_ptr + pid_m)
    if expert < 0:
        return
    expert = expert.to(tl.int64)
    if PAIR_BLOCKS:
        slot = offs_m
    else:
        slot = tl.load(sorted_ids_ptr + offs_m)
    row_ok = slot < num_slots
    slot = tl.where(row_ok, slot, 0).to(tl.int64)
    if STAGE1:
        a_row = slot // top_k
    else:
        a_row = slot
    a_base = a_ptr + a_row[:, None] * stride_am

    # Weight rows of this program. Stage 1 takes the gate AND up rows of its BLOCK_N output
    # columns as one tile, so each K step is a single dot (the compiler overlaps consecutive
    # MMAs only when a loop holds one); the epilogue splits the accumulator again.
    j = tl.arange(0, TILE_ROWS)
    if STAGE1:
        if INTERLEAVED:
            col = pid_n * BLOCK_N + j // 2
            rows = 2 * pid_n * BLOCK_N + j
        else:
            col = pid_n * BLOCK_N + j % BLOCK_N
            rows = tl.where(j < BLOCK_N, col, col + N)
    else:
        col = pid_n * BLOCK_N + j
        rows = col
    rows_ok = col < N
    b_base = b_ptr + expert * stride_be
    bs_base = bs_ptr + expert * stride_bse

    # stage 1's rows (and amax) complete from here on (the CUDA-core blocks wait inside their
    # product, once their first weights are on the way)
    GDC_WAIT: tl.constexpr = PDL and not STAGE1 and not INTERP
    if GDC_WAIT and not GEMV:
        gdc_wait()
    if A_FP8:
        a_sc = tl.load(a_scale_ptr + a_row * stride_asm, mask=row_ok, other=1.0)
        if A_QUANT:  # amax -> scale, as formats.fp8.fp8_scale
            a_sc = _fp8_scale(a_sc)
    else:
        a_sc = tl.full([BLOCK_M], 1.0, tl.float32)

    # this program's share of K: whole BLOCK_K steps, so MXFP4 scale blocks stay whole
    k_steps = tl.cdiv(K, BLOCK_K)
    k_begin = (pid_k * k_steps // SPLIT_K) * BLOCK_K
    k_end = tl.minimum(((pid_k + 1) * k_steps // SPLIT_K) * BLOCK_K, K)
    if GEMV:
        acc = _gemv_tiles(a_ptr, a_row, row_ok, stride_am, b_base, bs_base, rows, rows_ok,
                          k_begin, k_end, stride_ak, stride_bn, stride_bk, stride_bsn,
                          stride_bsk, B_FMT, TILE_ROWS, BLOCK_K, INTERP, GDC_WAIT)
    else:
        if SPLIT_K == 1:  # the whole of K: loop bounds the compiler sees
            k_begin = 0
            k_end = K
        acc = _mma_tiles(a_base, row_ok, a_sc, b_base, bs_base, rows, rows_ok, k_begin, k_end,
                         K, stride_ak, stride_bn, stride_bk, stride_bsn, stride_bsk, b_desc,
                         expert.to(tl.int32), pid_n * (TILE_ROWS // B_PARTS), B_FMT, A_FP8,
                         A_QUANT, COMPUTE_DTYPE, INTERP, DOT_SCALED, A_FMT, BLOCK_M, BLOCK_K,
                         TILE_ROWS, EVEN_K, B_TMA)

    # epilogue, the same for both stages up to the split: scales, routed weight, bias
    if A_FP8:
        acc = acc * a_sc[:, None]
    if B_FMT == 2:
        acc = acc * tl.load(bs_base + rows * stride_bsn, mask=rows_ok, other=0.0)[None, :]
    if MUL_WEIGHT:
        w = tl.load(topk_w_ptr + slot, mask=row_ok, other=0.0).to(tl.float32)
    if STAGE1:
        if MUL_WEIGHT:  # apply_router_weight_on_input: scale h before the bias
            acc = acc * w[:, None]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + expert * stride_biase + rows, mask=rows_ok, other=0.0)[None, :]
        if INTERLEAVED:
            g, u = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
        else:
            g, u = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
        if ACT == 0:
            z = g / (1.0 + tl.exp(-g)) * u
        else:
            g = tl.minimum(g, limit, propagate_nan=tl.PropagateNan.ALL)
            u = _clamp_nan(u, -limit, limit)
            z = g / (1.0 + tl.exp(-alpha * g)) * (u + 1.0)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        z = tl.where(n_ok[None, :], z, 0.0)
        c_mask = row_ok[:, None] & n_ok[None, :]
        zr = z.to(COMPUTE_DTYPE).to(c_ptr.dtype.element_ty)  # rounded as the model dtype
        tl.store(c_ptr + slot[:, None] * stride_cm + offs_n[None, :] * stride_cn, zr, mask=c_mask)
        if QUANT_OUT:
            # per-token fp8 scale of the rounded z (the reference's): the row max over all
            # column tiles, gathered with atomics; stage 2 quantizes with it as it loads z.
            # A NaN row max goes in as +Inf: float atomic max is done on the bits and may skip
            # NaN, while an Inf scale still makes the row NaN in stage 2 (its NaN element / Inf
            # stays NaN, the rest become 0, and the dot spreads the NaN), as a NaN scale does
            amax = _max_nan(tl.abs(zr.to(tl.float32)), 1)
            amax = tl.where(amax != amax, float("inf"), amax)
            tl.atomic_max(c_scale_ptr + slot * stride_csm, amax, mask=row_ok, sem="relaxed")
    else:
        if HAS_BIAS:  # once per output tile: by the first K split
            b_ok = rows_ok & ((rows * 0 + pid_k) == 0)
            acc += tl.load(bias_ptr + expert * stride_biase + rows, mask=b_ok, other=0.0)[None, :]
        if MUL_WEIGHT:
            acc = acc * w[:, None]
        _store_down(c_ptr, acc, slot, row_ok, col, rows_ok, top_k, stride_cm, stride_cn,
                    ATOMIC_OUT)


@triton.jit
def _sum_slot_rows_kernel(rows_ptr, topk_ids_ptr, expert_mask_ptr, out_ptr, N, top_k,
                          num_experts, stride_rm, stride_om, HAS_MASK: tl.constexpr,
                          K_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[t] = sum over the kept slots j of rows[t * top_k + j], in fp32, stored in out's dtype
    (stage 2 without atomics wrote one fp32 row per kept slot; masked and out-of-range slots'
    rows were never written and are never read)."""
    t = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.arange(0, K_PAD)
    slots = t * top_k + j
    _, keep = _load_local_ids(topk_ids_ptr, expert_mask_ptr, slots, (t + 1) * top_k,
                              num_experts, HAS_MASK)
    n_ok = offs_n < N
    r = tl.load(rows_ptr + slots[:, None] * stride_rm + offs_n[None, :],
                mask=keep[:, None] & n_ok[None, :], other=0.0)
    tl.store(out_ptr + t * stride_om + offs_n, tl.sum(r, axis=0).to(out_ptr.dtype.element_ty),
             mask=n_ok)


@triton.jit
def _cast_out_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr, INTERP: tl.constexpr):
    """dst = src rounded to dst's dtype (to nearest even, as torch's cast), after stage 2: this
    is launched as its programmatic dependent, so its launch overlaps stage 2's last programs."""
    if not INTERP:
        gdc_wait()
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(src_ptr + offs, mask=offs < n)
    tl.store(dst_ptr + offs, v.to(dst_ptr.dtype.element_ty), mask=offs < n)


@triton.jit
def _quant_fp8_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, ROWS: tl.constexpr,
                           BLOCK: tl.constexpr, ONE_PASS: tl.constexpr, INTERP: tl.constexpr):
    """One fp8 scale per row: s = amax / 448, q = clamp(x / s) (clamped before the cast; NaN
    anywhere in the row gives a NaN scale, hence a NaN row, as in the reference). ROWS rows per
    program; ONE_PASS: a row fits one BLOCK and is read once (kept in registers), else twice."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    r_ok = rows < M
    x_rows = x_ptr + rows[:, None] * stride_xm
    q_rows = q_ptr + rows[:, None] * stride_qm
    kk = tl.arange(0, BLOCK)[None, :]
    if ONE_PASS:
        ok = r_ok[:, None] & (kk < K)
        x = tl.load(x_rows + kk, mask=ok, other=0.0).to(tl.float32)
        sc = _fp8_scale(_max_nan(tl.abs(x), 1))
        tl.store(s_ptr + rows, sc, mask=r_ok)
        q = _clamp_nan(x / sc[:, None], -448.0, 448.0)
        tl.store(q_rows + kk, _to_fp8(q, INTERP), mask=ok)
    else:
        amax = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            ok = r_ok[:, None] & (k0 + kk < K)
            x = tl.load(x_rows + k0 + kk, mask=ok, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x), propagate_nan=tl.PropagateNan.ALL)
        sc = _fp8_scale(_max_nan(amax, 1))
        tl.store(s_ptr + rows, sc, mask=r_ok)
        for k0 in range(0, K, BLOCK):
            ok = r_ok[:, None] & (k0 + kk < K)
            x = tl.load(x_rows + k0 + kk, mask=ok, other=0.0).to(tl.float32)
            q = _clamp_nan(x / sc[:, None], -448.0, 448.0)
            tl.store(q_rows + k0 + kk, _to_fp8(q, INTERP), mask=ok)
