"""Probe: the per-token fp8 quantizer on the fused MoE path's row shapes, one pass against two.

    python3 benchmarks/probes/quant_rows.py [--out DIR]

For each bench shape at M = 16384: the x rows [M, H] and the z rows [M * k, I] that the fp8 path
quantizes, timed (CUDA events, median of 20) with the quantizer's widest one-pass group at its
default and at 16384 columns (Mixtral's z rows, 14336 wide, take two passes at the default).
GB/s counts the bf16 read, the fp8 write and the scales.
"""
import argparse

import torch
from _timing import save_rows  # noqa: E402 (this folder)

from moeprec.cli.bench import SHAPES
from moeprec.kernels import quantize as Q

ap = argparse.ArgumentParser()
ap.add_argument("--out", default=None)
ap.add_argument("--M", type=int, default=16384)
args = ap.parse_args()


def median_us(fn, reps=20):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return sorted(times)[reps // 2]


rows = []
default_group = Q.LAUNCH["fp8_max_group"]
for shape, (H, I, E, k) in SHAPES.items():  # noqa: E741
    for name, (r, c) in (("x", (args.M, H)), ("z", (args.M * k, I))):
        x = torch.randn(r, c, device="cuda", dtype=torch.bfloat16)
        ref = None
        for group in (default_group, 16384):
            Q.LAUNCH["fp8_max_group"] = group
            us = median_us(lambda: Q.quantize_fp8_triton(x, "per_token"))
            q, s = Q.quantize_fp8_triton(x, "per_token")
            same = "-" if ref is None else str(torch.equal(q.view(torch.uint8), ref[0].view(torch.uint8))
                                               and torch.equal(s, ref[1]))
            ref = ref or (q, s)
            gbs = r * c * 3 / us / 1e3
            print(f"{shape:<14}{name} [{r}, {c}]  max group {group:>5}: {us:8.1f} us  {gbs:7.0f} GB/s  same {same}",
                  flush=True)
            rows.append({"shape": shape, "rows": name, "R": r, "K": c, "max_group": group, "us": us,
                         "GBps": gbs, "same": same})
        Q.LAUNCH["fp8_max_group"] = default_group
        del x
save_rows(args.out, "quant_rows.json", rows)
