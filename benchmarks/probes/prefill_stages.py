"""Probe: where a prefill fused_moe call spends its GPU time, kernel by kernel.

    python3 benchmarks/probes/prefill_stages.py [--out DIR] [--M 4096,16384] [--paths bf16]

For each bench shape and M: one call of the op with the launch settings it picks on this device,
profiled (torch.profiler, CUDA kernels only, 5 calls averaged position by position), next to
cuBLAS (torch.mm) on the same two GEMMs unrouted: [M*k, H] @ [H, 2I] and [M*k, I] @ [I, H].
Variant "stores": the same config with stage 2 storing each slot's row (atomic=False; the op
then sums each token's rows in `_sum_slot_rows_kernel`; until 2026-12-03 07:40 UTC in torch) to
price the fp32 atomics. Prints each kernel's
time, the two GEMM kernels' TFLOP/s and cuBLAS's, so the gap to the floor can be assigned.
"""
import argparse

import torch
from _timing import save_rows  # noqa: E402 (this folder)

from moeprec.cli.bench import PATHS, SHAPES, make_inputs, make_weights
from moeprec.kernels.fused_moe_triton import fused_moe_triton_impl
from moeprec.kernels.tuning import get_config, path_name

ap = argparse.ArgumentParser()
ap.add_argument("--out", default=None)
ap.add_argument("--M", default="4096,16384")
ap.add_argument("--paths", default="bf16")
ap.add_argument("--calls", type=int, default=5)
args = ap.parse_args()
device = torch.cuda.get_device_name()
CUDA = torch.autograd.DeviceType.CUDA


def kernel_times(fn, calls):
    """[(kernel name, mean us)] in launch order over `calls` profiled calls of fn."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    ev = sorted((e for e in prof.events() if e.device_type == CUDA),
                key=lambda e: e.time_range.start)
    per = len(ev) // calls
    if per * calls != len(ev):  # not the same launches every call: report the totals only
        return [("(uneven)", sum(e.time_range.elapsed_us() for e in ev) / calls)]
    return [(ev[i].name[:40], sum(ev[c * per + i].time_range.elapsed_us()
                                  for c in range(calls)) / calls) for i in range(per)]


def mm_us(a, b, reps=10):
    torch.mm(a, b)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        torch.mm(a, b)
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / reps * 1e3


rows = []
for path in args.paths.split(","):
    quant, act = PATHS[path]
    for shape, (H, I, E, k) in SHAPES.items():  # noqa: E741
        weights = make_weights(path, H, I, E)
        wkw = {n: t for n, t in weights.items() if n not in ("w1", "w2")}
        for M in (int(m) for m in args.M.split(",")):
            S = M * k
            cfg = get_config(path_name(quant, act), M, E, H, I, k, device)
            x, tw, ti = make_inputs(M, H, E, k, 1, seed=3)[0]
            flops = {"s1": 2.0 * S * H * 2 * I, "s2": 2.0 * S * I * H}
            a1 = torch.randn(S, H, device="cuda", dtype=torch.bfloat16)
            a2 = torch.randn(S, I, device="cuda", dtype=torch.bfloat16)
            cublas = {"s1": mm_us(a1, torch.randn(H, 2 * I, device="cuda", dtype=torch.bfloat16)),
                      "s2": mm_us(a2, torch.randn(I, H, device="cuda", dtype=torch.bfloat16))}
            del a1, a2
            for variant, c in (("table", cfg), ("stores", dict(cfg, atomic=False))):
                ks = kernel_times(lambda c=c: fused_moe_triton_impl(
                    x, weights["w1"], weights["w2"], tw, ti, quant=quant, act_dtype=act,
                    config=c, **wkw), args.calls)
                total = sum(t for _, t in ks)
                gemms = [t for n, t in ks if "gemm" in n]
                print(f"\n{shape} {path} M={M} {variant}: {total:.1f} us of kernels "
                      f"(BLOCK_M {cfg['BLOCK_M']})", flush=True)
                for n, t in ks:
                    print(f"  {t:9.1f} us  {n}")
                row = {"shape": shape, "path": path, "M": M, "variant": variant, "config": c,
                       "kernels": ks, "total_us": total, "cublas_us": cublas}
                if len(gemms) == 2:
                    for st, t in zip(("s1", "s2"), gemms):
                        row[f"{st}_tflops"] = flops[st] / t / 1e6
                        print(f"  {st}: {flops[st] / t / 1e6:6.1f} TFLOP/s, cuBLAS unrouted "
                              f"{cublas[st]:.1f} us = {flops[st] / cublas[st] / 1e6:6.1f} TFLOP/s")
                rows.append(row)
        del weights
        torch.cuda.empty_cache()
save_rows(args.out, "prefill_stages.json", rows)
