"""Triton backend of `fused_moe` (SPEC 4): two grouped GEMMs over expert-sorted token blocks.

    align:   flat (token, slot) ids grouped by expert in blocks of BLOCK_M rows (no host sync)
    stage 1: z[slot] = act(gate(h), up(h)), h = Q(x[token]) @ W1_e^T (* w) + b1  (one kernel)
    stage 2: out[token] += w * (Q(z[slot]) @ W2_e^T + b2)  (fp32 atomics into [M, H], one kernel;
             or fp32 rows per slot summed by a second kernel)

Weights stay in the SPEC layout: MXFP4 is decoded in registers (nibbles + E8M0 -> bf16 for the
w4a16 path; -> fp8 with a per-column power of two per K block for the fp8 path; -> f16 pairs
fed to mma.sync for BLOCK_M = 1 decode blocks on the GPU (Gluon: _decode_mma.py), -> fp32 on
the CUDA cores for those that do not fit it and in the interpreter), or for large batches decoded first, a chunk
of experts at a time (to bf16, or to fp8 with a power of two per row); fp8 weights keep their
per-channel scales.
Launch configurations come from `tuning.get_config`.

`fused_moe_triton` is registered as the torch custom op `moeprec::fused_moe_triton` (with a
fake implementation) so that `torch.compile` traces through it; eager calls skip the dispatcher.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from moeprec import backends
from moeprec.backends import triton_interpret
from moeprec.kernels import _fused_moe_kernels as K
from moeprec.kernels._grid import cdiv, next_power_of_2
from moeprec.kernels.tuning import get_config, path_name

# Largest M*k that the single-program align kernel handles (one launch for decode); beyond it
# three launches spread the work over the GPU (one program took 240 us of GPU time at 4096
# slots and 128 experts on the H200, the torch sort path ~450 us of host time).
_ALIGN_ONE_PROGRAM_MAX_SLOTS = 256
# Chunks per step of the multi-launch path's scan (each program walks the chunks of 16 experts)
_ALIGN_SCAN_ROWS = 256
# Tests set this to fill intermediates with NaN, proving that no unwritten row is ever read.
_POISON_INTERMEDIATE = False
# Configs with "dequant" (large MXFP4 batches, see `_gemm_dequantized`) decode at most this many
# bytes of expert weights at a time: deepseek-v3's 256 experts would take 15 GB at once.
DEQUANT_WORKSPACE_BYTES = 1 << 30
# Stage 2 without atomics holds one fp32 row per slot (M * k * H * 4 bytes: 3.8 GB for
# DeepSeek-V3 at M = 16384); past this size a config's "atomic": false falls back to the
# atomics, whose buffer is k times smaller.
SLOT_ROWS_MAX_BYTES = 4 << 30
# Stage 2's fp32 atomic output up to this size is zero-filled by stage 1's programs, not by a
# memset launch of its own (Qwen3-30B-A3B: M <= 512). With pdl as well: 1.00-1.04x on the H200
# at every pdl decode entry (2026-12-03, benchmarks/probes/decode_flags.py).
ZERO_IN_STAGE1_MAX_BYTES = 4 << 20



def _packed_aligned(w: torch.Tensor) -> bool:
    """Packed MXFP4 weights as the kernels read them: unit K stride, 16-byte rows and base."""
    return (w.stride(2) == 1 and w.stride(1) % 16 == 0 and w.stride(0) % 16 == 0
            and w.data_ptr() % 16 == 0)


def _with_aligned_storage(w: torch.Tensor, name: str) -> torch.Tensor:
    """`w`, or an aligned copy of it (with a warning: the copy is made on every call).

    The CUDA-core blocks read MXFP4 bytes as int32 words, and on the H200 (Triton 3.6) the
    tensor-core path gave wrong numbers for packed weights starting off a 4-byte boundary.
    Rows are K/2 bytes, a multiple of 16 (K is a multiple of 32), so only views into larger
    buffers and transposed storage land here.
    """
    if _packed_aligned(w):
        return w
    warnings.warn(f"fused_moe: MXFP4 {name} is not stored with unit K stride on 16-byte "
                  "boundaries; it is copied on every call (store it contiguous and aligned)",
                  stacklevel=4)
    return torch.empty(w.shape, dtype=w.dtype, device=w.device).copy_(w)


def _device_name(t: torch.Tensor) -> str | None:
    return torch.cuda.get_device_name(t.device) if t.is_cuda else None


def max_blocks(num_slots: int, num_experts: int, block_m: int) -> int:
    """Upper bound on used blocks: every expert with tokens adds at most one partial block."""
    return cdiv(num_slots, block_m) + min(num_experts, num_slots)


def _scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An intermediate buffer: uninitialised, or NaN when tests poison them."""
    if _POISON_INTERMEDIATE:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _mask_i32(expert_mask: torch.Tensor) -> torch.Tensor:
    """The expert mask as the kernels read it (int32, unit stride; such a mask passes as is)."""
    return expert_mask.to(torch.int32).contiguous()


