"""Probe: peak memory and time of the MoE combine (un-permute + fp32 weighted sum), fwd + bwd.

On CPU it reads the process's peak RSS growth (glibc returns large blocks to the OS when freed,
so the peak is the live set at its largest); on CUDA, torch.cuda.max_memory_allocated growth.

    python3 benchmarks/probes/combine_memory.py [--tokens 8192] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from moeprec.reorder import combine_expert_outputs, reorder_tokens


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    dev = torch.device(a.device)
    torch.manual_seed(0)
    t, k, d, e = a.tokens, a.top_k, a.dim, a.experts
    scores = torch.rand(t, k, device=dev).requires_grad_()
    sel = torch.stack([torch.randperm(e)[:k] for _ in range(t)]).to(dev)
    expert_out = torch.randn(t * k, d, device=dev, dtype=torch.bfloat16).requires_grad_()
    r = reorder_tokens(scores, sel)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    out = combine_expert_outputs(expert_out, r, scores)
    out.backward(torch.randn_like(out))
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    secs = time.perf_counter() - t0
    fp32_copy = t * k * d * 4 / 2**20
    print(f"T={t} k={k} D={d} on {dev}: peak growth {(peak - base) / 2**20:.0f} MiB "
          f"(one fp32 [T*k, D] copy = {fp32_copy:.0f} MiB), {secs:.2f} s")


if __name__ == "__main__":
    main()
