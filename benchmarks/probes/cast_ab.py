"""Probe: the output cast after a pdl stage 2, the programmatic dependent `_cast_out` launch
against torch's cast, in alternating rounds (the two differ by ~1 us; one pass over the
variants, as decode_flags.py times them, cannot separate that from the drift between passes).

    python3 benchmarks/probes/cast_ab.py [--out DIR] [--rounds 6]

For the table's pdl entries at M = 1 (bf16 and mxfp4-w4a16; Qwen3-30B-A3B, gpt-oss-20b,
DeepSeek-V3): CUDA-graph replays over 3 input sets (median of 30) per round, the two variants
alternating, and the median over rounds of each.
"""
import argparse
import statistics

import torch
from _timing import save_rows  # noqa: E402 (this folder)

from moeprec.cli.bench import PATHS, SHAPES, _as_graphs, _median_ms, make_inputs, make_weights
from moeprec.cli.tune import KERNEL_PATH
from moeprec.kernels import fused_moe_triton as F
from moeprec.kernels.tuning import get_config

ap = argparse.ArgumentParser()
ap.add_argument("--out", default=None)
ap.add_argument("--rounds", type=int, default=6)
args = ap.parse_args()
device = torch.cuda.get_device_name()
pdl_cast = F._cast_out
variants = {"pdl cast": pdl_cast, "torch cast": lambda x, dtype: x.to(dtype)}
rows = []
for shape in ("qwen3-30b-a3b", "gpt-oss-20b", "deepseek-v3"):
    H, I, E, k = SHAPES[shape]  # noqa: E741
    for path in ("bf16", "mxfp4-w4a16"):
        quant, act = PATHS[path]
        cfg = get_config(KERNEL_PATH[path], 1, E, H, I, k, device)
        if not cfg.get("pdl", False):
            continue
        weights = make_weights(path, H, I, E)
        wkw = {n: t for n, t in weights.items() if n not in ("w1", "w2")}
        fns = [lambda a=a: F.fused_moe_triton_impl(a[0], weights["w1"], weights["w2"], a[1], a[2],
                                                   quant=quant, act_dtype=act, **wkw)
               for a in make_inputs(1, H, E, k, 3, seed=13)]
        graphs = {}
        for name, cast in variants.items():  # the cast is looked up when the graph is captured
            F._cast_out = cast
            graphs[name] = _as_graphs(fns)
        F._cast_out = pdl_cast
        times = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, g in graphs.items():
                times[name].append(_median_ms(g, 30) * 1e3)
        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"{shape:<14}{path:<13}M=1  " + "  ".join(
            f"{n} {med[n]:6.1f} us ({min(t):.1f}-{max(t):.1f})" for n, t in times.items())
            + f"  torch / pdl {med['torch cast'] / med['pdl cast']:.3f}", flush=True)
        rows.append({"shape": shape, "path": path, "M": 1, "times_us": times, "median_us": med})
        del weights
        torch.cuda.empty_cache()
save_rows(args.out, "cast_ab.json", rows)
