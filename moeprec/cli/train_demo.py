"""`moeprec train-demo`: train a small MoE LM with a bf16 router and with an fp32 router.

Writes train_demo_<config>.json (and .png with --plot) under --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moeprec.train_demo import CONFIGS

    parser.add_argument("--config", choices=tuple(CONFIGS), default="short",
                        help="'short': a CPU run of a minute or two; 'gpu': a few minutes on one GPU")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda for --config gpu, else cpu)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run")
    parser.add_argument("--seed", type=int, default=None, help="seed of weights and data")
    parser.add_argument("--out", default="train_demo_out", help="output folder (JSON, PNG)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: the short config's GEMMs are tiny)")
    parser.add_argument("--plot", action="store_true", help="also write a PNG (needs matplotlib)")
    parser.add_argument("--control", action="store_true",
                        help="a third run repeating the bf16 one: the run-to-run noise floor")
    parser.add_argument("--quiet", action="store_true", help="no per-step progress lines")


def run(args: argparse.Namespace) -> int:
    import torch

    from moeprec.train_demo import get_config, run_demo, write_json, write_plot

    device = args.device or ("cuda" if args.config == "gpu" else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print(f"moeprec train-demo: --device {device} asked for, but CUDA is not available",
              file=sys.stderr)
        return 2
    try:
        cfg = get_config(args.config, steps=args.steps, seed=args.seed)
    except (TypeError, ValueError) as exc:
        print(f"moeprec train-demo: {exc}", file=sys.stderr)
        return 2
    print(f"train-demo '{cfg.name}' on {device}: {cfg.n_layers} layers, dim {cfg.dim}, "
          f"{cfg.num_experts} experts top-{cfg.top_k}, {cfg.batch_size}x{cfg.seq_len} tokens/step, "
          f"{cfg.steps} steps, routers bf16 and fp32 from the same weights", flush=True)
    t0 = time.perf_counter()
    progress = None if args.quiet else (lambda line: print(line, flush=True))
    result = run_demo(cfg, device=device, progress=progress, cpu_threads=args.threads,
                      control=args.control)
    out = Path(args.out)
    json_path = write_json(result, out / f"train_demo_{cfg.name}.json")
    print(_summary(result))
    print(f"wrote {json_path}")
    if args.plot:
        png = write_plot(result, out / f"train_demo_{cfg.name}.png")
        print(f"wrote {png}" if png else "matplotlib is not installed: no plot (pip install "
              "'moeprec[plot]')")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


def _summary(result: dict) -> str:
    rows = ["", f"{'router':<12}{'first loss':>12}{'last loss':>12}{'val loss':>10}"
                f"{'flip rate':>11}{'max/mean':>10}{'time s':>9}"]
    for label, r in result["runs"].items():
        routing = r["routing"]
        flips = routing["flip_rate"]
        worst = max(routing["max_over_mean"][-1])
        rows.append(f"{label:<12}{r['loss'][0]:>12.4f}{r['loss'][-1]:>12.4f}{r['val_loss']:>10.4f}"
                    f"{sum(flips) / len(flips):>11.4f}{worst:>10.2f}{r['time_s']:>9.1f}")
    c = result["comparison"]
    if "control_mean_abs_loss_diff" in c:
        rows.append(f"noise floor (bf16 run repeated): mean |loss diff| per step "
                    f"{c['control_mean_abs_loss_diff']:.4f}")
    rows.append(f"val loss bf16 - fp32: {c['val_loss_bf16_minus_fp32']:+.4f}; mean |loss diff| "
                f"per step: {c['mean_abs_loss_diff']:.4f}")
    rows.append("flip rate: fraction of tokens whose top-k expert set differs between a bf16 and "
                "an fp32 gate on the same inputs and weights (mean over logged steps and layers)")
    return "\n".join(rows)
