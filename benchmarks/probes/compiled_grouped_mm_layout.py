"""Does a compiled MoE training step feed `_grouped_mm` operands it accepts? (CUDA)

Runs one compiled forward + backward of a small MoE in a fresh process (a device assert poisons
the process), with CUDA_LAUNCH_BLOCKING=1, and writes Inductor's output code so the layouts of
every `_grouped_mm` operand can be read. (On 2026-12-02 a combine whose backward gather Inductor
fused and laid out itself failed here on an H200; the combine's kernels are opaque ops since.)

    python benchmarks/probes/compiled_grouped_mm_layout.py --out OUT
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import sys, torch
from moeprec.args import MoEArgs
from moeprec.moe import MoE
from moeprec.precision import PrecisionConfig
torch.manual_seed(0)
m = MoE(MoEArgs(num_experts=8, top_k=2, num_shared_experts=1), 256, 128,
        precision=PrecisionConfig()).cuda().bfloat16()
m.init_weights(0.05)
f = torch.compile(m, fullgraph=True)
x = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
f(x).float().square().mean().backward()
torch.cuda.synchronize()
print("counts", m.router.route(x.detach().reshape(-1, 256)).num_tokens_per_expert.tolist())
print("OK")
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1", TORCH_LOGS="output_code")
    for variant in ("repo",):
        p = subprocess.run([sys.executable, "-c", CHILD, variant], env=env, capture_output=True,
                           text=True, timeout=240)
        (out / f"layout_{variant}.log").write_text(p.stdout + p.stderr)
        calls = [ln.split("]", 1)[-1].strip() for ln in p.stderr.splitlines()
                 if "extern_kernels._grouped_mm(" in ln]
        ok = "OK" in p.stdout
        print(f"{variant}: {'ok' if ok else 'FAILED rc=' + str(p.returncode)}")
        for ln in p.stdout.splitlines():
            if ln.startswith("counts"):
                print("  ", ln)
        for c in calls:
            print("   ", c[:200])
    return 0


if __name__ == "__main__":
    sys.exit(main())
