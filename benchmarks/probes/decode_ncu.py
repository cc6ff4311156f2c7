"""Probe: a few fused-MoE calls with the table's config, for Nsight Compute to read counters of.

    ncu --clock-control none -k regex:_moe_gemm --launch-skip 4 --launch-count 2 \
        --section SpeedOfLight --section WarpStateStats ... \
        python3 benchmarks/probes/decode_ncu.py --shape mixtral-8x7b --path mxfp4-w4a16 --M 1

Runs --calls eager calls (the first ones compile; skip their launches in ncu) on fresh random
inputs, and prints the configuration used, so that the counters can be read against it: is a
decode stage bound by DRAM bytes, by instruction issue, or by loads in flight?
"""
import argparse
import json

import torch

from moeprec.cli.bench import PATHS, SHAPES, make_inputs, make_weights
from moeprec.cli.tune import KERNEL_PATH
from moeprec.kernels.fused_moe_triton import fused_moe_triton_impl
from moeprec.kernels.tuning import fix_config, get_config

ap = argparse.ArgumentParser()
ap.add_argument("--shape", default="mixtral-8x7b", choices=sorted(SHAPES))
ap.add_argument("--path", default="mxfp4-w4a16", choices=("bf16", "mxfp4-w4a16"))
ap.add_argument("--M", type=int, default=1)
ap.add_argument("--calls", type=int, default=3)
ap.add_argument("--mma", action="store_true", help="stage config \"mma\" on (tensor-core decode blocks)")
ap.add_argument("--stage", default="{}", help='JSON merged into both stages, e.g. \'{"ring": 4}\'')
args = ap.parse_args()
H, I, E, k = SHAPES[args.shape]  # noqa: E741
quant, act = PATHS[args.path]
weights = make_weights(args.path, H, I, E)
wkw = {n: t for n, t in weights.items() if n not in ("w1", "w2")}
cfg = get_config(KERNEL_PATH[args.path], args.M, E, H, I, k, torch.cuda.get_device_name())
extra = dict(json.loads(args.stage), **({"mma": True} if args.mma else {}))
if extra:
    cfg = fix_config(dict(cfg, s1={**cfg["s1"], **extra}, s2={**cfg["s2"], **extra}),
                     KERNEL_PATH[args.path])
print(args.shape, args.path, "M", args.M, "config", cfg, flush=True)
for x, topk_w, topk_ids in make_inputs(args.M, H, E, k, args.calls, seed=5):
    fused_moe_triton_impl(x, weights["w1"], weights["w2"], topk_w, topk_ids, quant=quant, act_dtype=act,
                          config=cfg, **wkw)
torch.cuda.synchronize()
