"""Probe: MXFP4 decode blocks on the tensor cores (Gluon, stage config "mma") against the
CUDA-core blocks, bf16 beside them, and variants of the Gluon blocks' settings.

    python3 benchmarks/probes/decode_mma.py [--M 1,4,16] [--shapes ...] [--variants JSON] [--out DIR]

For each bench shape and M: the bf16 table config, the w4a16 table config with "mma" off in
both stages ("cores") and as it is ("table"), then each variant: the table's w4a16 config with
settings laid over both stages (or {"s1": {...}, "s2": {...}} per stage; "reps" sets the
activation staging's pieces per thread, `_decode_mma._STAGING_REPS`; "scale_bytes" reads the
scales bytewise where they could be read as words). Each is a CUDA-graph
replay over 3 input sets (median of 30). "same" is the largest difference between a variant's
output and the CUDA-core blocks' relative to their max (fp32 sums in another order; z rounded
to bf16 in between).
"""
import argparse
import json

import torch
from _timing import rel_diff, save_rows  # noqa: E402 (this folder)

from moeprec.cli.bench import PATHS, SHAPES, _as_graphs, _median_ms, make_inputs, make_weights
from moeprec.cli.tune import KERNEL_PATH
from moeprec.kernels import _decode_mma
from moeprec.kernels.fused_moe_triton import fused_moe_triton_impl
from moeprec.kernels.tuning import fix_config, get_config

VARIANTS = {"reps4": {"reps": 4}, "bytes": {"scale_bytes": True}, "bk512": {"BLOCK_K": 512},
            "bn2x": {"s1": {"BLOCK_N": 32}, "s2": {"BLOCK_N": 64}},
            "bn2x_bk512": {"BLOCK_K": 512, "s1": {"BLOCK_N": 32}, "s2": {"BLOCK_N": 64}}}
ap = argparse.ArgumentParser()
ap.add_argument("--out", default=None)
ap.add_argument("--M", default="1,4,16")
ap.add_argument("--shapes", default=",".join(SHAPES))
ap.add_argument("--variants", default=json.dumps(VARIANTS),
                help="JSON {name: settings}; settings over both stages or per stage (s1 / s2)")
args = ap.parse_args()
variants = json.loads(args.variants)
device = torch.cuda.get_device_name()
default_reps, scale_words = _decode_mma._STAGING_REPS, _decode_mma.scale_words
rows = []
names = ["bf16", "cores", "table", *variants]
print(f"{'shape':<14}{'M':>4}" + "".join(f"{n:>11}" for n in names) + "   (us; x = cores / it)",
      flush=True)


def with_settings(cfg, over):
    over = dict(over)
    over.pop("reps", None)
    over.pop("scale_bytes", None)
    per = {st: over.pop(st, {}) for st in ("s1", "s2")}
    return dict(cfg, **{st: dict(cfg[st], **over, **per[st]) for st in ("s1", "s2")})


for shape in args.shapes.split(","):
    H, I, E, k = SHAPES[shape]  # noqa: E741
    weights = {p: make_weights(p, H, I, E) for p in ("bf16", "mxfp4-w4a16")}
    for M in (int(m) for m in args.M.split(",")):
        inputs = make_inputs(M, H, E, k, 3, seed=11)
        us, outs, cfgs = {}, {}, {}
        for name in names:
            path = "bf16" if name == "bf16" else "mxfp4-w4a16"
            quant, act = PATHS[path]
            kpath = KERNEL_PATH[path]
            cfg = dict(get_config(kpath, M, E, H, I, k, device))
            over = {"cores": {"mma": False}}.get(name, variants.get(name, {}))
            if path != "bf16" and (cfg["BLOCK_M"] == 1 or name == "cores"):
                cfg = with_settings(cfg, over)
            cfg = fix_config(cfg, kpath)
            _decode_mma._STAGING_REPS = over.get("reps", default_reps)
            _decode_mma.scale_words = (lambda b_scale, K: False) if over.get("scale_bytes") \
                else scale_words
            w = weights[path]
            wkw = {n: t for n, t in w.items() if n not in ("w1", "w2")}
            fns = [lambda a=a, c=cfg: fused_moe_triton_impl(
                a[0], w["w1"], w["w2"], a[1], a[2], quant=quant, act_dtype=act, config=c, **wkw)
                for a in inputs]
            outs[name] = fns[0]()
            us[name] = _median_ms(_as_graphs(fns), 30) * 1e3
            cfgs[name] = cfg
            _decode_mma._STAGING_REPS = default_reps
            _decode_mma.scale_words = scale_words
        same = {n: rel_diff(outs[n], outs["cores"]) for n in names[2:]}
        print(f"{shape:<14}{M:>4}" + "".join(f"{us[n]:11.1f}" for n in names), flush=True)
        print(f"{'':<14}{'x':>4}{'':>22}" + "".join(f"{us['cores'] / us[n]:11.2f}" for n in names[2:])
              + f"   worst same {max(same.values()):.1e}", flush=True)
        rows.append({"shape": shape, "M": M, "us": us, "same": same, "configs": cfgs,
                     "one_pair_blocks": cfgs["table"]["BLOCK_M"] == 1})
    del weights
    torch.cuda.empty_cache()
save_rows(args.out, "decode_mma.json", rows)
