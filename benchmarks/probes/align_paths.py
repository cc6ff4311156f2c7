"""Probe: block alignment for the fused MoE op, host and GPU time per call, three ways.

    python3 benchmarks/probes/align_paths.py

"one": the single-program Triton kernel (used up to
fused_moe_triton._ALIGN_ONE_PROGRAM_MAX_SLOTS slots); "three": the count / scan / place kernels;
"torch": moeprec.dispatch.moe_align_block_size (a sort and ~25 small ops). Host time is the CPU
wall time per call in a loop of 50 (no sync inside); GPU time is a CUDA-graph replay.
"""
import torch
from _timing import graph_us, host_us  # noqa: E402 (this folder)

import moeprec.kernels.fused_moe_triton as m
from moeprec.dispatch import moe_align_block_size


def _used(sorted_ids, expert_ids, bm):
    """The blocks the GEMMs run (the two paths size their buffers differently)."""
    keep = expert_ids >= 0
    n = expert_ids.numel() * bm
    rows = torch.nn.functional.pad(sorted_ids[:n], (0, n - min(n, sorted_ids.numel())), value=-1)
    return expert_ids[keep], rows.view(-1, bm)[keep]


print(f"{'E':>4}{'k':>3}{'M':>7}{'slots':>8}{'BM':>5}" + "".join(
    f"{p + ' ' + t:>12}" for p in ("one", "three", "torch") for t in ("host", "gpu")), flush=True)
for E, k in ((128, 8), (32, 4), (256, 8)):
    for M in (1, 16, 32, 64, 256, 1024, 4096, 16384):
        ti = torch.randint(0, E, (M, k), device="cuda", dtype=torch.int32)
        bm = 16 if M * k / E < 16 else 64 if M * k / E < 128 else 128
        row, outs = [], []
        for limit in (1 << 30, 0):
            m._ALIGN_ONE_PROGRAM_MAX_SLOTS = limit
            f = lambda: m.align_blocks(ti, E, bm, None)  # noqa: E731
            row += [host_us(f), graph_us(f)]
            outs.append(_used(*f(), bm))
        f = lambda: moe_align_block_size(ti, E, bm)  # noqa: E731
        row += [host_us(f), graph_us(f)]
        outs.append(_used(*f()[:2], bm))
        m._ALIGN_ONE_PROGRAM_MAX_SLOTS = 256
        same = all(torch.equal(x, y) for o in outs[1:] for x, y in zip(outs[0], o))
        print(f"{E:>4}{k:>3}{M:>7}{M * k:>8}{bm:>5}" + "".join(f"{v:>12.1f}" for v in row)
              + ("" if same else "  DIFFERENT"), flush=True)
