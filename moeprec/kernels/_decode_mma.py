"""MXFP4 decode blocks (BLOCK_M = 1, 16-bit activations) on the tensor cores: a Gluon kernel.

The Triton decode blocks (`_gemv_tiles`) multiply on the CUDA cores and were bound by
instruction issue on the H200 (Nsight Compute, Mixtral-8x7B M = 1 stage 1: issue slots 78%
busy, DRAM 42%): each weight costs a conversion to fp32 and an FFMA on top of its decode. Here
the decoded weights go straight into `mma.sync.m16n8k16` (f16 operands, fp32 accumulation)
from the registers they were decoded in, so the multiply-adds and the f16 -> f32 conversions
leave the instruction stream.

Gluon (Triton's explicit-layout frontend) fixes which lane holds which data, which the PTX
fragment layout needs. Lane 4g + c of a warp holds whole 32-value scale blocks (4 words, one
16-byte load) of block c of a group of 4 consecutive blocks, for two weight rows ("lo" and "hi",
the MMA's rows g and g + 8). A quad's 4 lanes thus hold 4 blocks with 4 different E8M0 scales,
which one MMA must not add together: B's column n holds the activations of block n in the
lanes of quad n and zeros elsewhere (the "diagonal"), so D[row, n] is block n's partial sum
alone, and lanes 4g and 4g + 1 get blocks 0-1 and 2-3 of row g, to scale and add in fp32.

The activations of the program's K range are scaled by a power of two into [1, 2) and
converted to f16 once per program, into shared memory, in the pair order the decode produces;
products are exact and the MMA accumulates in fp32. Values below amax * 2^-15 land on f16
subnormals (absolute error at most amax * 2^-25 each), below amax * 2^-25 they flush to zero:
within fp32 rounding of the sum. The power of two comes off the program's total.

The K loop takes two steps per iteration with their weights in two register sets that
alternate, each fetched a step ahead straight into the registers it is used from (an odd
count takes step 0 alone first); the scales of a lane's group of 4 blocks are one 4-byte word
per row where their layout allows.

Stage 1 pairs each output column's gate row (lo) with its up row (hi), so the epilogue is
elementwise; stage 2 gives a lane output columns i and i + BLOCK_N / 2. GPU only: Gluon has no
interpreter, so CI runs the Triton decode blocks (same math, other summation order).
"""
from __future__ import annotations

import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

from moeprec.kernels._e2m1_ptx import e2m1_to_e4m3

# 4 words (one 32-value block) of each of two rows (lo: $4..$7, hi: $8..$11) -> E4M3 bytes ->
# f16 pairs (values times 2^-6, exact) -> 8 m16n8k16 MMAs against the f16 activation pairs of
# the block (pair r of word w: ${12 + 4r + w}), kept only in the lanes 4n + n of column n (the
# diagonal); out: D[g, 2c], D[g, 2c + 1] (lo row) and D[g + 8, 2c], D[g + 8, 2c + 1] (hi row)
def _word_f16(w: str, d: str) -> str:
    """PTX: packed word `w` -> its 8 values as f16 pairs (times 2^-6) in registers d0..d3."""
    return (e2m1_to_e4m3(w, "l", "h") + "mov.b32 {u0, u1}, l;\nmov.b32 {u2, u3}, h;\n"
            + "".join(f"cvt.rn.f16x2.e4m3x2 {d}{i}, u{i};\n" for i in range(4)))


_MMA = "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {{c0, c1, c2, c3}}, {{{a}}}, {{{b}}}, {{c0, c1, c2, c3}};\n"


def _block_mma_asm() -> str:
    lines = ["{", ".reg .b32 t0, t1, l, h, x0, x1, x2, x3, y0, y1, y2, y3, ln, g, c;",
             ".reg .b32 " + ", ".join(f"q{i}" for i in range(16)) + ";",
             ".reg .b16 u0, u1, u2, u3;", ".reg .pred p;", ".reg .f32 c0, c1, c2, c3;",
             "mov.u32 ln, %laneid;", "shr.u32 g, ln, 2;", "and.b32 c, ln, 3;",
             "setp.eq.u32 p, g, c;"]
    lines += [f"selp.b32 q{i}, ${12 + i}, 0, p;" for i in range(16)]
    lines += [f"mov.f32 c{i}, 0f00000000;" for i in range(4)]
    text = "\n".join(lines) + "\n"
    for w in range(4):
        text += _word_f16(f"${4 + w}", "x") + _word_f16(f"${8 + w}", "y")
        text += _MMA.format(a="x0, y0, x2, y2", b=f"q{w}, q{4 + w}")
        text += _MMA.format(a="x1, y1, x3, y3", b=f"q{8 + w}, q{12 + w}")
    return text + "mov.f32 $0, c0;\nmov.f32 $1, c1;\nmov.f32 $2, c2;\nmov.f32 $3, c3;\n}"


_BLOCK_MMA = gl.constexpr(_block_mma_asm())


@gluon.jit
def _f16_pair(lo, hi):
    """Two fp32 tensors -> f16x2 words (lo in the low half), rounded to nearest."""
    return gl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [lo, hi],
                                     dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _e8m0_to_f32(s):
    """E8M0 byte (int32) -> 2^(s-127) as fp32, exactly: 0xFF -> NaN, 0 -> the subnormal 2^-127.
    (Gluon twin of quantize._e8m0_to_f32: a Gluon kernel cannot call a triton.jit function.)"""
    f = gl.where(s == 0, 0x00400000, s << 23).to(gl.float32, bitcast=True)
    return gl.where(s == 255, float("nan"), f)


