"""Probe: peak memory of one eager forward + backward of moeprec's MoE or the torchtitan-style
layer of bench_train.py, one layer per process (run it twice).

Peak growth as `peak_memory.peak_growth` reads it (CPU: peak RSS; CUDA: the allocator's peak).

    python3 benchmarks/probes/layer_memory.py ours  [--experts 32] [--tokens 4096] [--device cpu]
    python3 benchmarks/probes/layer_memory.py peer  ...
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch
from peak_memory import peak_growth

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
    with peak_growth(dev) as r:
        for t in (*layer.parameters(), x):
            t.grad = None
        layer(x).backward(g)
    k, d = s.top_k, s.hidden
    print(f"{a.layer} {a.shape} E={a.experts} T={a.tokens} on {dev}: peak growth "
          f"{r['mib']:.0f} MiB (fp32 [T*k, D] = {a.tokens * k * d * 4 / 2**20:.0f} MiB), {r['s']:.1f} s")


if __name__ == "__main__":
    main()
