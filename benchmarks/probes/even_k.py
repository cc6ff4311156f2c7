"""Probe: the tensor-core loop with K a multiple of BLOCK_K, its K masks dropped (EVEN_K) or kept.

    python3 benchmarks/probes/even_k.py [--out DIR] [--M 16,64,256,1024,4096,16384]
                                        [--paths bf16,mxfp4-w4a16] [--even-first]

For each bench shape, path (bf16, mxfp4-w4a16) and M: the op with the launch settings it picks on
this device, once as shipped (EVEN_K where K % BLOCK_K == 0) and once with EVEN_K forced off
(the kernel launcher wrapped), median time over 3 input sets (CUDA graphs up to M = 256, eager
above) and the largest output difference between the two (the same arithmetic: expect 0);
--even-first times the shipped variant first (drifting clocks would then favour the other).
Decode blocks (BLOCK_M = 1) run on the CUDA cores and do not use EVEN_K: such points are skipped.
"""
import argparse

import torch
from _timing import rel_diff, save_rows  # noqa: E402 (this folder)

from moeprec.cli.bench import SHAPES, _as_graphs, _median_ms, make_inputs, make_weights
from moeprec.kernels import _fused_moe_kernels as K
from moeprec.kernels.fused_moe_triton import fused_moe_triton_impl
from moeprec.kernels.tuning import get_config


class _WithoutEvenK:
    """The GEMM kernel's launcher with EVEN_K=False whatever the caller passes."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        launch = self.fn[grid]
        return lambda *a, **kw: launch(*a, **dict(kw, EVEN_K=False))


ap = argparse.ArgumentParser()
ap.add_argument("--out", default=None)
ap.add_argument("--M", default="16,64,256,1024,4096,16384")
ap.add_argument("--reps", type=int, default=20)
ap.add_argument("--paths", default="bf16,mxfp4-w4a16")
ap.add_argument("--even-first", action="store_true")
args = ap.parse_args()
device = torch.cuda.get_device_name()
kernel = K._moe_gemm_kernel
rows = []
print(f"{'shape':<14}{'path':<13}{'M':>6}{'masked us':>11}{'even_k us':>11}{'speed-up':>10}  diff",
      flush=True)
order = ("even_k", "masked") if args.even_first else ("masked", "even_k")
for path, quant, cpath in (("bf16", "none", "bf16"), ("mxfp4-w4a16", "mxfp4", "w4a16")):
    if path not in args.paths.split(","):
        continue
    for shape, (H, I, E, k) in SHAPES.items():  # noqa: E741
        weights = make_weights(path, H, I, E)
        wkw = {n: t for n, t in weights.items() if n not in ("w1", "w2")}
        for M in (int(m) for m in args.M.split(",")):
            cfg = get_config(cpath, M, E, H, I, k, device)
            if cfg["BLOCK_M"] == 1:
                continue
            inputs = make_inputs(M, H, E, k, 3, seed=5)
            fns = [lambda a=a: fused_moe_triton_impl(
                a[0], weights["w1"], weights["w2"], a[1], a[2], quant=quant, config=cfg, **wkw)
                for a in inputs]
            res = {}
            for name in order:
                K._moe_gemm_kernel = _WithoutEvenK(kernel) if name == "masked" else kernel
                res[name] = (fns[0](), _median_ms(_as_graphs(fns) if M <= 256 else fns,
                                                  args.reps) * 1e3)
            K._moe_gemm_kernel = kernel
            (o0, t0), (o1, t1) = res["masked"], res["even_k"]
            diff = rel_diff(o1, o0)
            even = [H % cfg["s1"]["BLOCK_K"] == 0, I % cfg["s2"]["BLOCK_K"] == 0]
            print(f"{shape:<14}{path:<13}{M:>6}{t0:11.1f}{t1:11.1f}{t0 / t1:10.3f}  {diff:.1e}"
                  f"  even {even}", flush=True)
            rows.append({"shape": shape, "path": path, "M": M, "masked_us": t0, "even_k_us": t1,
                         "even": even, "diff": diff, "config": cfg})
        del weights
        torch.cuda.empty_cache()
save_rows(args.out, "even_k.json", rows)