@gluon.jit
def _act_pairs(a_words, k0, k_end, P: gl.constexpr, CH: gl.constexpr, NSB: gl.constexpr,
               BLOCK_K: gl.constexpr):
    """Activations of CH steps from k0 as bf16 pairs [CH, NSB, 4, 4] (int32; one 16-byte load
    per thread): pair q of word c of block b of step s holds a[k], a[k + 1] for
    k = k0 + s*BLOCK_K + 32*b + 8*c + 2*q (0 past k_end)."""
    S3: gl.constexpr = gl.SliceLayout(3, P)
    s = gl.arange(0, CH, layout=gl.SliceLayout(1, gl.SliceLayout(2, S3)))
    b = gl.arange(0, NSB, layout=gl.SliceLayout(0, gl.SliceLayout(2, S3)))
    c = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, S3)))
    q = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, P))))
    k = (k0 + gl.expand_dims(gl.expand_dims(s * BLOCK_K, 1), 2)
         + gl.expand_dims(gl.expand_dims(b * 32, 0), 2) + gl.expand_dims(gl.expand_dims(c * 8, 0), 1))
    k4 = gl.expand_dims(k, 3)                                          # [CH, NSB, 4, 1]
    q4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(q, 0), 1), 2)    # [1, 1, 1, 4]
    return gl.load(a_words + k4 // 2 + q4, mask=k4 < k_end, other=0)


@gluon.jit
def _half_lo(t, F16: gl.constexpr):
    """The first 16-bit value of each pair (the low half) as fp32: fp16 or bf16."""
    if F16:
        return t.to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
    return (t << 16).to(gl.float32, bitcast=True)


@gluon.jit
def _half_hi(t, F16: gl.constexpr):
    """The second 16-bit value of each pair (the high half) as fp32: fp16 or bf16."""
    if F16:
        return (t >> 16).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
    return (t & -65536).to(gl.float32, bitcast=True)


@gluon.jit
def _step_index(rows_lo, rows_hi, k0, L: gl.constexpr, NSB: gl.constexpr):
    """A step's block indices sb ([NSB]; [1, NSB, 1] as sb3), word indices w3 ([1, 1, 4]) and
    the lo and hi rows as [TR2, 1, 1], in the blocks' layout L."""
    sb = k0 // 32 + gl.arange(0, NSB, layout=gl.SliceLayout(0, gl.SliceLayout(2, L)))
    w = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, L)))
    sb3 = gl.expand_dims(gl.expand_dims(sb, 0), 2)                 # [1, NSB, 1]
    w3 = gl.expand_dims(gl.expand_dims(w, 0), 1)                   # [1, 1, 4]
    lo3 = gl.expand_dims(gl.expand_dims(rows_lo, 1), 2)            # [TR2, 1, 1]
    hi3 = gl.expand_dims(gl.expand_dims(rows_hi, 1), 2)
    return sb, sb3, w3, lo3, hi3


@gluon.jit
def _fetch(src, k0, k_end, L: gl.constexpr, NSB: gl.constexpr, EVEN_K: gl.constexpr,
           SCALE_WORDS: gl.constexpr):
    """One step's packed words [TR2, NSB, 4] (int32, a block per lane) of the lo and hi rows,
    and their E8M0 scales, raw (converted only where they are used, so that nothing waits for
    the loads before the step that needs them): SCALE_WORDS, the 4-byte word of scales of the
    lane's group of 4 blocks, lo and hi row ([TR2, NSB] int32 each); else the scales the
    lane's MMA outputs need, a byte each ([TR2, NSB, 4] int32, and a dummy 0). Rows are in
    range (the caller clamps them). EVEN_K: whole steps, k0 never past the end: nothing
    masked; else blocks from k_end on are not read. `src`: the program's weight rows (words,
    scales, lo and hi row indices, row and K strides: the same at every step)."""
    words_base, bs_base, rows_lo, rows_hi, stride_wn, stride_bsn, stride_bsk = src
    sb, sb3, w3, lo3, hi3 = _step_index(rows_lo, rows_hi, k0, L, NSB)
    wk = sb3 * 4 + w3
    if EVEN_K:
        w_lo = gl.load(words_base + lo3 * stride_wn + wk)
        w_hi = gl.load(words_base + hi3 * stride_wn + wk)
    else:
        w_lo = gl.load(words_base + lo3 * stride_wn + wk, mask=sb3 * 32 < k_end, other=0)
        w_hi = gl.load(words_base + hi3 * stride_wn + wk, mask=sb3 * 32 < k_end, other=0)
    s_lo, s_hi = _fetch_scales(src, k0, k_end, L, NSB, EVEN_K, SCALE_WORDS)
    return w_lo, w_hi, s_lo, s_hi


