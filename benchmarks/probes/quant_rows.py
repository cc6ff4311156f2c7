"""Probe: fp8 per-token quantization of the fused MoE path's rows, its own kernel against the
public quantizer over launch settings.

    python3 benchmarks/probes/quant_rows.py [--out DIR] [--M 16384] [--own-only]

For each bench shape: the x rows [M, H] and the z rows [M * k, I] that the fp8 path quantizes.
GPU time per call (captured in a CUDA graph, mean of 20 replays): the path's own kernel (`fused_moe_triton._quant_fp8_rows`,
one 4-warp program per row) and `quantize_fp8_triton(x, "per_token")` with each setting of
`moeprec.kernels.quantize.LAUNCH` in SWEEP (elements per program, warps; "max_group" 16384 reads
rows up to that width in one pass). "same" compares bytes and scales with the path's kernel:
false on the GPU by design, the public quantizer divides as torch does (IEEE) and the path's
kernel with the faster approximate division. GB/s counts the bf16 read and the fp8 write. The
15:01 and 16:25 UTC runs of 2026-12-03 (results README) timed each call between CUDA events,
host launch time included.
"""
import argparse

import torch
from _timing import graph_us, save_rows  # noqa: E402 (this folder)

from moeprec.cli.bench import SHAPES
from moeprec.kernels import quantize as Q
from moeprec.kernels.fused_moe_triton import _quant_fp8_rows

SWEEP = [{}, {"fp8_max_group": 16384}] + [
    {"fp8_tile": t, "fp8_warps": w} for t in (1024, 2048, 4096, 8192) for w in (4, 8, 16)]

ap = argparse.ArgumentParser()
ap.add_argument("--out", default=None)
ap.add_argument("--M", type=int, default=16384)
ap.add_argument("--own-only", action="store_true", help="the fused path's kernel alone")
args = ap.parse_args()

rows = []
default = dict(Q.LAUNCH)
for shape, (H, I, E, k) in SHAPES.items():  # noqa: E741
    for name, (r, c) in (("x", (args.M, H)), ("z", (args.M * k, I))):
        x = torch.randn(r, c, device="cuda", dtype=torch.bfloat16)
        ref = _quant_fp8_rows(x)
        variants = [("fused path kernel", lambda: _quant_fp8_rows(x), None)]
        if not args.own_only:
            variants += [(f"public {opt or 'default'}", lambda: Q.quantize_fp8_triton(x, "per_token"), opt)
                         for opt in SWEEP]
        for label, fn, opt in variants:
            Q.LAUNCH.clear()
            Q.LAUNCH.update(default, **(opt or {}))
            us = graph_us(fn)
            q, s = fn()
            same = (torch.equal(q.view(torch.uint8), ref[0].view(torch.uint8))
                    and torch.equal(s.reshape(-1), ref[1]))
            gbs = r * c * 3 / us / 1e3
            print(f"{shape:<14}{name} [{r}, {c}]  {label:<40}{us:8.1f} us {gbs:7.0f} GB/s  same {same}",
                  flush=True)
            rows.append({"shape": shape, "rows": name, "R": r, "K": c, "variant": label,
                         "launch": opt, "us": us, "GBps": gbs, "same": same})
        Q.LAUNCH.clear()
        Q.LAUNCH.update(default)
        del x
save_rows(args.out, "quant_rows.json", rows)
