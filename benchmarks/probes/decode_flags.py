"""Probe: the decode blocks' "pair_blocks" switch against the tuned decode configs.

    python3 benchmarks/probes/decode_flags.py [--out DIR]

For each shape, path (bf16, mxfp4-w4a16) and M in 1, 4, 16, 64: the configuration the op uses
(tuning.get_config on this device) and, where it runs one-pair blocks (BLOCK_M = 1), the same
with pair_blocks switched, and each atomic-combine variant (stage 2 not split) with slot rows
and a per-token sum instead ("+ slot rows"), the table's config with "pdl" switched, and
(atomic entries) stage 2's fp32 output zero-filled by a memset launch against by stage 1's
programs (`fused_moe_triton.ZERO_IN_STAGE1_MAX_BYTES`; before 2026-12-03 23:00 UTC a pdl
entry took the memset and the probe timed stage 1's zero fill there), and (pdl entries) the
output cast by torch against the programmatic dependent cast launch (`_cast_out`). bf16 at
M <= 16 with tensor-core tiles in its entry also tries one-pair blocks with the w4a16 entry's
stage settings. Each variant is a CUDA-graph replay over
3 input sets (median of 30); "same" is the largest difference to the first variant's output
relative to its max (the stage-2 atomics add in a different order, so not bit for bit).
The 2026-12-03 run (benchmarks/results/README.md) also timed "f32_act", removed since.
"""
import argparse

import torch
from _timing import rel_diff, save_rows  # noqa: E402 (this folder)

from moeprec.cli.bench import PATHS, SHAPES, _as_graphs, _median_ms, make_inputs, make_weights
from moeprec.cli.tune import KERNEL_PATH
from moeprec.kernels import fused_moe_triton as F
from moeprec.kernels.fused_moe_triton import fused_moe_triton_impl
from moeprec.kernels.tuning import fix_config, get_config

ap = argparse.ArgumentParser()
ap.add_argument("--out", default=None)
ap.add_argument("--M", default="1,4,16,64")
args = ap.parse_args()
device = torch.cuda.get_device_name()
rows = []
print(f"{'shape':<14}{'path':<13}{'M':>4}  {'variant':<34}{'us':>8}{'x base':>8}  same", flush=True)
for shape, (H, I, E, k) in SHAPES.items():  # noqa: E741
    for path in ("bf16", "mxfp4-w4a16"):
        quant, act = PATHS[path]
        kpath = KERNEL_PATH[path]
        weights = make_weights(path, H, I, E)
        wkw = {n: t for n, t in weights.items() if n not in ("w1", "w2")}
        for M in (int(m) for m in args.M.split(",")):
            inputs = make_inputs(M, H, E, k, 3, seed=11)
            base = get_config(kpath, M, E, H, I, k, device)
            variants = {"table": base}
            one_pair = dict(base) if base["BLOCK_M"] == 1 else None
            if one_pair is None and kpath == "bf16" and M <= 16:
                w4 = get_config("w4a16", M, E, H, I, k, device)
                if w4["BLOCK_M"] == 1:
                    one_pair = {kk: v for kk, v in w4.items() if kk != "dequant"}
                    variants["one-pair (w4a16 stages)"] = one_pair
            if one_pair is not None:
                flip = not one_pair.get("pair_blocks", True)
                variants[("one-pair " if one_pair is not base else "") + f"pair_blocks={flip}"] = \
                    dict(one_pair, pair_blocks=flip)
            # stage 2 storing slot rows and a per-token sum (3 launches) against the fp32
            # atomics, their zero fill and the cast (4 launches)
            for name, cfg in list(variants.items()):
                if cfg.get("atomic", True) and cfg["s2"].get("split_k", 1) == 1:
                    variants[f"{name} + slot rows"] = dict(cfg, atomic=False)
            # stage 2 as a programmatic dependent launch of stage 1
            variants[f"table pdl={not base.get('pdl', False)}"] = dict(base, pdl=not base.get("pdl", False))
            # module switches, not config keys ("switches" holds them): the atomic output
            # zero-filled by a memset launch instead of stage 1's programs; with pdl, the
            # output cast by torch instead of the programmatic dependent `_cast_out`
            if base.get("atomic", True):
                variants["table, zero fill by memset"] = dict(base, switches=dict(
                    ZERO_IN_STAGE1_MAX_BYTES=0))
                if base.get("pdl", False):
                    variants["table, cast by torch"] = dict(base, switches=dict(
                        _cast_out=lambda x, dtype: x.to(dtype)))
            ref_out, ref_us = None, None
            for name, cfg in variants.items():
                switches = cfg.get("switches", {})
                cfg = fix_config({kk: v for kk, v in cfg.items() if kk != "switches"}, kpath)
                fns = [lambda a=a, c=cfg: fused_moe_triton_impl(
                    a[0], weights["w1"], weights["w2"], a[1], a[2], quant=quant, act_dtype=act,
                    config=c, **wkw) for a in inputs]
                saved = {n: getattr(F, n) for n in switches}
                for n, v in switches.items():  # read at call time: eager call and capture
                    setattr(F, n, v)
                out = fns[0]()
                us = _median_ms(_as_graphs(fns), 30) * 1e3
                for n, v in saved.items():
                    setattr(F, n, v)
                if ref_out is None:
                    ref_out, ref_us, same = out, us, "-"
                else:
                    same = f"rel {rel_diff(out, ref_out):.1e}"
                print(f"{shape:<14}{path:<13}{M:>4}  {name:<34}{us:8.1f}{ref_us / us:8.2f}  {same}", flush=True)
                rows.append({"shape": shape, "path": path, "M": M, "variant": name, "us": us,
                             "config": cfg, "switches": {n: repr(v) for n, v in switches.items()},
                             "same": same})
        del weights
        torch.cuda.empty_cache()
save_rows(args.out, "decode_flags.json", rows)
