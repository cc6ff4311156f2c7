"""How far the experts' gated-activation kernels move a small bf16 MoE's output and gradients
from the torch ops, eager and compiled (Inductor fuses the torch ops into one rounding, as the
kernels do). Writes $OUT/act_debug.json.

    python3 benchmarks/probes/act_debug.py      # on CUDA
"""

import json
import os

import torch

from moeprec import activations as act
from moeprec.args import MoEArgs
from moeprec.moe import MoE

RUNS = ("torch", "triton", "torch-compiled", "triton-compiled")
res = {}
for activation, gate_mode in [("silu", "separated"), ("swiglu_oai", "interleaved")]:
    torch.manual_seed(0)
    m = MoE(MoEArgs(num_experts=8, top_k=2, activation=activation, gate_mode=gate_mode,
                    mlp_bias=activation == "swiglu_oai"), 256, 128).cuda().bfloat16()
    m.init_weights(0.05)
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    outs = {}
    for run in RUNS:
        act.TRAINING_ACT_BACKEND = run.split("-")[0]
        torch._dynamo.reset()
        f = torch.compile(m, fullgraph=True) if run.endswith("compiled") else m
        xi = x.clone().requires_grad_()
        out = f(xi)
        out.float().square().mean().backward()
        outs[run] = (out.float().detach(), xi.grad.float(), m.experts.w1.grad.float().clone())
        m.zero_grad()
    for run in RUNS[1:]:
        res[f"{activation}/{run} vs torch"] = [
            dict(tensor=n, absmax=b.abs().max().item(), maxdiff=(a - b).abs().max().item())
            for a, b, n in zip(outs[run], outs["torch"], ("out", "x.grad", "w1.grad"))]
        print(activation, run, res[f"{activation}/{run} vs torch"], flush=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "act_debug.json"), "w"), indent=1)
