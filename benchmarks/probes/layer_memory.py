"""Probe: peak memory of one eager forward + backward of moeprec's MoE or the torchtitan-style
layer of bench_train.py, one layer per process (run it twice).

On CPU it reads the process's peak RSS growth (large blocks go back to the OS when freed, so the
peak is the live set at its largest); on CUDA, torch.cuda.max_memory_allocated growth.

    python3 benchmarks/probes/layer_memory.py ours  [--experts 32] [--tokens 4096] [--device cpu]
    python3 benchmarks/probes/layer_memory.py peer  ...
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_train import PRESETS, build_layers  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("layer", choices=("ours", "peer"))
    p.add_argument("--shape", default="qwen3-30b-a3b", choices=tuple(PRESETS))
    p.add_argument("--experts", type=int, default=32, help="fewer than the model's, to fit a CPU")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    dev = torch.device(a.device)
    s = replace(PRESETS[a.shape], experts=a.experts)
    torch.manual_seed(0)
    ours, peer = build_layers(s, dev, torch.bfloat16)
    layer = ours if a.layer == "ours" else peer
    del ours, peer
    x = torch.randn(a.tokens, s.hidden, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(a.tokens, s.hidden, device=dev, dtype=torch.bfloat16)
    for t in (*layer.parameters(), x):  # gradients exist before the step, as in training
        t.grad = torch.zeros_like(t)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    for t in (*layer.parameters(), x):
        t.grad = None
    layer(x).backward(g)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    k, d = s.top_k, s.hidden
    print(f"{a.layer} {a.shape} E={a.experts} T={a.tokens} on {dev}: peak growth "
          f"{(peak - base) / 2**20:.0f} MiB (fp32 [T*k, D] = {a.tokens * k * d * 4 / 2**20:.0f} MiB), "
          f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
