"""Probe: the MXFP4 tensor-core tiles, tl.dot_scaled against the explicit bf16-pair decode.

    python3 benchmarks/probes/mxfp4_tiles.py [--out DIR] [--M 16,64,256,1024]

For each bench shape and M: mxfp4-w4a16 with the launch settings the op picks on this device
(tensor-core tiles; where that is a one-pair decode config, the bf16 heuristic's tiles), once
with both stages' MXFP4 operand through `tl.dot_scaled` and once through the explicit decode
(inline PTX to bf16 pairs, one K-ordered tile; the default), and the op's own choice
("table", which may decode the weights first). Median time over 3 input sets (CUDA graphs up to
M = 256, eager above), and the largest output difference to the dot_scaled variant relative to
its max (the weights are the same bits; only summation order differs). The 2026-12-03 02:47
run also timed the explicit decode's first version (decoded halves against even and odd A
columns, "mx_join": false), removed since.
"""
import argparse

import torch
from _timing import rel_diff, save_rows  # noqa: E402 (this folder)

from moeprec.cli.bench import SHAPES, _as_graphs, _median_ms, make_inputs, make_weights
from moeprec.kernels.fused_moe_triton import fused_moe_triton_impl
from moeprec.kernels.tuning import default_config, fix_config, get_config

ap = argparse.ArgumentParser()
ap.add_argument("--out", default=None)
ap.add_argument("--M", default="16,64,256,1024")
ap.add_argument("--reps", type=int, default=20)
args = ap.parse_args()
device = torch.cuda.get_device_name()
rows = []
print(f"{'shape':<14}{'M':>6}  {'variant':<12}{'us':>10}{'x dot_scaled':>14}  diff", flush=True)
for shape, (H, I, E, k) in SHAPES.items():  # noqa: E741
    weights = make_weights("mxfp4-w4a16", H, I, E)
    wkw = {n: t for n, t in weights.items() if n not in ("w1", "w2")}
    for M in (int(m) for m in args.M.split(",")):
        inputs = make_inputs(M, H, E, k, 3, seed=5)
        table = get_config("w4a16", M, E, H, I, k, device)
        tiles = dict(table, dequant=False)
        if tiles["BLOCK_M"] == 1:
            tiles = default_config("bf16", M, E, H, I, k)
        variants = {
            "dot_scaled": fix_config(dict(tiles, dequant=False, s1=dict(tiles["s1"], dot_scaled=True),
                                          s2=dict(tiles["s2"], dot_scaled=True)), "w4a16"),
            "explicit": fix_config(dict(tiles, dequant=False, s1=dict(tiles["s1"], dot_scaled=False),
                                        s2=dict(tiles["s2"], dot_scaled=False)), "w4a16"),
            "table": table,
        }
        ref, ref_us = None, None
        for name, cfg in variants.items():
            fns = [lambda a=a, c=cfg: fused_moe_triton_impl(
                a[0], weights["w1"], weights["w2"], a[1], a[2], quant="mxfp4", config=c, **wkw)
                for a in inputs]
            out = fns[0]()
            us = _median_ms(_as_graphs(fns) if M <= 256 else fns, args.reps) * 1e3
            if ref is None:
                ref, ref_us, diff = out, us, "-"
            else:
                diff = f"{rel_diff(out, ref):.1e}"
            print(f"{shape:<14}{M:>6}  {name:<12}{us:10.1f}{ref_us / us:14.2f}  {diff}", flush=True)
            rows.append({"shape": shape, "M": M, "variant": name, "us": us, "config": cfg, "diff": diff})
    del weights
    torch.cuda.empty_cache()
save_rows(args.out, "mxfp4_tiles.json", rows)
