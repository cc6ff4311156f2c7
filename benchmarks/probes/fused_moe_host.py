"""Probe: host (CPU) time of one eager `fused_moe` call against its GPU time, by piece.

    python3 benchmarks/probes/fused_moe_host.py [--shape qwen3-30b-a3b] [--M 1024,4096]

Host time: wall time of N back-to-back calls, stopped before the final sync (when it exceeds
the GPU time, eager timing measures the CPU, not the kernels). GPU time: the same call replayed
from a CUDA graph (no host work at all).
"""
import argparse

import torch
from _timing import graph_us, host_us  # noqa: E402 (this folder)

from moeprec.cli.bench import SHAPES, make_inputs, make_weights
from moeprec.fused_moe_op import _validate, fused_moe
from moeprec.kernels.fused_moe_triton import align_blocks, fused_moe_triton_impl
from moeprec.kernels.tuning import get_config

p = argparse.ArgumentParser()
p.add_argument("--shapes", default="qwen3-30b-a3b,gpt-oss-20b")
p.add_argument("--M", default="1024,4096,16384")
p.add_argument("--paths", default="bf16,mxfp4-w4a16")
args = p.parse_args()
dev = torch.cuda.get_device_name()
print(f"{'shape':<14}{'path':<13}{'M':>6}{'host us':>9}{'gpu us':>9}{'validate':>9}{'align':>8}"
      f"{'impl':>8}", flush=True)
for shape in args.shapes.split(","):
    H, I, E, k = SHAPES[shape]  # noqa: E741
    for path in args.paths.split(","):
        w = make_weights(path, H, I, E)
        quant = "mxfp4" if path.startswith("mxfp4") else "none"
        wkw = {n: t for n, t in w.items() if n not in ("w1", "w2")}
        for M in map(int, args.M.split(",")):
            x, tw, ti = make_inputs(M, H, E, k, 1)[0]
            cfg = get_config("w4a16" if quant == "mxfp4" else "bf16", M, E, H, I, k, dev)

            def call():
                return fused_moe(x, w["w1"], w["w2"], tw, ti, quant=quant, act_dtype="bf16",
                                 backend="triton", check_topk_ids=False, **wkw)

            row = {
                "host": host_us(call),
                "gpu": graph_us(call),
                "validate": host_us(lambda: _validate(
                    x, w["w1"], w["w2"], tw, ti, activation="silu", gate_mode="separated",
                    swiglu_alpha=1.702, swiglu_limit=7.0, quant=quant, act_dtype="bf16",
                    bias1=None, bias2=None, expert_mask=None, apply_router_weight_on_input=False,
                    backend="triton", check_topk_ids=False, w1_scale=wkw.get("w1_scale"),
                    w2_scale=wkw.get("w2_scale"))),
                "align": host_us(lambda: align_blocks(ti, E, cfg["BLOCK_M"], None)),
                "impl": host_us(lambda: fused_moe_triton_impl(x, w["w1"], w["w2"], tw, ti,
                                                              quant=quant, **wkw)),
            }
            print(f"{shape:<14}{path:<13}{M:>6}" + "".join(f"{row[c]:>9.0f}" if c in ("host", "gpu")
                  else f"{row[c]:>8.0f}" for c in ("host", "gpu", "validate", "align", "impl")),
                  flush=True)
        del w
        torch.cuda.empty_cache()
