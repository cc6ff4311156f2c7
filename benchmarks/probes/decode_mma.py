"""Probe: MXFP4 decode blocks on the tensor cores (Gluon, stage config "mma") against the
CUDA-core blocks, and bf16 beside them.

    python3 benchmarks/probes/decode_mma.py [--M 1,4,16] [--out DIR]

For each bench shape and M: the w4a16 table config as it is ("mma" on where it fits) and with
"mma" off in both stages, and the bf16 table config; each a CUDA-graph replay over 3 input sets
(median of 30). "same" is the largest difference between the two w4a16 outputs relative to
their max (fp32 sums in another order; z rounded to bf16 in between).
"""
import argparse
import json

import torch
from _timing import rel_diff, save_rows  # noqa: E402 (this folder)

from moeprec.cli.bench import PATHS, SHAPES, _as_graphs, _median_ms, make_inputs, make_weights
from moeprec.cli.tune import KERNEL_PATH
from moeprec.kernels.fused_moe_triton import fused_moe_triton_impl
from moeprec.kernels.tuning import fix_config, get_config

ap = argparse.ArgumentParser()
ap.add_argument("--out", default=None)
ap.add_argument("--M", default="1,4,16")
ap.add_argument("--shapes", default=",".join(SHAPES))
ap.add_argument("--mma-stage", default="{}", help="JSON settings over both stages of the mma "
                "variant, e.g. '{\"BLOCK_N\": 32}' (stage 2 takes twice the BLOCK_N)")
args = ap.parse_args()
device = torch.cuda.get_device_name()
rows = []
print(f"{'shape':<14}{'M':>4}  {'bf16 us':>8}{'cuda-core':>10}{'mma us':>8}{'x cores':>8}{'x bf16':>8}  same",
      flush=True)
for shape in args.shapes.split(","):
    H, I, E, k = SHAPES[shape]  # noqa: E741
    weights = {p: make_weights(p, H, I, E) for p in ("bf16", "mxfp4-w4a16")}
    for M in (int(m) for m in args.M.split(",")):
        inputs = make_inputs(M, H, E, k, 3, seed=11)
        us, outs = {}, {}
        for name, path, mma in (("bf16", "bf16", None), ("cores", "mxfp4-w4a16", False),
                                ("mma", "mxfp4-w4a16", True)):
            quant, act = PATHS[path]
            kpath = KERNEL_PATH[path]
            cfg = dict(get_config(kpath, M, E, H, I, k, device))
            if mma is not None:
                cfg = {kk: (dict(v, mma=mma) if kk in ("s1", "s2") else v) for kk, v in cfg.items()}
            if mma and cfg["BLOCK_M"] == 1:
                over = json.loads(args.mma_stage)
                cfg["s1"] = dict(cfg["s1"], **over)
                cfg["s2"] = dict(cfg["s2"], **over)
                if "BLOCK_N" in over:
                    cfg["s2"]["BLOCK_N"] = 2 * over["BLOCK_N"]
            cfg = fix_config(cfg, kpath)
            w = weights[path]
            wkw = {n: t for n, t in w.items() if n not in ("w1", "w2")}
            fns = [lambda a=a, c=cfg: fused_moe_triton_impl(
                a[0], w["w1"], w["w2"], a[1], a[2], quant=quant, act_dtype=act, config=c, **wkw)
                for a in inputs]
            outs[name] = fns[0]()
            us[name] = _median_ms(_as_graphs(fns), 30) * 1e3
        same = rel_diff(outs["mma"], outs["cores"])
        print(f"{shape:<14}{M:>4}  {us['bf16']:8.1f}{us['cores']:10.1f}{us['mma']:8.1f}"
              f"{us['cores'] / us['mma']:8.2f}{us['bf16'] / us['mma']:8.2f}  rel {same:.1e}", flush=True)
        rows.append({"shape": shape, "M": M, "us": us, "same": same,
                     "one_pair_blocks": cfg["BLOCK_M"] == 1})
    del weights
    torch.cuda.empty_cache()
save_rows(args.out, "decode_mma.json", rows)
