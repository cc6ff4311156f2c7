"""Compile the fused MoE GEMM kernel for sm_90 without a GPU and report what the compiler made.

For each variant: shared memory, whether loads are asynchronous copies (cp.async: pipelined),
and for the CUDA-core (BLOCK_M = 1) variants the SASS instructions per weight of the K loop
(with the alignment's block lists, then without them: config "pair_blocks");
the MMA instruction (wgmma = Hopper tensor cores; mma.sync = the older path Triton takes for
BLOCK_M < 64) and the wgmma wait depths (pendings >= 1 means consecutive MMAs overlap; 0 after
every dot means they are serialized). Pointer and stride divisibility are declared as the
runtime specialization would (without it the compiler emits scalar loads and no cp.async).
Each line ends with a digest of the variant's SASS ("sass <sha1 prefix>"): a refactor that
should not change the generated code diffs clean against the report of the commit before.

    PYTHONPATH=<dir with the device's triton, e.g. triton==3.6.0> python benchmarks/compile_fused_moe_sm90.py
"""

from __future__ import annotations

import collections
import re

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moeprec.kernels import _fused_moe_kernels as K

ARCH = 90  # the target (benchmarks/compile_targets.py compiles the same kernels for others)
UNIT_STRIDES = ("stride_ak", "stride_bk", "stride_bsk", "stride_cn", "stride_asm", "stride_csm")
NOT_DIVISIBLE = ("alpha", "limit", "num_slots", "top_k", "num_pid_m", "num_experts", "zero_numel")


def compile_variant(stage1, b_fmt, a_fp8, dot_scaled, bm, bn, bk, warps, stages=3, pair=False,
                    even_k=True, tma=False, pdl=False, zero=False):
    fn = K._moe_gemm_kernel
    names = fn.arg_names
    a_quant = a_fp8 and not stage1
    consts = dict(
        STAGE1=stage1, INTERLEAVED=False, B_FMT=b_fmt, A_FP8=a_fp8, A_QUANT=a_quant, ACT=0,
        HAS_BIAS=False, MUL_WEIGHT=not stage1, ATOMIC_OUT=True, QUANT_OUT=stage1 and a_fp8,
        COMPUTE_DTYPE=tl.bfloat16, INTERP=False, DOT_SCALED=dot_scaled,
        A_FMT="e4m3" if a_fp8 else "bf16", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
        TILE_ROWS=2 * bn if stage1 else bn, GEMV=bm == 1, SPLIT_K=1, PAIR_BLOCKS=pair,
        HAS_MASK=pair, EVEN_K=even_k, B_TMA=tma, B_PARTS=2 if stage1 else 1, PDL=pdl,
        ZERO_OUT=zero, **{s: 1 for s in UNIT_STRIDES},
    )
    if not tma:
        consts["b_desc"] = None
    ptrs = {
        "a_ptr": "*fp8e4nv" if (a_fp8 and stage1) else "*bf16",
        "a_scale_ptr": "*fp32",
        "b_ptr": {0: "*bf16", 1: "*u8", 2: "*fp8e4nv"}[b_fmt],
        "bs_ptr": "*u8" if b_fmt == 1 else "*fp32", "bias_ptr": "*fp32",
        "c_ptr": "*bf16" if stage1 else "*fp32", "c_scale_ptr": "*fp32",
        "sorted_ids_ptr": "*i32", "expert_ids_ptr": "*i32", "topk_w_ptr": "*fp32",
        "expert_mask_ptr": "*i32", "zero_ptr": "*fp32",
        # the weights as [E, parts, rows, K], one box of both parts (stage 1's gate and up rows)
        "b_desc": "tensordesc<{}[1,{},{},{}]>".format(
            {0: "bf16", 2: "fp8e4nv"}.get(b_fmt, "u8"), 2 if stage1 else 1, bn, bk),
    }
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if n in ("alpha", "limit") else "i32")
           for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in consts and n not in NOT_DIVISIBLE}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", ARCH, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def cuobjdump(cubin: bytes, flag: str) -> str:
    """What Triton's bundled cuobjdump prints for the cubin with `flag` (-sass, -res-usage)."""
    import os
    import subprocess
    import tempfile

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([os.path.join(bin_dir, "cuobjdump"), flag, f.name],
                              capture_output=True, text=True, check=True).stdout


