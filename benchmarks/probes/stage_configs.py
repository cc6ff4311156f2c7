"""Probe: each GEMM stage of a bf16 prefill call alone, over a wide sweep of tile settings.

    python3 benchmarks/probes/stage_configs.py [--out DIR] [--points qwen3-30b-a3b:4096,...]

For each (shape, M): the alignment and stage 1 run once with the table's config; then stage 1
and stage 2 are timed alone (CUDA graph of one launch, `_timing.graph_us`) for every candidate
(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), stage 2 storing slot rows in fp32 (the
op's non-atomic combine) and, for the best few, in bf16 (half the epilogue bytes: prices the
epilogue, which a non-persistent tile does not overlap with its main loop). Each line gives the
compiled kernel's registers, spills and shared memory, so occupancy (programs per SM) can be
read off. Tells whether the tuner's candidate list misses settings that pay.
"""
import argparse
import itertools

import torch
from _timing import graph_us, save_rows  # noqa: E402 (this folder)

from moeprec.cli.bench import SHAPES, make_inputs, make_weights
from moeprec.kernels import fused_moe_triton as F
from moeprec.kernels.tuning import get_config

ap = argparse.ArgumentParser()
ap.add_argument("--out", default=None)
ap.add_argument("--points", default="qwen3-30b-a3b:4096,qwen3-30b-a3b:16384,gpt-oss-20b:4096,"
                                    "deepseek-v3:16384")
ap.add_argument("--block-m", default="64,128")
args = ap.parse_args()
device = torch.cuda.get_device_name()
SMEM = torch.cuda.get_device_properties(0).shared_memory_per_multiprocessor

TILES = [(bn, bk, w, s) for bn, bk, w, s in itertools.product((64, 128, 256), (32, 64, 128), (4, 8),
                                                              (2, 3, 4, 5))
         if not (bn == 256 and w == 4) and not (bk == 128 and s == 5) and not (bk == 32 and s == 2)]


def launch(stage, x, w1, w2, inter, out, sorted_ids, expert_ids, tw,  # noqa: E741
           M, k, E, H, I, bm, st):
    common = dict(sorted_ids=sorted_ids, expert_ids=expert_ids, topk_w=tw, num_slots=M * k,
                  top_k=k, interleaved=False, b_fmt=0, a_fp8=False, a_quant=False, act=0,
                  quant_out=False, compute_dtype=F._compute_dtype(torch.bfloat16), alpha=1.702,
                  limit=7.0, block_m=bm, st=st, b_scale=None, bias=None, c_scale=None,
                  a_scale=None)
    if stage == "s1":
        return F._launch_gemm(a=x, b=w1, c=inter, N=I, Kdim=H, stage1=True, mul_weight=False,
                              atomic_out=False, **common)
    return F._launch_gemm(a=inter, b=w2, c=out, N=H, Kdim=I, stage1=False, mul_weight=True,
                          atomic_out=False, **common)


def compiled_info(kern):
    """(registers per thread, spilled registers, shared memory bytes) of a compiled kernel."""
    return kern.n_regs, kern.n_spills, kern.metadata.shared


rows = []
for point in args.points.split(","):
    shape, M = point.split(":")
    M = int(M)
    H, I, E, k = SHAPES[shape]  # noqa: E741
    S = M * k
    weights = make_weights("bf16", H, I, E)
    w1, w2 = weights["w1"], weights["w2"]
    x, tw, ti = make_inputs(M, H, E, k, 1, seed=3)[0]
    tw = tw.reshape(-1).contiguous()
    table = get_config("bf16", M, E, H, I, k, device)
    flops = {"s1": 2.0 * S * H * 2 * I, "s2": 2.0 * S * I * H}
    print(f"\n{shape} M={M}: table {table}", flush=True)
    for bm in (int(b) for b in args.block_m.split(",")):
        sorted_ids, expert_ids = F.align_blocks(ti, E, bm, None)
        inter = torch.empty(S, I, dtype=torch.bfloat16, device="cuda")
        outs = {torch.float32: torch.empty(S, H, dtype=torch.float32, device="cuda"),
                torch.bfloat16: torch.empty(S, H, dtype=torch.bfloat16, device="cuda")}
        launch("s1", x, w1, w2, inter, None, sorted_ids, expert_ids, tw, M, k, E, H, I, bm,
               table["s1"])
        for stage in ("s1", "s2"):
            res = []
            for bn, bk, w, s in TILES:
                st = {"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8 if bm >= 128 else 4,
                      "num_warps": w, "num_stages": s}
                f = (lambda st=st: launch(stage, x, w1, w2, inter, outs[torch.float32], sorted_ids,
                                          expert_ids, tw, M, k, E, H, I, bm, st))
                try:
                    us = graph_us(f, n=10)
                    regs, spills, shared = compiled_info(f())
                except Exception as exc:  # noqa: BLE001 (out of shared memory etc.)
                    print(f"  {stage} bm{bm} {bn}x{bk} w{w} s{s}: failed {type(exc).__name__}",
                          flush=True)
                    continue
                occ = min(SMEM // max(shared, 1), 65536 // max(regs * 32 * w, 1))
                res.append((us, st, regs, spills, shared, occ))
                rows.append({"shape": shape, "M": M, "stage": stage, "BLOCK_M": bm, "st": st,
                             "us": us, "regs": regs, "spills": spills, "shared": shared,
                             "per_sm": occ, "rows": "fp32"})
            res.sort(key=lambda r: r[0])
            print(f" {stage} BLOCK_M {bm}: best of {len(res)}", flush=True)
            for us, st, regs, spills, shared, occ in res[:6]:
                print(f"  {us:9.1f} us {flops[stage] / us / 1e6:6.1f} TFLOP/s  {st['BLOCK_N']}x"
                      f"{st['BLOCK_K']} w{st['num_warps']} s{st['num_stages']}  regs {regs} "
                      f"spills {spills} smem {shared // 1024} KiB  {occ}/SM", flush=True)
            if stage == "s2":
                for us, st, *_ in res[:3]:
                    f = (lambda st=st: launch(stage, x, w1, w2, inter, outs[torch.bfloat16],
                                              sorted_ids, expert_ids, tw, M, k, E, H, I, bm, st))
                    us16 = graph_us(f, n=10)
                    print(f"  bf16 rows {st['BLOCK_N']}x{st['BLOCK_K']} w{st['num_warps']} "
                          f"s{st['num_stages']}: {us:.1f} -> {us16:.1f} us", flush=True)
                    rows.append({"shape": shape, "M": M, "stage": stage, "BLOCK_M": bm,
                                 "st": st, "us": us16, "rows": "bf16"})
        del inter, outs
    del weights, w1, w2
    torch.cuda.empty_cache()
    save_rows(args.out, "stage_configs.json", rows)
