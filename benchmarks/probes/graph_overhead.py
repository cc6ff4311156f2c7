"""Probe: the fixed cost of a decode-sized call as `moeprec bench` times it (CUDA events around
each replay of a CUDA graph), with kernels that do almost nothing.

    python3 benchmarks/probes/graph_overhead.py [--out DIR]

Graphs of 1, 2 and 3 launches of a one-program Triton kernel (a 16-byte store), with stage 2's
programmatic dependent launch as the fused path sets it (`launch_pdl`) and without, timed two
ways: as the bench does (`moeprec.cli.bench._median_ms`: events around each replay, the GPU
idle between them when the host is the slower side, so this is the host's replay rate), and
queued behind a 20 ms sleep kernel so that the GPU runs the replays back to back (the GPU's own
cost per replay of n empty launches: what a call of n kernels pays on top of its kernels' work
once the GPU is the slower side, as in the bench's decode points of 20 us and more); then
the table's Qwen3-30B-A3B bf16 M = 1 and 4 calls both ways.
"""
import argparse

import torch
import triton
import triton.language as tl
from _timing import queued_us, save_rows  # noqa: E402 (this folder)

from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from moeprec.cli.bench import SHAPES, _as_graphs, _median_ms, make_inputs, make_weights
from moeprec.kernels.fused_moe_triton import fused_moe_triton_impl


@triton.jit
def _touch(p, SIGNAL: tl.constexpr, PDL: tl.constexpr):
    if SIGNAL:  # as stage 1 does for a pdl stage 2
        gdc_launch_dependents()
    if PDL:
        gdc_wait()
    tl.store(p + tl.arange(0, 4), tl.full([4], 1.0, tl.float32))


def both_timings(calls, reps=200):
    """(bench-timed median us, queued median us) of graph replays of `calls` (rotated)."""
    replays = _as_graphs(calls if isinstance(calls, list) else [calls])
    return _median_ms(replays, reps) * 1e3, queued_us(replays, reps)


ap = argparse.ArgumentParser()
ap.add_argument("--out", default=None)
args = ap.parse_args()
buf = torch.zeros(64, device="cuda")
rows = []
for n in (1, 2, 3):
    for pdl in (False, True):
        if pdl and n == 1:
            continue

        def call(n=n, pdl=pdl):
            _touch[(1,)](buf, SIGNAL=pdl, PDL=False)
            for i in range(1, n):
                _touch[(1,)](buf[16 * i:], SIGNAL=pdl and i < n - 1, PDL=pdl, launch_pdl=pdl)

        us, queued = both_timings(call)
        print(f"{n} launch(es), pdl {pdl}: {us:6.2f} us per replay (bench timing), "
              f"{queued:6.2f} us queued", flush=True)
        rows.append({"launches": n, "pdl": pdl, "us": us, "queued_us": queued})
# a real decode call for scale: the table's Qwen3-30B-A3B bf16 entries, 3 input sets rotated
H, I, E, k = SHAPES["qwen3-30b-a3b"]  # noqa: E741
w = make_weights("bf16", H, I, E)
for M in (1, 4):
    sets = make_inputs(M, H, E, k, 3, seed=5)
    calls = [lambda a=a: fused_moe_triton_impl(a[0], w["w1"], w["w2"], a[1], a[2]) for a in sets]
    us, queued = both_timings(calls)
    print(f"qwen3-30b-a3b bf16 M = {M}: {us:6.2f} us per replay (bench timing), "
          f"{queued:6.2f} us queued", flush=True)
    rows.append({"call": f"qwen3-30b-a3b bf16 M={M}", "us": us, "queued_us": queued})
save_rows(args.out, "graph_overhead.json", rows)