@gluon.jit
def _fetch_scales(src, k0, k_end, L: gl.constexpr, NSB: gl.constexpr, EVEN_K: gl.constexpr,
                  SCALE_WORDS: gl.constexpr):
    """The E8M0 scales of one step, raw, as `_fetch` returns them."""
    words_base, bs_base, rows_lo, rows_hi, stride_wn, stride_bsn, stride_bsk = src
    sb, sb3, w3, lo3, hi3 = _step_index(rows_lo, rows_hi, k0, L, NSB)
    if SCALE_WORDS:  # unit K stride, 4-byte rows, whole groups: one word per row and group
        sb2 = gl.expand_dims(sb, 0)                                    # [1, NSB]
        lo2 = gl.expand_dims(rows_lo, 1)                               # [TR2, 1]
        hi2 = gl.expand_dims(rows_hi, 1)
        bs_words = bs_base.to(gl.pointer_type(gl.int32))
        grp = sb2 // 4
        if EVEN_K:
            s_lo = gl.load(bs_words + lo2 * (stride_bsn // 4) + grp)
            s_hi = gl.load(bs_words + hi2 * (stride_bsn // 4) + grp)
        else:
            s_lo = gl.load(bs_words + lo2 * (stride_bsn // 4) + grp, mask=sb2 * 32 < k_end,
                           other=0x7F7F7F7F)
            s_hi = gl.load(bs_words + hi2 * (stride_bsn // 4) + grp, mask=sb2 * 32 < k_end,
                           other=0x7F7F7F7F)
    else:
        # lane c of a group of 4 blocks: the lo row's blocks 2(c % 2) and 2(c % 2) + 1, then
        # the hi row's (lanes c = 2, 3 hold zeros; their scales repeat c = 0, 1's, in the same
        # rows, so that a NaN scale meets the row it belongs to)
        blk = sb3 - sb3 % 4 + 2 * (sb3 % 2) + w3 % 2                   # [1, NSB, 4]
        s_off = gl.where(w3 < 2, lo3, hi3) * stride_bsn + blk * stride_bsk
        if EVEN_K:
            s_lo = gl.load(bs_base + s_off).to(gl.int32)
        else:
            s_lo = gl.load(bs_base + s_off, mask=blk * 32 < k_end, other=127).to(gl.int32)
        s_hi = 0
    return s_lo, s_hi


@gluon.jit
def _step(acc, w_lo, w_hi, s_lo, s_hi, pairs0, pairs1, pairs2, pairs3, step,
          L: gl.constexpr, NSB: gl.constexpr, SCALE_WORDS: gl.constexpr):
    """acc + one step's block partial sums (8 MMAs per block and lane) times their scales."""
    B: gl.constexpr = gl.SliceLayout(0, L)
    b0 = gl.expand_dims(pairs0.index(step).load(B), 0)
    b1 = gl.expand_dims(pairs1.index(step).load(B), 0)
    b2 = gl.expand_dims(pairs2.index(step).load(B), 0)
    b3 = gl.expand_dims(pairs3.index(step).load(B), 0)
    part = gl.inline_asm_elementwise(
        _BLOCK_MMA, "=f,=f,=f,=f" + ",r" * 24, [w_lo, w_hi, b0, b1, b2, b3],
        dtype=gl.float32, is_pure=True, pack=4)
    if SCALE_WORDS:  # output w of lane c: byte 2(c % 2) + w % 2 of the lo (w < 2) or hi word
        c = gl.arange(0, NSB, layout=gl.SliceLayout(0, gl.SliceLayout(2, L)))
        w = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, L)))
        c3 = gl.expand_dims(gl.expand_dims(c, 0), 2)
        w3 = gl.expand_dims(gl.expand_dims(w, 0), 1)
        word = gl.where(w3 < 2, gl.expand_dims(s_lo, 2), gl.expand_dims(s_hi, 2))
        sc = (word >> (8 * (2 * (c3 % 2) + w3 % 2))) & 0xFF
    else:
        sc = s_lo
    return acc + part * _e8m0_to_f32(sc)


@gluon.jit
def _pdl_wait():
    """Wait for the launch before (programmatic dependent launch): its output is our input."""
    gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def _act_scale(a_ptr, a_row, stride_am, k_begin, k_end, P: gl.constexpr, CH: gl.constexpr,
               NSB: gl.constexpr, BLOCK_K: gl.constexpr):
    """The powers of two for row a_row's activations of [k_begin, k_end): `up` scales them into
    [1, 2) for f16, `down` undoes it (and the decode's 2^-6)."""
    F16: gl.constexpr = a_ptr.dtype.element_ty == gl.float16
    a_words = (a_ptr + a_row * stride_am).to(gl.pointer_type(gl.int32))
    n_chunks = gl.cdiv(k_end - k_begin, CH * BLOCK_K)
    m = gl.zeros([CH, NSB, 4, 4], gl.float32, layout=P)
    for ch in range(n_chunks):
        t = _act_pairs(a_words, k_begin + ch * CH * BLOCK_K, k_end, P, CH, NSB, BLOCK_K)
        m = gl.maximum(m, gl.maximum(gl.abs(_half_lo(t, F16)), gl.abs(_half_hi(t, F16))))
    amax = gl.max(gl.max(gl.max(gl.max(m, axis=3), axis=2), axis=1), axis=0)
    e = (amax.to(gl.int32, bitcast=True) >> 23) & 0xFF
    e = gl.minimum(gl.maximum(e, 1), 253)
    up = ((254 - e) << 23).to(gl.float32, bitcast=True)            # 2^(127 - e)
    down = (e << 23).to(gl.float32, bitcast=True) * 64.0             # back, and the decode's 2^-6
    return up, down


@gluon.jit
def _alloc_pairs(K_CHUNKS: gl.constexpr, CH: gl.constexpr, NSB: gl.constexpr,
                 SMEM: gl.constexpr):
    """The four shared buffers of the activation staging, [K_CHUNKS, CH, NSB, 4] int32 each."""
    return (gl.allocate_shared_memory(gl.int32, [K_CHUNKS, CH, NSB, 4], SMEM),
            gl.allocate_shared_memory(gl.int32, [K_CHUNKS, CH, NSB, 4], SMEM),
            gl.allocate_shared_memory(gl.int32, [K_CHUNKS, CH, NSB, 4], SMEM),
            gl.allocate_shared_memory(gl.int32, [K_CHUNKS, CH, NSB, 4], SMEM))


@gluon.jit
def _step_views(pairs, STEPS: gl.constexpr, NSB: gl.constexpr, SMEM_STEP: gl.constexpr):
    """The staged buffers seen step by step ([STEPS, NSB, 4]: the same row-major memory)."""
    pairs0, pairs1, pairs2, pairs3 = pairs
    return (pairs0._reinterpret(gl.int32, [STEPS, NSB, 4], SMEM_STEP),
            pairs1._reinterpret(gl.int32, [STEPS, NSB, 4], SMEM_STEP),
            pairs2._reinterpret(gl.int32, [STEPS, NSB, 4], SMEM_STEP),
            pairs3._reinterpret(gl.int32, [STEPS, NSB, 4], SMEM_STEP))


@gluon.jit
def _stage_pairs(a_ptr, a_row, stride_am, k_begin, k_end, up, pairs, P: gl.constexpr,
                 CH: gl.constexpr, NSB: gl.constexpr, BLOCK_K: gl.constexpr):
    """Row a_row's activations of [k_begin, k_end) times `up` -> f16 pairs in the decode's pair
    order, into the four chunked shared buffers `pairs` ([K_CHUNKS, CH, NSB, 4] int32 each)."""
    F16: gl.constexpr = a_ptr.dtype.element_ty == gl.float16
    a_words = (a_ptr + a_row * stride_am).to(gl.pointer_type(gl.int32))
    n_chunks = gl.cdiv(k_end - k_begin, CH * BLOCK_K)
    pairs0, pairs1, pairs2, pairs3 = pairs
    for ch in range(n_chunks):
        t = _act_pairs(a_words, k_begin + ch * CH * BLOCK_K, k_end, P, CH, NSB, BLOCK_K)
        t_a, t_b = gl.split(gl.reshape(t, [CH, NSB, 4, 2, 2]))       # q = 0, 2 and 1, 3
        q0, q2 = gl.split(t_a)
        q1, q3 = gl.split(t_b)
        # the decode's pair order: values (0, 2), (1, 3), (4, 6), (5, 7) of each word
        pairs0.index(ch).store(_f16_pair(_half_lo(q0, F16) * up, _half_lo(q1, F16) * up))
        pairs1.index(ch).store(_f16_pair(_half_hi(q0, F16) * up, _half_hi(q1, F16) * up))
        pairs2.index(ch).store(_f16_pair(_half_lo(q2, F16) * up, _half_lo(q3, F16) * up))
        pairs3.index(ch).store(_f16_pair(_half_hi(q2, F16) * up, _half_hi(q3, F16) * up))
    gl.thread_barrier()


@gluon.jit
def _ring_producer(b_desc, rings, row_lo, row_hi, kw_begin, n_steps, BLOCK_K: gl.constexpr):
    """Worker partition (one warp): each step's lo and hi weight rows by TMA into the next ring
    slot, once the consumers have released it (`empty`); `full` counts the bytes in."""
    ring_lo, ring_hi, full, empty = rings
    S: gl.constexpr = ring_lo.type.shape[0]
    for i in range(n_steps):
        s = i % S
        mbarrier.wait(empty.index(s), ((i // S) & 1) ^ 1)  # (a fresh barrier passes phase 1)
        bar = full.index(s)
        mbarrier.expect(bar, 2 * b_desc.block_type.nbytes)
        kw = kw_begin + i * (BLOCK_K // 8)
        tma.async_copy_global_to_shared(b_desc, [row_lo, kw], bar, ring_lo.index(s))
        tma.async_copy_global_to_shared(b_desc, [row_hi, kw], bar, ring_hi.index(s))


@gluon.jit
def _ring_consumer(a_ptr, a_row, stride_am, k_begin, k_first, k_end, n_steps, src, pairs, rings,
                   PDL_WAIT: gl.constexpr, L: gl.constexpr, P: gl.constexpr,
                   SMEM_STEP: gl.constexpr, CH: gl.constexpr, NSB: gl.constexpr,
                   BLOCK_K: gl.constexpr, STEPS: gl.constexpr, TR2: gl.constexpr,
                   EVEN_K: gl.constexpr, SCALE_WORDS: gl.constexpr):
    """Default partition: stages the activations (while the producer fills the ring), then per
    step waits for its slot, reads the words out, releases the slot and multiplies; the scales
    come from global memory a step ahead (k_first: the first step's, clamped into range as
    the register path's). Returns (acc, down) as the register loop has them."""
    ring_lo, ring_hi, full, empty = rings
    S: gl.constexpr = ring_lo.type.shape[0]
    WORDS: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])
    sn_lo, sn_hi = _fetch_scales(src, k_first, k_end, L, NSB, EVEN_K, SCALE_WORDS)
    if PDL_WAIT:  # activations are the launch before's output; weights and scales are not
        _pdl_wait()
    up, down = _act_scale(a_ptr, a_row, stride_am, k_begin, k_end, P, CH, NSB, BLOCK_K)
    _stage_pairs(a_ptr, a_row, stride_am, k_begin, k_end, up, pairs, P, CH, NSB, BLOCK_K)
    pairs0, pairs1, pairs2, pairs3 = _step_views(pairs, STEPS, NSB, SMEM_STEP)
    acc = gl.zeros([TR2, NSB, 4], gl.float32, layout=L)
    for i in range(n_steps):
        s = i % S
        mbarrier.wait(full.index(s), (i // S) & 1)
        w_lo = ring_lo.index(s)._reinterpret(gl.int32, [TR2, NSB, 4], WORDS).load(L)
        w_hi = ring_hi.index(s)._reinterpret(gl.int32, [TR2, NSB, 4], WORDS).load(L)
        # the reads above before the producer's next copy into the slot (a proxy fence: the
        # SASS is MEMBAR.ALL.CTA, which also waits for this thread's loads in flight, so the
        # next step's scales are asked for only after it, and used a step later)
        fence_async_shared()
        mbarrier.arrive(empty.index(s), count=1)
        sc_lo, sc_hi = sn_lo, sn_hi
        ni = i + 1
        if EVEN_K:  # (past the last step: the last step again)
            ni = gl.minimum(ni, n_steps - 1)
        sn_lo, sn_hi = _fetch_scales(src, k_begin + ni * BLOCK_K, k_end, L, NSB, EVEN_K,
                                     SCALE_WORDS)
        acc = _step(acc, w_lo, w_hi, sc_lo, sc_hi, pairs0, pairs1, pairs2, pairs3, i, L, NSB,
                    SCALE_WORDS)
    return acc, down


@gluon.jit
def _decode_mma_kernel(
    a_ptr, b_ptr, bs_ptr, bias_ptr, c_ptr, sorted_ids_ptr, expert_ids_ptr, topk_w_ptr,
    expert_mask_ptr, zero_ptr,
    N, K, num_slots, top_k, num_experts, zero_numel,
    stride_am, stride_be, stride_bn, stride_bse, stride_bsn, stride_bsk,
    stride_biase, stride_cm,
    alpha, limit,
    STAGE1: gl.constexpr, INTERLEAVED: gl.constexpr, ACT: gl.constexpr,
    HAS_BIAS: gl.constexpr, MUL_WEIGHT: gl.constexpr, ATOMIC_OUT: gl.constexpr,
    PAIR_BLOCKS: gl.constexpr, HAS_MASK: gl.constexpr, PDL: gl.constexpr,
    ZERO_OUT: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
    SPLIT_K: gl.constexpr, CH: gl.constexpr, K_CHUNKS: gl.constexpr, WARPS: gl.constexpr,
    EVEN_K: gl.constexpr, SCALE_WORDS: gl.constexpr, RING: gl.constexpr, b_desc,
):
    """One (token, expert) pair x BLOCK_N output columns (stage 1: gate/up GEMM + activation,
    z in the model dtype; stage 2: down GEMM, routed weight, fp32 atomic add or slot row), as
    `_moe_gemm_kernel` with BLOCK_M = 1 and MXFP4 weights (same arguments, fewer strides:
    unit K strides for weights and outputs)."""
    NSB: gl.constexpr = BLOCK_K // 32
    TR2: gl.constexpr = BLOCK_N if STAGE1 else BLOCK_N // 2        # lo (= hi) rows
    # lanes 4g + c: row g (8 per warp, repeated), block c of 4 (repeated), its 4 words; warps
    # split the block groups of a step (WK), then the rows
    WK: gl.constexpr = WARPS if WARPS <= NSB // 4 else NSB // 4
    L: gl.constexpr = gl.BlockedLayout([1, 1, 4], [8, 4, 1], [WARPS // WK, WK, 1], [2, 1, 0])
    ROW: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, L))
    # the activation staging: chunks of CH steps (`_staging_chunks`), up to _STAGING_REPS
    # (step, block, word) pieces per thread, all loaded at once (one memory round trip per
    # chunk; a K range of up to 8 * 1024 values is one chunk)
    TB: gl.constexpr = 8 if NSB >= 8 else NSB
    P: gl.constexpr = gl.BlockedLayout([1, 1, 1, 4], [8 // TB, TB, 4, 1], [WARPS, 1, 1, 1],
                                       [3, 2, 1, 0])
    # shared memory without swizzle (row-major), so that the two views below agree: chunks of
    # [CH, NSB, 4] for the staging, steps of [NSB, 4] for the loop
    SMEM: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])
    SMEM_STEP: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])

    if PDL:  # let the next launch's programs in as this grid drains (stage 2; the cast)
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [],
                                  dtype=gl.int32, is_pure=False, pack=1)
    if ZERO_OUT:  # before any early exit: every program owns a share (as _zero_share)
        Z: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
        nprog = (gl.num_programs(0) * gl.num_programs(1)).to(gl.int64)
        per = gl.cdiv(zero_numel, nprog)
        z_lo = (gl.program_id(1) * gl.num_programs(0) + gl.program_id(0)).to(gl.int64) * per
        z_hi = gl.minimum(z_lo + per, zero_numel)
        for z0 in range(z_lo, z_hi, 32 * WARPS):
            offs = z0 + gl.arange(0, 32 * WARPS, layout=Z)
            gl.store(zero_ptr + offs, gl.zeros([32 * WARPS], gl.float32, layout=Z), mask=offs < z_hi)

    pid = gl.program_id(0)
    pid_k = gl.program_id(1)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    if PAIR_BLOCKS:  # block = flat slot; the raw id range-checked and masked here
        slot = pid_m
        if slot >= num_slots:
            return
        eid = gl.load(expert_ids_ptr + slot)
        if eid < 0:
            return
        if eid >= num_experts:
            return
        expert = eid.to(gl.int32)
        if HAS_MASK:
            if gl.load(expert_mask_ptr + expert) == 0:
                return
    else:
        expert = gl.load(expert_ids_ptr + pid_m)
        if expert < 0:
            return
        slot = gl.load(sorted_ids_ptr + pid_m)
        if slot >= num_slots:
            return
    expert = expert.to(gl.int64)
    slot = slot.to(gl.int64)
    if STAGE1:
        a_row = slot // top_k
    else:
        a_row = slot

    i = gl.arange(0, TR2, layout=ROW)
    if STAGE1:  # lo: the gate row of column col, hi: its up row
        col_lo = pid_n * BLOCK_N + i
        col_hi = col_lo
        if INTERLEAVED:
            rows_lo = 2 * col_lo
            rows_hi = 2 * col_lo + 1
        else:
            rows_lo = col_lo
            rows_hi = col_lo + N
        ok_lo = col_lo < N
        ok_hi = ok_lo
    else:  # lo: column i, hi: column i + TR2 of the program's BLOCK_N
        col_lo = pid_n * BLOCK_N + i
        col_hi = col_lo + TR2
        rows_lo = col_lo
        rows_hi = col_hi
        ok_lo = col_lo < N
        ok_hi = col_hi < N
    # rows past N are read as row 0 (their sums are never stored): no row masks in the loop
    rows_lo = gl.where(ok_lo, rows_lo, 0)
    rows_hi = gl.where(ok_hi, rows_hi, 0)
    words_base = (b_ptr + expert * stride_be).to(gl.pointer_type(gl.int32))
    stride_wn = stride_bn // 4
    bs_base = bs_ptr + expert * stride_bse

    k_steps = gl.cdiv(K, BLOCK_K)
    k_begin = (pid_k * k_steps // SPLIT_K) * BLOCK_K
    k_end = gl.minimum(((pid_k + 1) * k_steps // SPLIT_K) * BLOCK_K, K)
    n_steps = gl.cdiv(k_end - k_begin, BLOCK_K)
    src = (words_base, bs_base, rows_lo, rows_hi, stride_wn, stride_bsn, stride_bsk)
    STEPS: gl.constexpr = K_CHUNKS * CH
    k_first = k_begin
    if EVEN_K:  # an empty split (more splits than steps) reads a real step it never uses
        k_first = gl.minimum(k_begin, K - BLOCK_K)
    if RING == 0:  # the weights through registers, fetched a step ahead
        # the first weight step is in flight before anything waits on the previous launch
        wa_lo, wa_hi, sa_lo, sa_hi = _fetch(src, k_first, k_end, L, NSB, EVEN_K, SCALE_WORDS)
        if PDL and not STAGE1:
            _pdl_wait()

        # activations of this K range -> f16 pairs in shared memory, scaled into [1, 2) by 2^-e
        up, down = _act_scale(a_ptr, a_row, stride_am, k_begin, k_end, P, CH, NSB, BLOCK_K)
        pairs = _alloc_pairs(K_CHUNKS, CH, NSB, SMEM)
        _stage_pairs(a_ptr, a_row, stride_am, k_begin, k_end, up, pairs, P, CH, NSB, BLOCK_K)
        pairs0, pairs1, pairs2, pairs3 = _step_views(pairs, STEPS, NSB, SMEM_STEP)

        # two steps per iteration, their weights in two register sets (a and b) that alternate:
        # each is fetched a step before its arithmetic, straight into the registers it is used
        # from (one set carried over with a copy would wait on the loads at every iteration's
        # end)
        acc = gl.zeros([TR2, NSB, 4], gl.float32, layout=L)
        first = n_steps % 2
        if first == 1:  # an odd count: step 0 alone, so that the loop's steps come in pairs
            nb = 1
            if EVEN_K:  # (one step: that step again)
                nb = gl.minimum(nb, n_steps - 1)
            wb_lo, wb_hi, sb_lo, sb_hi = _fetch(src, k_begin + nb * BLOCK_K, k_end, L, NSB,
                                                EVEN_K, SCALE_WORDS)
            acc = _step(acc, wa_lo, wa_hi, sa_lo, sa_hi, pairs0, pairs1, pairs2, pairs3, 0, L,
                        NSB, SCALE_WORDS)
            wa_lo, wa_hi, sa_lo, sa_hi = wb_lo, wb_hi, sb_lo, sb_hi
        for step in range(first, n_steps, 2):
            wb_lo, wb_hi, sb_lo, sb_hi = _fetch(src, k_begin + (step + 1) * BLOCK_K, k_end, L,
                                                NSB, EVEN_K, SCALE_WORDS)
            acc = _step(acc, wa_lo, wa_hi, sa_lo, sa_hi, pairs0, pairs1, pairs2, pairs3, step, L,
                        NSB, SCALE_WORDS)
            na = step + 2  # (past the last step: the last step again when nothing is masked)
            if EVEN_K:
                na = gl.minimum(na, n_steps - 1)
            wa_lo, wa_hi, sa_lo, sa_hi = _fetch(src, k_begin + na * BLOCK_K, k_end, L, NSB,
                                                EVEN_K, SCALE_WORDS)
            acc = _step(acc, wb_lo, wb_hi, sb_lo, sb_hi, pairs0, pairs1, pairs2, pairs3, step + 1,
                        L, NSB, SCALE_WORDS)
    else:  # the weights through a ring of RING steps in shared memory: a one-warp partition
        # issues the TMA copies (b_desc: the weight words as [experts * rows, K / 8] int32, a
        # box of TR2 rows x one step), the default partition stages, decodes and multiplies
        # (the descriptor's layout: no swizzle, so a slot is row-major and reads back as words)
        ring_lo = gl.allocate_shared_memory(gl.int32, [RING, TR2, BLOCK_K // 8], b_desc.layout)
        ring_hi = gl.allocate_shared_memory(gl.int32, [RING, TR2, BLOCK_K // 8], b_desc.layout)
        full = gl.allocate_shared_memory(gl.int64, [RING, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [RING, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(RING):
            mbarrier.init(full.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        pairs = _alloc_pairs(K_CHUNKS, CH, NSB, SMEM)
        # the first rows of the lo and hi boxes in the [experts * rows, K / 8] view
        if STAGE1:  # gate rows [0, N), up rows [N, 2N)
            row0 = (expert * 2 * N).to(gl.int32) + pid_n * BLOCK_N
            row_hi0 = row0 + N
        else:  # the program's BLOCK_N rows, lo half then hi half
            row0 = (expert * N).to(gl.int32) + pid_n * BLOCK_N
            row_hi0 = row0 + TR2
        rings = (ring_lo, ring_hi, full, empty)
        acc, down = gl.warp_specialize([
            (_ring_consumer, (a_ptr, a_row, stride_am, k_begin, k_first, k_end, n_steps, src,
                              pairs, rings, PDL and not STAGE1, L, P,
                              SMEM_STEP, CH, NSB, BLOCK_K, STEPS, TR2, EVEN_K, SCALE_WORDS)),
            (_ring_producer, (b_desc, rings, row0, row_hi0, k_begin // 8, n_steps, BLOCK_K)),
        ], [1], [24])
    # outputs 0, 1 of a lane are lo-row sums, 2, 3 hi-row sums (lanes c = 2, 3: zeros)
    w = gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, L))), 0), 1)
    lo = gl.sum(gl.sum(gl.where(w < 2, acc, 0.0), axis=2), axis=1) * down
    hi = gl.sum(gl.sum(gl.where(w < 2, 0.0, acc), axis=2), axis=1) * down

    if MUL_WEIGHT:
        rw = gl.load(topk_w_ptr + slot).to(gl.float32)
    if STAGE1:
        if MUL_WEIGHT:  # apply_router_weight_on_input: scale h before the bias
            lo = lo * rw
            hi = hi * rw
        if HAS_BIAS:
            lo += gl.load(bias_ptr + expert * stride_biase + rows_lo, mask=ok_lo, other=0.0)
            hi += gl.load(bias_ptr + expert * stride_biase + rows_hi, mask=ok_hi, other=0.0)
        if ACT == 0:
            z = lo / (1.0 + gl.exp(-lo)) * hi
        else:
            g = gl.minimum(lo, limit, propagate_nan=tl.PropagateNan.ALL)
            u = gl.minimum(gl.maximum(hi, -limit, propagate_nan=tl.PropagateNan.ALL), limit,
                           propagate_nan=tl.PropagateNan.ALL)
            z = g / (1.0 + gl.exp(-alpha * g)) * (u + 1.0)
        gl.store(c_ptr + slot * stride_cm + col_lo, z.to(c_ptr.dtype.element_ty), mask=ok_lo)
    else:
        if HAS_BIAS:  # once per output tile: by the first K split
            lo += gl.load(bias_ptr + expert * stride_biase + rows_lo, mask=ok_lo & (pid_k == 0),
                          other=0.0)
            hi += gl.load(bias_ptr + expert * stride_biase + rows_hi, mask=ok_hi & (pid_k == 0),
                          other=0.0)
        if MUL_WEIGHT:
            lo = lo * rw
            hi = hi * rw
        if ATOMIC_OUT:
            out = c_ptr + (slot // top_k) * stride_cm
            gl.atomic_add(out + col_lo, lo, mask=ok_lo, sem="relaxed")
            gl.atomic_add(out + col_hi, hi, mask=ok_hi, sem="relaxed")
        else:
            out = c_ptr + slot * stride_cm
            gl.store(out + col_lo, lo.to(c_ptr.dtype.element_ty), mask=ok_lo)
            gl.store(out + col_hi, hi.to(c_ptr.dtype.element_ty), mask=ok_hi)


# the most 16-byte activation pieces a thread loads at once in the staging (registers held
# across one memory round trip; 8 raised the kernel to 95 registers at K = 7168, 4 keeps 64)
_STAGING_REPS = 4


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _staging_chunks(K: int, st: dict, split_k: int) -> tuple[int, int, int]:
    """(CH, REPS, K_CHUNKS) of the activation staging: steps per staging chunk (the kernel's CH:
    REPS times the steps its staging layout covers at once, 8 // min(NSB, 8) per warp), the
    pieces per thread that make one chunk (up to _STAGING_REPS: the whole K range when it
    fits) and the chunks of one K split, rounded up to a power of two."""
    nsb, warps = st["BLOCK_K"] // 32, st["num_warps"]
    steps = -(-(-(-K // st["BLOCK_K"])) // split_k)
    per_rep = (8 // min(nsb, 8)) * warps
    reps = min(_STAGING_REPS, _next_pow2(-(-steps // per_rep)))
    ch = per_rep * reps
    return ch, reps, _next_pow2(-(-steps // ch))


# the shared memory a program of the blocks may take (staging, and the ring's slots)
_SMEM_CAP = 128 * 1024


def _lo_rows(st: dict, stage1: bool) -> int:
    """Rows a program reads per row set (lo, and as many hi): stage 1 BLOCK_N gate rows (and
    their up rows), stage 2 half its BLOCK_N columns (the other half)."""
    return st["BLOCK_N"] if stage1 else st["BLOCK_N"] // 2


def _staging_bytes(k_chunks: int, ch: int, st: dict) -> int:
    """Shared memory of the activation staging: four [K_CHUNKS, CH, NSB, 4] int32 buffers."""
    return 4 * k_chunks * ch * (st["BLOCK_K"] // 32) * 16


def scale_words(b_scale, K: int) -> bool:
    """Whether the kernel may read a lane's scales as one 4-byte word per row and group of 4
    blocks: unit K stride, 4-byte aligned rows and experts, whole groups (K a multiple of 128)."""
    return (b_scale.stride(2) == 1 and b_scale.stride(1) % 4 == 0 and b_scale.stride(0) % 4 == 0
            and b_scale.data_ptr() % 4 == 0 and K % 128 == 0)


def fits(*, a, b, c, stage1: bool, st: dict) -> bool:
    """Whether a BLOCK_M = 1 MXFP4 stage can run here: 16-bit activations (f16 staging keeps
    their 8-11 significant bits; fp32 models keep the CUDA-core blocks) in 16-byte rows, unit K
    strides of weights and output, whole groups of 4 blocks per step, 8 lo rows per row-splitting warp,
    the staging in shared memory."""
    import torch

    nsb, warps = st["BLOCK_K"] // 32, st["num_warps"]
    tr2 = _lo_rows(st, stage1)
    wk = min(warps, nsb // 4)
    ch, _, k_chunks = _staging_chunks(b.shape[2] * 2, st, st.get("split_k", 1))
    return (a.dtype in (torch.bfloat16, torch.float16) and a.stride(1) == 1
            and a.stride(0) % 8 == 0 and a.data_ptr() % 16 == 0 and b.stride(2) == 1
            and b.stride(1) % 16 == 0 and b.data_ptr() % 16 == 0 and c.stride(-1) == 1
            and nsb % 4 == 0 and wk >= 1 and tr2 >= 8 * (warps // wk)
            and _staging_bytes(k_chunks, ch, st) <= _SMEM_CAP)


def ring_descriptor(b, *, stage1: bool, interleaved: bool, st: dict, k_chunks: int, ch: int):
    """The TMA view of the weight words for a ring of st["ring"] steps ([experts * rows, K / 8]
    int32, a box of one step of the lo or hi rows), or None where the ring cannot run: stage 1
    with interleaved gate/up rows, experts not back to back, rows or base off 16 bytes, the
    ring and the staging over the blocks' shared-memory cap, warps not whole warpgroups (a
    warp-specialized kernel's rule)."""
    ring, bk = st.get("ring", 0), st["BLOCK_K"]
    if not ring:  # (the register path: nothing to build on this per-launch path)
        return None
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    tr2 = _lo_rows(st, stage1)
    E, R, half_k = b.shape
    smem = 2 * ring * tr2 * bk // 2 + _staging_bytes(k_chunks, ch, st)  # lo + hi slots, staging
    if ((stage1 and interleaved) or b.stride(2) != 1 or b.stride(1) % 16
            or b.stride(0) != R * b.stride(1) or half_k % 4 or b.data_ptr() % 16
            or tr2 > 256 or smem > _SMEM_CAP or st["num_warps"] % 4):
        return None
    words = b.view(torch.int32)  # (last dim contiguous, a multiple of 4 bytes: checked above)
    return TensorDescriptor(words, [E * R, half_k // 4], [b.stride(1) // 4, 1], [tr2, bk // 8],
                            gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2))


def launch(*, a, b, b_scale, bias, c, sorted_ids, expert_ids, topk_w, pair_mask, zero, N, Kdim,
           num_slots, top_k, num_experts, stage1, interleaved, act, mul_weight, atomic_out,
           alpha, limit, st, pdl, grid):
    """One stage on `_decode_mma_kernel` (arguments as `fused_moe_triton._launch_gemm`'s)."""
    split_k = grid[1]
    ch, _, k_chunks = _staging_chunks(Kdim, st, split_k)
    pair_blocks = sorted_ids is None
    dummy = expert_ids
    desc = ring_descriptor(b, stage1=stage1, interleaved=interleaved, st=st, k_chunks=k_chunks,
                           ch=ch)
    # with the ring: one more (padded) warpgroup for the producer, registers capped so that
    # several programs share an SM (the consumers take what the producer's 24 leave)
    extra = {"maxnreg": st.get("maxnreg", 80)} if desc is not None else {}
    return _decode_mma_kernel[grid](
        a, b, b_scale, bias if bias is not None else dummy, c,
        dummy if pair_blocks else sorted_ids, expert_ids, topk_w,
        pair_mask if pair_mask is not None else dummy, zero if zero is not None else dummy,
        N, Kdim, num_slots, top_k, num_experts, zero.numel() if zero is not None else 0,
        a.stride(0), b.stride(0), b.stride(1), b_scale.stride(0), b_scale.stride(1),
        b_scale.stride(2), bias.stride(0) if bias is not None else 0, c.stride(0),
        float(alpha), float(limit),
        STAGE1=stage1, INTERLEAVED=interleaved, ACT=act, HAS_BIAS=bias is not None,
        MUL_WEIGHT=mul_weight, ATOMIC_OUT=atomic_out, PAIR_BLOCKS=pair_blocks,
        HAS_MASK=pair_mask is not None, PDL=pdl, ZERO_OUT=zero is not None,
        BLOCK_N=st["BLOCK_N"], BLOCK_K=st["BLOCK_K"], SPLIT_K=split_k, CH=ch,
        K_CHUNKS=k_chunks, WARPS=st["num_warps"], EVEN_K=Kdim % st["BLOCK_K"] == 0,
        SCALE_WORDS=scale_words(b_scale, Kdim), RING=0 if desc is None else st["ring"],
        b_desc=desc, num_warps=st["num_warps"], launch_pdl=pdl and not stage1, **extra,
    )