class Alignment(NamedTuple):
    sorted_ids: torch.Tensor   # flat slot ids grouped by expert, blocks padded with num_slots
    expert_ids: torch.Tensor   # expert of each block, -1 past the used ones
    routed: torch.Tensor | None  # kept slots per expert (int32, >= E entries), where counted


def align_blocks(topk_ids: torch.Tensor, num_experts: int, block_m: int,
                 expert_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_ids, expert_ids) in vLLM's block layout; masked and out-of-range ids dropped.

    expert_ids is -1 for every block the GEMMs must skip. Sizes depend on shapes only.
    """
    return _align(topk_ids, num_experts, block_m, expert_mask)[:2]


def _align_chunk_launch(e_pad: int) -> tuple[int, int]:
    """Slots per program and warps of the three-launch alignment (a [chunk, e_pad] one-hot
    tile per program). 128 slots x 4 warps at 128 and 256 experts: fewer, fuller programs for
    the place launch, whose every program rebuilds the block layout from the totals."""
    if e_pad <= 64:
        return 64, 4
    if e_pad <= 256:
        return 128, 4
    return max(16, 16384 // e_pad), 8


def _align(topk_ids: torch.Tensor, num_experts: int, block_m: int,
           expert_mask: torch.Tensor | None) -> Alignment:
    """`align_blocks`, plus the kept slots per expert where the alignment counted them in a
    buffer of their own (past `_ALIGN_ONE_PROGRAM_MAX_SLOTS` slots; else None)."""
    num_slots = topk_ids.numel()
    nb = max_blocks(num_slots, num_experts, block_m)
    dev = topk_ids.device
    sorted_ids = torch.empty(nb * block_m, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(nb, dtype=torch.int32, device=dev)
    mask = _mask_i32(expert_mask) if expert_mask is not None else sorted_ids
    ids = topk_ids.reshape(-1)
    e_pad = next_power_of_2(num_experts)
    if num_slots <= _ALIGN_ONE_PROGRAM_MAX_SLOTS:
        chunk = max(16, min(64, 16384 // e_pad))  # a [chunk, e_pad] one-hot tile per step
        one_chunk = num_slots <= chunk  # (decode) the ids in one tile, no larger than needed
        if one_chunk:
            chunk = max(16, next_power_of_2(num_slots))
        K._align_kernel[(1,)](ids, mask, sorted_ids, expert_ids, num_slots, num_experts, nb,
                              HAS_MASK=expert_mask is not None, BLOCK_M=block_m, E_PAD=e_pad,
                              CHUNK=chunk, ONE_CHUNK=one_chunk, num_warps=4 if e_pad <= 64 else 8)
        return Alignment(sorted_ids, expert_ids, None)
    totals, _ = _align_launches(ids, mask, expert_mask is not None, num_experts, block_m,
                                sorted_ids, expert_ids, *_align_chunk_launch(e_pad))
    return Alignment(sorted_ids, expert_ids, totals)


def _align_launches(ids: torch.Tensor, mask: torch.Tensor, has_mask: bool, num_experts: int,
                    block_m: int, sorted_ids: torch.Tensor, expert_ids: torch.Tensor, chunk: int,
                    warps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The three-launch alignment of the flat ids into `sorted_ids` / `expert_ids`, `chunk`
    slots and `warps` warps a program; returns (kept slots per expert, each chunk's offset
    within its expert's segment)."""
    num_slots, nb = ids.numel(), expert_ids.numel()
    e_pad = next_power_of_2(num_experts)
    common = dict(HAS_MASK=has_mask, E_PAD=e_pad, CHUNK=chunk, num_warps=warps)
    num_chunks = cdiv(num_slots, chunk)
    chunk_base = torch.empty(num_chunks, e_pad, dtype=torch.int32, device=ids.device)
    totals = torch.empty(e_pad, dtype=torch.int32, device=ids.device)
    K._align_count_kernel[(num_chunks,)](ids, mask, chunk_base, num_slots, num_experts, **common)
    eb = min(16, e_pad)  # experts per scan program
    K._align_scan_kernel[(e_pad // eb,)](chunk_base, totals, num_chunks, E_PAD=e_pad, EB=eb,
                                         ROWS=_ALIGN_SCAN_ROWS, num_warps=4)
    K._align_place_kernel[(num_chunks,)](ids, mask, chunk_base, totals, sorted_ids, expert_ids,
                                         num_slots, num_experts, nb, cdiv(nb, num_chunks),
                                         BLOCK_M=block_m, **common)
    return totals, chunk_base


def _sum_slot_rows(rows: torch.Tensor, topk_ids: torch.Tensor, expert_mask: torch.Tensor | None,
                   M: int, k: int, E: int, out_dtype: torch.dtype) -> torch.Tensor:
    """The k fp32 rows of each token summed in fp32 and cast once (non-atomic combine);
    `expert_mask` as `_mask_i32` gives it."""
    H = rows.shape[1]
    out = torch.empty(M, H, dtype=out_dtype, device=rows.device)
    if M == 0:
        return out
    ids = topk_ids.reshape(-1)
    mask = expert_mask if expert_mask is not None else ids
    block_n = min(1024, next_power_of_2(H))
    K._sum_slot_rows_kernel[(M, cdiv(H, block_n))](
        rows, ids, mask, out, H, k, E, rows.stride(0), out.stride(0),
        HAS_MASK=expert_mask is not None, K_PAD=next_power_of_2(k), BLOCK_N=block_n,
        num_warps=4)
    return out


# the fp8 row quantizer reads a row once when it fits this many values (registers), else twice;
# programs take about ROW_TILE values (several short rows each)
QUANT_ONE_PASS_MAX = 16384
QUANT_ROW_TILE = 4096


def _quant_fp8_rows(x: torch.Tensor, one_pass_max: int = QUANT_ONE_PASS_MAX
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()  # the kernel walks rows with unit column stride
    M, H = x.shape
    q = torch.empty(M, H, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(M, dtype=torch.float32, device=x.device)
    width = next_power_of_2(H)
    one_pass = width <= one_pass_max
    block = width if one_pass else min(QUANT_ROW_TILE, one_pass_max)
    rows = max(1, QUANT_ROW_TILE // block)
    K._quant_fp8_rows_kernel[(cdiv(M, rows),)](
        x, q, s, M, H, x.stride(0), q.stride(0), ROWS=rows, BLOCK=block, ONE_PASS=one_pass,
        INTERP=triton_interpret(), num_warps=max(4, min(16, rows * block // 1024)))
    return q, s


def _compute_dtype(dtype: torch.dtype) -> Any:
    import triton.language as tl

    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


def use_dot_scaled(a_dtype: torch.dtype, a_fp8: bool, st: dict[str, Any], interpret: bool) -> bool:
    """Whether an MXFP4 stage runs through tl.dot_scaled (else the explicit decode).

    bf16 activations take the explicit bf16-pair decode (1.09-1.53x tl.dot_scaled on the H200
    at every measured tile point, M = 16-4096, BLOCK_M 16-128: docs/kernels.md); fp16 and fp8
    activations (stage 2's A may hold bf16 rows that it quantizes to fp8 as it loads) take
    tl.dot_scaled; a stage config may choose ("dot_scaled"). The interpreter and fp32 models
    always decode explicitly.
    """
    if interpret or a_dtype == torch.float32:
        return False
    return bool(st.get("dot_scaled", a_fp8 or a_dtype != torch.bfloat16))


def _weight_descriptor(b: torch.Tensor, parts: int, tile_rows: int, block_k: int):
    """TMA descriptor for weight tiles of `tile_rows` rows by `block_k`: the [E, R, K] weights
    viewed as [E, parts, R / parts, K], one box [1, parts, tile_rows / parts, block_k]. None
    where TMA cannot address them (K not contiguous, a base or stride off 16 bytes, a box side
    over 256): the kernel then loads through pointers, as without the option."""
    E, R, Kdim = b.shape
    rows, box = R // parts, tile_rows // parts
    strides = [b.stride(0), rows * b.stride(1), b.stride(1), b.stride(2)]
    if (b.stride(2) != 1 or R % parts or box > 256 or block_k > 256 or b.numel() == 0
            or b.data_ptr() % 16 or any(st * b.element_size() % 16 for st in strides[:-1])):
        return None
    return TensorDescriptor(b, [E, parts, rows, Kdim], strides, [1, parts, box, block_k])


# Triton versions whose Gluon API the tensor-core decode blocks are written against and were
# run on a GPU with. Gluon is experimental and moved between releases (compiled for sm_90 on
# CPU, 2026-12-04: 3.4 lacks gl.num_programs, 3.5 has another warp_specialize signature, 3.9
# renamed gl.thread_barrier), so elsewhere the CUDA-core decode blocks run.
GLUON_DECODE_TRITON = ((3, 6),)


@functools.cache
def gluon_decode_available() -> bool:
    """Whether the Gluon tensor-core decode blocks (stage setting "mma") can run with the
    installed Triton; if not, one warning, and the CUDA-core blocks take those stages."""
    import triton

    version = tuple(int(v) for v in triton.__version__.split(".")[:2] if v.isdigit())
    if version in GLUON_DECODE_TRITON:
        try:
            from moeprec.kernels import _decode_mma  # noqa: F401
            return True
        except ImportError as exc:
            why = f"its Gluon imports failed ({exc})"
    else:
        why = (f"they are written for Triton {', '.join('%d.%d' % v for v in GLUON_DECODE_TRITON)}"
               f" (Gluon's API changes between releases)")
    warnings.warn(f"moeprec: Triton {triton.__version__}: the MXFP4 tensor-core decode blocks are "
                  f"off because {why}; the CUDA-core decode blocks run instead (slower at decode "
                  f"batches; results within the same tolerances)", RuntimeWarning, stacklevel=2)
    return False


def check_device(device: torch.device, quant: str, act_dtype: str, pdl: bool) -> None:
    """A clear error where the kernels cannot compile for the GPU (compiled on CPU for sm_80
    and sm_89 with Triton 3.6, 2026-12-04): fp8 weights or activations and the MXFP4 decode
    blocks need fp8 e4m3 conversions and MMAs (compute capability 8.9 on); "pdl" needs 9.0.
    bf16 / fp16 weights with 16-bit activations compile from 8.0 (tuned and tested on 9.0)."""
    have = backends.cuda_capability(device)
    need, why = (0, 0), ""
    if backends.needs_fp8(quant, act_dtype):
        need = backends.FP8_CAPABILITY
        why = f"quant={quant!r} / act_dtype={act_dtype!r} (fp8 e4m3 conversions)"
    if pdl and backends.PDL_CAPABILITY > need:
        need, why = backends.PDL_CAPABILITY, "config 'pdl' (programmatic dependent launch)"
    if have < need:
        raise ValueError(
            f"hidden_states: the Triton kernels for {why} need a GPU of compute capability "
            f"{need[0]}.{need[1]} or later; {torch.cuda.get_device_name(device)} is {have[0]}."
            f"{have[1]} (use backend='torch', or bf16 weights and activations)")


def _launch_gemm(*, a, a_scale, b, b_scale, bias, c, c_scale, sorted_ids, expert_ids, topk_w,
                 N, Kdim, num_slots, top_k, interleaved, stage1, b_fmt, a_fp8,
                 a_quant, act, mul_weight, atomic_out, quant_out, compute_dtype, alpha,
                 limit, block_m, st, pair_mask=None, num_experts=0, pdl=False, zero=None):
    """One stage; returns the compiled kernel (probes read its registers and shared memory).
    `sorted_ids=None`: pair blocks (BLOCK_M = 1, no alignment): `expert_ids` is then the flat
    topk ids and `pair_mask` the expert mask, both checked in the kernel. `pdl`: stage 1 lets
    its dependent launch early; stage 2 is launched as that dependent and waits for stage 1's
    rows in the kernel. `zero` (stage 1 only): an fp32 tensor this launch also zero-fills."""
    assert zero is None or (stage1 and zero.dtype == torch.float32 and zero.is_contiguous())
    num_pid_m = expert_ids.numel()
    pair_blocks = sorted_ids is None
    dot_scaled = b_fmt == 1 and use_dot_scaled(a.dtype, a_fp8, st, triton_interpret())
    a_fmt = "e4m3" if a_fp8 else ("fp16" if a.dtype == torch.float16 else "bf16")
    gemv = block_m == 1 and not a_fp8  # one (token, expert) pair per block: CUDA cores
    split_k = int(st.get("split_k", 1)) if atomic_out else 1
    grid = (num_pid_m * cdiv(N, st["BLOCK_N"]), split_k)
    dummy = expert_ids
    if pair_blocks:
        sorted_ids = dummy
    a_scale_t = a_scale if a_scale is not None else dummy
    b_scale_t = b_scale if b_scale is not None else dummy
    bias_t = bias if bias is not None else dummy
    c_scale_t = c_scale if c_scale is not None else dummy

    def s(t, i):
        return t.stride(i) if t is not None and t.dim() > i else 0

    if gemv and b_fmt == 1 and st.get("mma") and not triton_interpret() and gluon_decode_available():
        from moeprec.kernels import _decode_mma

        if _decode_mma.fits(a=a, b=b, c=c, stage1=stage1, st=st):  # tensor-core decode blocks
            return _decode_mma.launch(
                a=a, b=b, b_scale=b_scale, bias=bias, c=c,
                sorted_ids=None if pair_blocks else sorted_ids, expert_ids=expert_ids,
                topk_w=topk_w, pair_mask=pair_mask, zero=zero, N=N, Kdim=Kdim,
                num_slots=num_slots, top_k=top_k, num_experts=num_experts, stage1=stage1,
                interleaved=interleaved, act=act, mul_weight=mul_weight, atomic_out=atomic_out,
                alpha=alpha, limit=limit, st=st, pdl=pdl, grid=grid)
    tile_rows = 2 * st["BLOCK_N"] if stage1 else st["BLOCK_N"]  # stage 1: gate and up rows
    b_parts = 2 if stage1 and not interleaved else 1
    b_desc = (_weight_descriptor(b, b_parts, tile_rows, st["BLOCK_K"])
              if st.get("tma_b") and b_fmt != 1 and not gemv else None)
    return K._moe_gemm_kernel[grid](
        a, a_scale_t, b, b_scale_t, bias_t, c, c_scale_t, b_desc, sorted_ids, expert_ids, topk_w,
        pair_mask if pair_mask is not None else dummy, zero if zero is not None else dummy,
        N, Kdim, num_slots, top_k, num_pid_m, num_experts, zero.numel() if zero is not None else 0,
        a.stride(0), a.stride(1), s(a_scale, 0),
        b.stride(0), b.stride(1), b.stride(2), s(b_scale, 0), s(b_scale, 1), s(b_scale, 2),
        s(bias, 0), c.stride(0), c.stride(1), s(c_scale, 0),
        float(alpha), float(limit),
        STAGE1=stage1, INTERLEAVED=interleaved, B_FMT=b_fmt, A_FP8=a_fp8, A_QUANT=a_quant, ACT=act,
        HAS_BIAS=bias is not None, MUL_WEIGHT=mul_weight, ATOMIC_OUT=atomic_out,
        QUANT_OUT=quant_out, COMPUTE_DTYPE=compute_dtype, INTERP=triton_interpret(),
        DOT_SCALED=dot_scaled, A_FMT=a_fmt,
        BLOCK_M=block_m, BLOCK_N=st["BLOCK_N"], BLOCK_K=st["BLOCK_K"], GROUP_M=st["GROUP_M"],
        TILE_ROWS=tile_rows, GEMV=gemv, SPLIT_K=split_k,
        PAIR_BLOCKS=pair_blocks, HAS_MASK=pair_mask is not None, EVEN_K=Kdim % st["BLOCK_K"] == 0,
        B_TMA=b_desc is not None, B_PARTS=b_parts, PDL=pdl, ZERO_OUT=zero is not None,
        num_warps=st["num_warps"], num_stages=st["num_stages"], launch_pdl=pdl and not stage1,
    )


def _gemm_dequantized(*, b, b_scale, bias, expert_ids, b_fmt, keep=None, **kw) -> None:
    """One stage on MXFP4 weights decoded first, a chunk of experts at a time.

    For large batches: every expert's weights are met by many token blocks, so decoding them
    once costs less than the MXFP4 tiles' slower main loop; the product is then a plain
    kernel's. 16-bit activations: decoded to the model dtype (0.53 bytes read and 2 written per
    weight; E2M1 * 2^(s-127) is exact there, so the MMAs see the in-kernel decode's values and
    results agree with the MXFP4 tiles up to summation order), then the bf16 kernel. fp8
    activations: decoded to E4M3 with one power of two per weight row (`mxfp4_to_fp8_triton`:
    exact for blocks within 14 binades of the row's largest, 1 byte written per weight), then
    the fp8 kernel with those as its per-channel scales, on fp8 tensor cores (the MXFP4 tiles
    with fp8 activations go through tl.dot_scaled, which Hopper runs on bf16 MMAs).
    Blocks of experts outside the chunk are marked -1 and skipped; the chunking depends on
    shapes only (no host sync). Experts flagged 0 in `keep` (int32 per expert: the kept slots
    the alignment counted, or the expert mask; expert parallelism masks most experts) are not
    decoded: no block reads them. Takes `_launch_gemm`'s arguments; the MXFP4 ones (`b`,
    `b_scale`, `b_fmt`) are replaced by the decoded chunk.
    """
    from moeprec.kernels import quantize as kq

    to_fp8 = kw["a_fp8"]
    dtype = kw["a"].dtype
    E = b.shape[0]
    per_expert = b.shape[1] * b.shape[2] * 2 * (1 if to_fp8 else dtype.itemsize)
    step = max(1, min(E, DEQUANT_WORKSPACE_BYTES // per_expert))
    for lo in range(0, E, step):
        hi = min(E, lo + step)
        ids = expert_ids if (lo, hi) == (0, E) else torch.where(
            (expert_ids >= lo) & (expert_ids < hi), expert_ids - lo, -1)
        chunk_keep = keep[lo:hi] if keep is not None else None
        if to_fp8:
            w, w_scale = kq.mxfp4_to_fp8_triton(b[lo:hi], b_scale[lo:hi], chunk_keep)
        else:
            w, w_scale = kq.dequantize_mxfp4_triton(b[lo:hi], b_scale[lo:hi], dtype, chunk_keep), None
        _launch_gemm(b=w, b_scale=w_scale, bias=bias[lo:hi] if bias is not None else None,
                     expert_ids=ids, b_fmt=2 if to_fp8 else 0, **kw)


def fused_moe_triton_impl(
    hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
    topk_weights: torch.Tensor, topk_ids: torch.Tensor, *, activation: str = "silu",
    gate_mode: str = "separated", swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
    quant: str = "none", w1_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None, act_dtype: str = "bf16",
    bias1: torch.Tensor | None = None, bias2: torch.Tensor | None = None,
    expert_mask: torch.Tensor | None = None, apply_router_weight_on_input: bool = False,
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """The kernels, called directly (validated arguments; `config` overrides the tuned one)."""
    M, H = hidden_states.shape
    E, two_i = w1.shape[0], w1.shape[1]
    I = two_i // 2  # noqa: E741
    k = topk_ids.shape[1]
    S = M * k
    dev = hidden_states.device
    out_dtype = hidden_states.dtype
    path = path_name(quant, act_dtype)
    cfg = config if config is not None else get_config(path, M, E, H, I, k, _device_name(hidden_states))
    if dev.type == "cuda":
        check_device(dev, quant, act_dtype, bool(cfg.get("pdl", False)))
    if quant == "mxfp4":
        w1, w2 = _with_aligned_storage(w1, "w1"), _with_aligned_storage(w2, "w2")
    bm = cfg["BLOCK_M"]
    b_fmt = {"none": 0, "mxfp4": 1, "fp8": 2}[quant]
    a_fp8 = act_dtype == "fp8"
    compute_dtype = _compute_dtype(out_dtype)
    act = 0 if activation == "silu" else 1

    # biases and routed weights are indexed with unit inner stride in the kernels
    bias1 = bias1.contiguous() if bias1 is not None else None
    bias2 = bias2.contiguous() if bias2 is not None else None
    # the mask as the kernels read it, converted once for every launch below
    expert_mask = _mask_i32(expert_mask) if expert_mask is not None else None
    pair = {}
    aligned = None
    if bm == 1 and cfg.get("pair_blocks", True):
        # one block per flat (token, slot): no alignment launch; the kernel checks the ids
        sorted_ids, expert_ids = None, topk_ids.reshape(-1).contiguous()
        pair = dict(num_experts=E, pair_mask=expert_mask)
    else:
        aligned = _align(topk_ids, E, bm, expert_mask)
        sorted_ids, expert_ids = aligned.sorted_ids, aligned.expert_ids
    topk_w = topk_weights.reshape(-1)
    if not topk_w.is_contiguous():
        topk_w = topk_w.contiguous()

    # stage 1 input
    x = hidden_states
    x_scale = None
    if act_dtype == "fp8":
        x, x_scale = _quant_fp8_rows(hidden_states)
    elif act_dtype == "fp4":  # accuracy emulation on GPUs without FP4 tensor cores
        from moeprec.formats.mxfp4 import fake_quantize_mxfp4

        x = fake_quantize_mxfp4(hidden_states.float(), scale_mode="rceil").to(out_dtype)

    s1, s2 = cfg["s1"], cfg["s2"]
    # stage 2 as a programmatic dependent launch: it waits for the launch right before it (stage
    # 1, or a row quantization between the stages), itself a plain launch that started after
    # all earlier work had finished
    pdl = bool(cfg.get("pdl", False))
    # large MXFP4 batches: decode the weights first, then the plain kernels
    dequant = (bool(cfg.get("dequant", False)) and quant == "mxfp4"
               and (a_fp8 or out_dtype != torch.float32))
    # experts without a kept slot (masked, or routed no token) are not decoded: no block reads
    # them (the one-program alignment keeps no counts: then only the masked ones are skipped)
    keep = aligned.routed if aligned is not None and aligned.routed is not None else expert_mask
    gemm = functools.partial(_gemm_dequantized, keep=keep) if dequant else _launch_gemm
    # stage 2's output first: its zero fill between the stages would hold up a pdl stage 2.
    # A small one stage 1 zero-fills (a launch fewer: decode calls are a few short kernels;
    # a pdl stage 2 adds into it only after its wait for stage 1); a large one a memset, at
    # full bandwidth.
    atomic = bool(cfg.get("atomic", True)) or S * H * 4 > SLOT_ROWS_MAX_BYTES
    zero_in_stage1 = atomic and not dequant and M * H * 4 <= ZERO_IN_STAGE1_MAX_BYTES
    if not atomic:  # slot rows: one fp32 row per kept slot, summed per token below (the rest
        out32 = _scratch((S, H), torch.float32, dev)  # are never read)
    elif zero_in_stage1:  # stage 1 writes its zeros
        out32 = _scratch((M, H), torch.float32, dev)
    else:
        out32 = torch.zeros(M, H, dtype=torch.float32, device=dev)
    inter = _scratch((S, I), out_dtype, dev)
    # fp8 z, per-token scales as the reference: either stage 1 gathers each z row's amax
    # (atomic max from 0) and stage 2 quantizes as it loads (one pass, but A is no longer a plain
    # pipelined copy), or a row-quantize kernel runs between the stages (extra pass over z)
    fuse_quant = a_fp8 and bool(cfg.get("fuse_quant", True))
    inter_amax = torch.zeros(S, dtype=torch.float32, device=dev) if fuse_quant else None
    gemm(
        a=x, a_scale=x_scale, b=w1, b_scale=w1_scale, bias=bias1, c=inter, c_scale=inter_amax,
        sorted_ids=sorted_ids, expert_ids=expert_ids, topk_w=topk_w, N=I, Kdim=H, num_slots=S,
        top_k=k, interleaved=gate_mode == "interleaved", stage1=True, b_fmt=b_fmt, a_fp8=a_fp8,
        a_quant=False, act=act, mul_weight=apply_router_weight_on_input, atomic_out=False,
        quant_out=fuse_quant, compute_dtype=compute_dtype, alpha=swiglu_alpha, limit=swiglu_limit,
        block_m=bm, st=s1, pdl=pdl, zero=out32 if zero_in_stage1 else None, **pair,
    )
    inter_scale = inter_amax
    if act_dtype == "fp4":
        from moeprec.formats.mxfp4 import fake_quantize_mxfp4

        inter = fake_quantize_mxfp4(inter.float(), scale_mode="rceil").to(out_dtype)
    elif a_fp8 and not fuse_quant:
        inter, inter_scale = _quant_fp8_rows(inter)

    gemm(
        a=inter, a_scale=inter_scale, b=w2, b_scale=w2_scale, bias=bias2, c=out32, c_scale=None,
        sorted_ids=sorted_ids, expert_ids=expert_ids, topk_w=topk_w, N=H, Kdim=I, num_slots=S,
        top_k=k, interleaved=False, stage1=False, b_fmt=b_fmt, a_fp8=a_fp8,
        a_quant=fuse_quant, act=act,
        mul_weight=not apply_router_weight_on_input, atomic_out=atomic, quant_out=False,
        compute_dtype=compute_dtype, alpha=swiglu_alpha, limit=swiglu_limit, block_m=bm, st=s2,
        pdl=pdl, **pair,
    )
    if not atomic:
        return _sum_slot_rows(out32, topk_ids, expert_mask, M, k, E, out_dtype)
    if pdl and out_dtype != torch.float32:  # the cast's launch overlaps stage 2's end
        return _cast_out(out32, out_dtype)
    return out32.to(out_dtype)


def _cast_out(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (contiguous fp32) cast to dtype by a programmatic dependent launch of the launch before."""
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    n = x.numel()
    K._cast_out_kernel[(cdiv(n, 1024),)](x, out, n, BLOCK=1024, INTERP=triton_interpret(),
                                        num_warps=4, launch_pdl=True)
    return out


@torch.library.custom_op("moeprec::fused_moe_triton", mutates_args=())
def _fused_moe_op(
    hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
    topk_weights: torch.Tensor, topk_ids: torch.Tensor, activation: str, gate_mode: str,
    swiglu_alpha: float, swiglu_limit: float, quant: str, w1_scale: torch.Tensor | None,
    w2_scale: torch.Tensor | None, act_dtype: str, bias1: torch.Tensor | None,
    bias2: torch.Tensor | None, expert_mask: torch.Tensor | None,
    apply_router_weight_on_input: bool,
) -> torch.Tensor:
    # the op's schema is read from the annotations above; the arguments pass through unchanged
    return fused_moe_triton_impl(**locals())


@_fused_moe_op.register_fake
def _fused_moe_fake(hidden_states, *args, **kwargs):
    return hidden_states.new_empty(hidden_states.shape)


def fused_moe_triton(hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                     topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                     **kwargs: Any) -> torch.Tensor:
    """`fused_moe` on the Triton kernels: `fused_moe`'s arguments, every keyword given, validated
    by the caller, act dtype resolved.

    Under `torch.compile` this goes through the custom op; eagerly it calls the kernels directly
    (the dispatcher would add latency to every decode step).
    """
    args = (hidden_states, w1, w2, topk_weights, topk_ids)
    if torch.compiler.is_compiling():
        # the schema wants plain Python floats and bools
        kwargs.update(swiglu_alpha=float(kwargs["swiglu_alpha"]),
                      swiglu_limit=float(kwargs["swiglu_limit"]),
                      apply_router_weight_on_input=bool(kwargs["apply_router_weight_on_input"]))
        return _fused_moe_op(*args, **kwargs)
    return fused_moe_triton_impl(*args, **kwargs)