def loop_sass(cubin: bytes, must: str | None = None) -> tuple[int, collections.Counter]:
    """SASS instructions of the kernel's innermost loop (the body of its backward branch), or of
    the innermost loop holding instruction `must` (a kernel with other loops before its main one)."""
    sass = cuobjdump(cubin, "-sass")
    ins = [(int(m.group(1), 16), m.group(2), line) for line in sass.splitlines()
           if (m := re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?P\d+\s+)?([A-Z][A-Z0-9_.]*)", line))]
    loops = [(int(t.group(1), 16), off) for off, op, line in ins if op.startswith("BRA")
             and (t := re.search(r"0x([0-9a-f]+)", line.split("BRA", 1)[1]))
             and int(t.group(1), 16) < off]
    bodies = [[op.split(".")[0] for off, op, _ in ins if a <= off <= b] for a, b in loops]
    bodies = [body for body in bodies if must is None or must in body]
    if not bodies:
        return 0, collections.Counter()
    body = min(bodies, key=len)
    return len(body), collections.Counter(body)


def sass_digest(cubin: bytes) -> str:
    """A short digest of the cubin's SASS listing (its header lines left out)."""
    import hashlib

    sass = cuobjdump(cubin, "-sass")
    body = "\n".join(line for line in sass.splitlines() if "Function" not in line and ".text" not in line)
    return hashlib.sha1(body.encode()).hexdigest()[:12]


def registers(cubin: bytes) -> int:
    """Registers per thread of the cubin's kernel (cuobjdump -res-usage)."""
    return int(re.search(r"REG:(\d+)", cuobjdump(cubin, "-res-usage")).group(1))


def compile_decode_mma(stage1, bn, bk, warps, split=1, even_k=True, K=4096, scale_words=True,
                       ring=0, maxnreg=None):
    """The Gluon tensor-core decode blocks (`moeprec/kernels/_decode_mma.py`), pair blocks,
    staged as for a K of `K`."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from moeprec.kernels import _decode_mma as D

    fn = D._decode_mma_kernel
    names = fn.arg_names
    ch, _, k_chunks = D._staging_chunks(K, {"BLOCK_K": bk, "num_warps": warps}, split)
    consts = dict(STAGE1=stage1, INTERLEAVED=False, ACT=0, HAS_BIAS=False, MUL_WEIGHT=not stage1,
                  ATOMIC_OUT=True, PAIR_BLOCKS=True, HAS_MASK=True, PDL=False, ZERO_OUT=False,
                  BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, CH=ch, K_CHUNKS=k_chunks,
                  WARPS=warps, EVEN_K=even_k, SCALE_WORDS=scale_words, stride_bsk=1, RING=ring)
    if not ring:
        consts["b_desc"] = None
    ptrs = dict(a_ptr="*bf16", b_ptr="*u8", bs_ptr="*u8", bias_ptr="*fp32",
                c_ptr="*bf16" if stage1 else "*fp32", sorted_ids_ptr="*i32",
                expert_ids_ptr="*i32", topk_w_ptr="*fp32", expert_mask_ptr="*i32", zero_ptr="*fp32",
                # the ring's TMA view of the weight words: [experts * rows, K / 8] int32
                b_desc="tensordesc<i32[{},{}],NVMMASharedLayout(swizzle_byte_width=0, "
                       "element_bitwidth=32, rank=2)>".format(bn if stage1 else bn // 2, bk // 8))
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if n in ("alpha", "limit") else "i32")
           for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in consts and n not in NOT_DIVISIBLE}
    src = GluonASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                         attrs=attrs)
    opts = dict(num_warps=warps)
    if maxnreg:
        opts["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", ARCH, 32), options=opts)


def main() -> None:
    print(f"triton {triton.__version__}")
    variants = [  # (stage1, b_fmt, a_fp8, dot_scaled, BM, BN, BK, warps)
        (True, 0, False, False, 16, 64, 128, 4), (False, 0, False, False, 16, 64, 128, 4),
        (True, 0, False, False, 128, 128, 64, 8), (False, 0, False, False, 128, 128, 64, 8),
        (True, 1, False, True, 16, 64, 128, 4), (False, 1, False, True, 16, 64, 128, 4),
        (True, 1, False, True, 128, 128, 64, 8), (True, 1, True, True, 128, 128, 128, 8),
        (True, 2, True, False, 128, 128, 128, 8), (False, 2, True, False, 128, 128, 128, 8),
        # BLOCK_M = 1: the CUDA-core decode blocks (MXFP4 words decoded by inline PTX)
        (True, 1, False, False, 1, 16, 256, 4), (False, 1, False, False, 1, 16, 256, 4),
        # MXFP4 tiles with the explicit decode (bf16 models' default: bf16 pairs by inline PTX,
        # one K-ordered tile)
        (True, 1, False, False, 16, 64, 128, 4), (False, 1, False, False, 16, 64, 128, 4),
        (True, 1, False, False, 64, 64, 128, 4), (True, 1, False, False, 128, 128, 64, 8),
    ]
    # the decode blocks again without alignment (config "pair_blocks": raw ids and the expert
    # mask read by the GEMM kernels)
    variants += [v + (3, True) for v in variants if v[4] == 1]
    # plain / fp8 weight tiles through TMA (config "tma_b")
    variants += [v + (3, False, True, True) for v in variants
                 if v[1] in (0, 2) and v[4] == 128]
    # stage 2 as a programmatic dependent launch of stage 1 (config "pdl"), decode blocks
    variants += [v[:8] + (3, True, True, False, True) for v in variants
                 if v[4] == 1 and len(v) > 9 and v[9]]
    # stage 1 zero-filling stage 2's atomic output (small outputs), decode blocks and a tile
    variants += [(True, 1, False, False, 1, 16, 256, 4, 3, True, True, False, True, True),
                 (True, 0, False, False, 128, 128, 64, 8, 3, False, True, False, False, True)]
    for v in variants:
        c = compile_variant(*v)
        ptx, ttgir = c.asm["ptx"], c.asm["ttgir"]
        ops = collections.Counter(re.findall(r"\b(wgmma\.mma_async|mma\.sync)", ptx))
        cp = len(re.findall(r"cp\.async\.c[ag]", ptx))
        waits = sorted(set(re.findall(r"pendings = (\d+)", ttgir)))
        f32 = " pair_blocks" if len(v) > 9 and v[9] else ""
        f32 += " tma_b" if len(v) > 11 and v[11] else ""
        gdc = re.findall(r"griddepcontrol\.(\w+)", ptx)
        f32 += f" pdl ({', '.join(gdc)})" if len(v) > 12 and v[12] else ""
        f32 += " zero_out" if len(v) > 13 and v[13] else ""
        tma = len(re.findall(r"cp\.async\.bulk\.tensor", ptx))
        print(f"stage{'1' if v[0] else '2'} b_fmt={v[1]} a_fp8={v[2]:d} dot_scaled={v[3]:d} "
              f"BM={v[4]} BN={v[5]} BK={v[6]}{f32}: smem {c.metadata.shared} B, cp.async {cp}, TMA {tma}, "
              f"{dict(ops)}, wgmma waits {waits}, sass {sass_digest(c.asm['cubin'])}")
        zero_out = len(v) > 13 and v[13]  # (its zero-fill loop would be taken for the K loop)
        if (v[4] == 1 or (v[1] == 1 and not v[2])) and not zero_out:  # one K step per weight
            n, mix = loop_sass(c.asm["cubin"])
            weights = (2 * v[5] if v[0] else v[5]) * v[6] // (32 * v[7])
            print(f"  loop: {n} SASS instructions for {weights} weights per thread "
                  f"({n / weights:.1f} per weight): {dict(mix.most_common(8))}")
    # MXFP4 decode blocks on the tensor cores (stage config "mma"): the main loop is the one
    # with the MMAs (the activation staging loops come first)
    # (the table's decode settings: BLOCK_N 16-64 at BLOCK_K 256; stage 2 at Mixtral's K split)
    for stage1, bn, bk, warps, K, split in ((True, 16, 256, 4, 4096, 1), (True, 32, 256, 4, 4096, 1),
                                            (False, 64, 256, 4, 2048, 1), (False, 32, 256, 4, 14336, 2),
                                            (True, 16, 512, 4, 4096, 1)):
        c = compile_decode_mma(stage1, bn, bk, warps, split=split, K=K)
        n, mix = loop_sass(c.asm["cubin"], must="HMMA")
        weights = 2 * 2 * (bn if stage1 else bn // 2) * bk // (32 * warps)  # two steps per loop
        print(f"decode_mma stage{'1' if stage1 else '2'} BN={bn} BK={bk} warps={warps} K={K}/{split}: "
              f"{registers(c.asm['cubin'])} registers, smem {c.metadata.shared} B, loop: {n} SASS "
              f"instructions for {weights} weights per thread ({n / weights:.2f} per weight): "
              f"{dict(mix.most_common(8))}, sass {sass_digest(c.asm['cubin'])}")
    # the same blocks with a TMA ring of 4 steps filled by a producer warp (stage setting "ring",
    # registers capped at 80 per thread: three programs of 4 + 4 warps per SM): the loop's
    # barriers should be the consumer warps' own (bar.sync 0, 128 per step), none CTA-wide
    # then the H200 table's ring settings (depth, register cap 64 / 48: 4 / 5 programs per SM)
    rings = ((True, 32, 256, 4, 4096, 1, 4, 80), (False, 32, 256, 4, 14336, 2, 4, 80),
             (True, 32, 256, 4, 4096, 1, 2, 64), (False, 32, 256, 4, 14336, 2, 2, 64),
             (False, 64, 256, 4, 2048, 1, 3, 64), (True, 32, 128, 4, 2880, 1, 2, 48),
             (False, 64, 256, 4, 768, 1, 2, 48))
    for stage1, bn, bk, warps, K, split, ring, cap in rings:
        c = compile_decode_mma(stage1, bn, bk, warps, split=split, K=K, ring=ring, maxnreg=cap)
        n, mix = loop_sass(c.asm["cubin"], must="HMMA")
        ptx = c.asm["ptx"]
        weights = 2 * (bn if stage1 else bn // 2) * bk // (32 * warps)  # one step per loop
        regs = re.findall(r"setmaxnreg\.(\w+)\.sync\.aligned\.u32\s+(\d+)", ptx)
        spills = cuobjdump(c.asm["cubin"], "-sass").count("STL")
        print(f"decode_mma ring={ring} maxnreg={cap} stage{'1' if stage1 else '2'} BN={bn} BK={bk} "
              f"warps={warps} K={K}/{split}: setmaxnreg {sorted(set(regs))}, {spills} spill "
              f"stores, smem {c.metadata.shared} B, "
              f"TMA copies {ptx.count('cp.async.bulk.tensor')}, loop: {n} SASS instructions for "
              f"{weights} weights per thread ({n / weights:.2f} per weight): "
              f"{dict(mix.most_common(8))}, sass {sass_digest(c.asm['cubin'])}")

if __name__ == "__main__":
    main()
