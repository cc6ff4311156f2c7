"""Probe: the fixed cost of a decode-sized call as `moeprec bench` times it (CUDA events around
each replay of a CUDA graph), with kernels that do almost nothing.

    python3 benchmarks/probes/graph_overhead.py [--out DIR]

Graphs of 1, 2 and 3 launches of a one-program Triton kernel (a 16-byte store), with stage 2's
programmatic dependent launch as the fused path sets it (`launch_pdl`) and without, timed as
the bench does (`moeprec.cli.bench._median_ms` over graph replays). The time of a graph of n
empty launches is what a call of n kernels pays on top of its kernels' own work: at
Qwen3-30B-A3B bf16 M = 1 (two launches, an 18 us floor) that bounds the percent of the floor
any kernel can reach.
"""
import argparse

import torch
import triton
import triton.language as tl
from _timing import save_rows  # noqa: E402 (this folder)

from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from moeprec.cli.bench import _as_graphs, _median_ms


@triton.jit
def _touch(p, SIGNAL: tl.constexpr, PDL: tl.constexpr):
    if SIGNAL:  # as stage 1 does for a pdl stage 2
        gdc_launch_dependents()
    if PDL:
        gdc_wait()
    tl.store(p + tl.arange(0, 4), tl.full([4], 1.0, tl.float32))


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

        us = _median_ms(_as_graphs([call]), 200) * 1e3
        print(f"{n} launch(es), pdl {pdl}: {us:6.2f} us per replay", flush=True)
        rows.append({"launches": n, "pdl": pdl, "us": us})
save_rows(args.out, "graph_overhead.json", rows)
