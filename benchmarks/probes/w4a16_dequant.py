"""Probe: MXFP4 w4a16 at prefill sizes, in-kernel decode (MXFP4 tiles) against weights decoded
to bf16 first ("dequant": a chunk of experts at a time, then the bf16 kernels), next to bf16.

    python3 benchmarks/probes/w4a16_dequant.py --out OUT [--shapes ...] [--M 256,1024,...]

Prints one line per (shape, M) and writes OUT/w4a16_dequant.json. Times are CUDA-event medians
over rotated input sets (eager; the same rule as `moeprec bench` above M = 256).
"""
import argparse
import json
import os
import time

import torch

from moeprec.cli.bench import SHAPES, _median_ms, make_inputs, make_weights
from moeprec.formats.mxfp4 import dequantize_mxfp4
from moeprec.kernels.fused_moe_triton import fused_moe_triton_impl
from moeprec.kernels.tuning import get_config

p = argparse.ArgumentParser()
p.add_argument("--shapes", default=",".join(SHAPES))
p.add_argument("--M", default="256,1024,4096,16384")
p.add_argument("--reps", type=int, default=8)
p.add_argument("--sets", type=int, default=3)
p.add_argument("--out", default="out")
args = p.parse_args()
os.makedirs(args.out, exist_ok=True)
dev_name = torch.cuda.get_device_name()
rows = []
print(f"{'shape':<14}{'M':>6}{'bf16':>10}{'tiles':>10}{'dq(bf16)':>10}{'dq(w4)':>10}"
      f"{'decode':>9}{'tiles/dq':>9}{'maxdiff':>9}", flush=True)
for shape in args.shapes.split(","):
    H, I, E, k = SHAPES[shape]  # noqa: E741
    mx = make_weights("mxfp4-w4a16", H, I, E)
    bf = make_weights("bf16", H, I, E)
    wkw = {"w1_scale": mx["w1_scale"], "w2_scale": mx["w2_scale"]}
    # decoding every expert's weights once (what "dequant" adds per call)
    dec_ms = _median_ms([lambda: (dequantize_mxfp4(mx["w1"], mx["w1_scale"]),
                                  dequantize_mxfp4(mx["w2"], mx["w2_scale"]))], 5)
    torch.cuda.empty_cache()
    for M in map(int, args.M.split(",")):
        inputs = make_inputs(M, H, E, k, args.sets)
        c_bf = get_config("bf16", M, E, H, I, k, dev_name)
        c_w4 = get_config("w4a16", M, E, H, I, k, dev_name)
        cfgs = {"tiles": dict(c_w4, dequant=False), "dq_bf16": dict(c_bf, dequant=True),
                "dq_w4": dict(c_w4, dequant=True)}

        def mx_call(cfg, a):
            return fused_moe_triton_impl(a[0], mx["w1"], mx["w2"], a[1], a[2], quant="mxfp4",
                                         config=cfg, **wkw)

        row = {"shape": shape, "M": M, "device": dev_name, "decode_all_ms": dec_ms,
               "configs": cfgs}
        row["bf16_ms"] = _median_ms([lambda a=a: fused_moe_triton_impl(
            a[0], bf["w1"], bf["w2"], a[1], a[2], config=c_bf) for a in inputs], args.reps)
        for name, cfg in cfgs.items():
            row[name + "_ms"] = _median_ms([lambda a=a, c=cfg: mx_call(c, a) for a in inputs],
                                           args.reps)
        ref = mx_call(cfgs["tiles"], inputs[0]).float()
        got = mx_call(cfgs["dq_bf16"], inputs[0]).float()
        row["max_abs_diff"] = (ref - got).abs().max().item()
        row["ref_absmax"] = ref.abs().max().item()
        rows.append(row)
        best_dq = min(row["dq_bf16_ms"], row["dq_w4_ms"])
        print(f"{shape:<14}{M:>6}{row['bf16_ms'] * 1e3:>10.1f}{row['tiles_ms'] * 1e3:>10.1f}"
              f"{row['dq_bf16_ms'] * 1e3:>10.1f}{row['dq_w4_ms'] * 1e3:>10.1f}{dec_ms * 1e3:>9.1f}"
              f"{row['tiles_ms'] / best_dq:>9.2f}{row['max_abs_diff']:>9.2g}", flush=True)
        del inputs
    del mx, bf
    torch.cuda.empty_cache()
with open(os.path.join(args.out, "w4a16_dequant.json"), "w") as f:
    json.dump({"device": dev_name, "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), "rows": rows}, f, indent=1)
