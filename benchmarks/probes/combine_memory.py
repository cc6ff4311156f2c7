"""Probe: peak memory and time of the MoE combine (un-permute + fp32 weighted sum), fwd + bwd.

Peak growth as `peak_memory.peak_growth` reads it (CPU: peak RSS; CUDA: the allocator's peak).

    python3 benchmarks/probes/combine_memory.py [--tokens 8192] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse

import torch
from peak_memory import peak_growth

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
    reordered = reorder_tokens(scores, sel)
    with peak_growth(dev) as r:
        out = combine_expert_outputs(expert_out, reordered, scores)
        out.backward(torch.randn_like(out))
    fp32_copy = t * k * d * 4 / 2**20
    print(f"T={t} k={k} D={d} on {dev}: peak growth {r['mib']:.0f} MiB "
          f"(one fp32 [T*k, D] copy = {fp32_copy:.0f} MiB), {r['s']:.2f} s")


if __name__ == "__main__":
    main()
