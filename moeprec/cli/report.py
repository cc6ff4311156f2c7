"""`moeprec report`: precision audit of an MoE model shape.

For a model shape and a list of token counts M it prints
1. the activation dtype the policy (`select_act_dtype`) picks for each M, per weight format,
   on this device, and the error of the picked path;
2. the error of each expert path against an fp32 reference (fp32 activations, fp32 master
   weights): bf16 weights; MXFP4 weights with bf16 / fp8 / fp4 activations; fp8 weights with fp8
   activations. Metrics: relative L2 error, max abs error, and `1 - 2*sum(xy)/sum(x^2+y^2)`;
3. router top-k flip rates of a bf16 and an fp32 router gate against an fp64 one (and bf16 vs
   fp32), over the full expert count.

Inputs are synthetic: unit-variance Gaussian activations and weights of std 1/sqrt(fan_in)
(router gate std 0.02). Real checkpoints have outliers that make errors larger; read the
numbers as a comparison between paths, not as a model's accuracy.

CPU speed: quantizing fp32 weights to MXFP4 in the torch reference is slow, so by default the
expert errors use a sample of experts (and, for very wide experts, of the intermediate dim)
within a weight budget; tokens are routed among the sampled experts. The output states what
was sampled; `--experts-sample`, `--intermediate-sample` and `--budget-melems` change it. On CPU the
MXFP4 paths run the reference with the exactly dequantized weights (dequantization to fp32 is
exact, so this equals `fused_moe(quant="mxfp4")` of the torch backend, without decoding the
weights once per path); on CUDA they run `fused_moe` on the packed weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict
from typing import Any

import torch

from moeprec.act_policy import ENV_BOUND, ENV_FORCE_BF16, device_default_bound, select_act_dtype
from moeprec.cli._common import error_metrics, format_table, parse_device
from moeprec.cli.presets import PRESETS, Shape
from moeprec.routing.diagnostics import topk_set_flip_rate


DEFAULT_TOKENS = (1, 16, 64, 256, 511, 512, 1024, 4096)
# path name: (weight format, act dtype). The first is the fp32 reference.
PATHS: dict[str, tuple[str, str]] = {
    "fp32-ref": ("fp32", "bf16"),
    "bf16": ("none", "bf16"),
    "mxfp4-w4a16": ("mxfp4", "bf16"),
    "mxfp4-fp8": ("mxfp4", "fp8"),
    "mxfp4-fp4": ("mxfp4", "fp4"),
    "fp8-w8a16": ("fp8", "bf16"),
    "fp8": ("fp8", "fp8"),
}
POLICY_QUANTS = ("mxfp4", "fp8")


def _progress(msg: str, t0: float) -> None:
    print(f"[report {time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=sorted(PRESETS), default=None,
                   help="model shape preset (default qwen3-30b-a3b unless all four of "
                        "--hidden/--intermediate/--experts/--top-k are given)")
    p.add_argument("--hidden", type=int, help="hidden size H (overrides the preset)")
    p.add_argument("--intermediate", type=int, help="expert intermediate size I")
    p.add_argument("--experts", type=int, help="number of experts E")
    p.add_argument("--top-k", type=int, help="experts per token k")
    p.add_argument("--activation", choices=("silu", "swiglu_oai"), help="override the preset's")
    p.add_argument("--gate-mode", choices=("separated", "interleaved"), help="override the preset's")
    p.add_argument("--tokens", type=_int_list, default=list(DEFAULT_TOKENS),
                   help="comma list of token counts M for the policy table")
    p.add_argument("--error-tokens", type=int, default=256,
                   help="tokens in the error measurement (quantizers are per token: the error "
                        "per token does not depend on M)")
    p.add_argument("--router-tokens", type=int, default=2048, help="tokens for router flip rates")
    p.add_argument("--experts-sample", type=int, default=None,
                   help="experts used for the expert errors (default: as many as fit the budget)")
    p.add_argument("--intermediate-sample", type=int, default=None,
                   help="intermediate size used for the expert errors (default: I, reduced only "
                        "when one expert exceeds the budget)")
    p.add_argument("--budget-melems", type=float, default=16.0,
                   help="weight elements (millions) quantized for the expert errors (default 16)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (GPU when present)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    p.add_argument("--plot", metavar="PATH", help="write a PNG plot to PATH (needs matplotlib)")


# ------------------------------------------------------------------------------ the shape


def resolve_shape(args: argparse.Namespace) -> tuple[str, Shape]:
    explicit = [args.hidden, args.intermediate, args.experts, args.top_k]
    if args.model is None and all(v is not None for v in explicit):
        name, base = "custom", Shape(*explicit)
    else:
        name = args.model or "qwen3-30b-a3b"
        base = PRESETS[name]
    over = {f: v for f, v in (("hidden", args.hidden), ("intermediate", args.intermediate),
                              ("experts", args.experts), ("top_k", args.top_k),
                              ("activation", args.activation), ("gate_mode", args.gate_mode))
            if v is not None}
    shape = Shape(**{**asdict(base), **over})
    if over and name != "custom":
        name += " (modified)"
    for field in ("hidden", "intermediate", "experts", "top_k"):
        if getattr(shape, field) < 1:
            raise ValueError(f"--{field.replace('_', '-')}: expected a positive int, got {getattr(shape, field)}")
    if shape.top_k > shape.experts:
        raise ValueError(f"--top-k: expected at most the expert count {shape.experts}, got {shape.top_k}")
    if shape.hidden % 32 or shape.intermediate % 32:
        raise ValueError(
            f"--hidden/--intermediate: MXFP4 needs multiples of 32, got {shape.hidden} and {shape.intermediate}"
        )
    if shape.num_expert_groups is not None and shape.experts % shape.num_expert_groups:
        shape = Shape(**{**asdict(shape), "num_expert_groups": None, "num_limited_groups": None})
    return name, shape


def sample_sizes(shape: Shape, args: argparse.Namespace) -> tuple[int, int]:
    """(experts, intermediate) used for the expert errors, within the weight budget."""
    budget = max(1, int(args.budget_melems * 1e6))
    inter = args.intermediate_sample
    if inter is None:
        # only shrink I when a single expert (3*H*I weights) does not fit the budget
        inter = min(shape.intermediate, max(32, budget // (3 * shape.hidden) // 32 * 32))
    if inter < 32 or inter % 32 or inter > shape.intermediate:
        raise ValueError(
            f"--intermediate-sample: expected a multiple of 32 in [32, {shape.intermediate}], got {inter}"
        )
    experts = args.experts_sample
    if experts is None:
        experts = min(shape.experts, max(1, budget // (3 * shape.hidden * inter)))
    if not 1 <= experts <= shape.experts:
        raise ValueError(f"--experts-sample: expected 1..{shape.experts}, got {experts}")
    return experts, inter


# ------------------------------------------------------------------------------ measurements


def expert_errors(shape: Shape, n_exp: int, inter: int, tokens: int, device: torch.device,
                  seed: int, t0: float) -> dict[str, dict[str, float]]:
    """Error of each path vs the fp32 reference on `tokens` tokens routed among n_exp experts."""
    from moeprec.formats import quantize_fp8, quantize_mxfp4
    from moeprec.formats.mxfp4 import dequantize_mxfp4
    from moeprec.fused_moe_op import fused_moe

    g = torch.Generator().manual_seed(seed)
    H, k = shape.hidden, min(shape.top_k, n_exp)
    _progress(f"weights: {n_exp} experts x (2*{inter} x {H} + {H} x {inter}) fp32", t0)
    w1 = (torch.randn(n_exp, 2 * inter, H, generator=g) / math.sqrt(H)).to(device)
    w2 = (torch.randn(n_exp, H, inter, generator=g) / math.sqrt(inter)).to(device)
    bias = {}
    if shape.bias:
        bias = dict(bias1=(0.1 * torch.randn(n_exp, 2 * inter, generator=g)).to(device),
                    bias2=(0.1 * torch.randn(n_exp, H, generator=g)).to(device))
    x32 = torch.randn(tokens, H, generator=g).to(device)
    logits = torch.randn(tokens, n_exp, generator=g).to(device)
    topk = torch.softmax(logits, -1).topk(k, dim=-1)
    route = dict(topk_weights=topk.values, topk_ids=topk.indices)
    common = dict(activation=shape.activation, gate_mode=shape.gate_mode, **bias, **route)

    _progress("quantizing weights to MXFP4 (the slow step on CPU)", t0)
    mx = [quantize_mxfp4(w) for w in (w1, w2)]
    _progress("quantizing weights to FP8 (per output channel)", t0)
    f8 = [quantize_fp8(w, "per_channel") for w in (w1, w2)]
    weights = {
        "fp32": dict(w1=w1, w2=w2),
        "none": dict(w1=w1.bfloat16(), w2=w2.bfloat16()),
        "fp8": dict(w1=f8[0][0], w2=f8[1][0], w1_scale=f8[0][1].squeeze(-1),
                    w2_scale=f8[1][1].squeeze(-1), quant="fp8"),
    }
    if device.type == "cuda":
        weights["mxfp4"] = dict(w1=mx[0][0], w2=mx[1][0], w1_scale=mx[0][1], w2_scale=mx[1][1],
                                quant="mxfp4")
    else:  # exact decode once; see the module docstring
        weights["mxfp4"] = dict(w1=dequantize_mxfp4(*mx[0], dtype=torch.float32),
                                w2=dequantize_mxfp4(*mx[1], dtype=torch.float32))

    results, outs = {}, {}
    for name, (wfmt, act) in PATHS.items():
        _progress(f"path {name}", t0)
        x = x32 if wfmt == "fp32" else x32.bfloat16()
        backend = "torch" if wfmt == "fp32" else "auto"
        outs[wfmt, act] = fused_moe(x, **weights[wfmt], **common, act_dtype=act, backend=backend)
        if wfmt == "fp32":
            continue
        results[name] = error_metrics(outs[wfmt, act], outs["fp32", "bf16"])
        # what quantizing the activations adds, against the same weights with bf16 activations
        if act != "bf16":
            results[name]["act_rel_l2"] = error_metrics(outs[wfmt, act], outs[wfmt, "bf16"])["rel_l2"]
    return results


def router_flips(shape: Shape, tokens: int, device: torch.device, seed: int) -> dict[str, float]:
    """Fraction of tokens whose top-k expert SET differs between router gate dtypes."""
    from moeprec import TokenChoiceTopKRouter

    g = torch.Generator().manual_seed(seed + 1)
    # unit-variance (post-norm) hidden states, gate std 0.02: logits of std 0.02*sqrt(H)
    x = torch.randn(tokens, shape.hidden, generator=g).to(device, torch.bfloat16)
    weight = (torch.randn(shape.experts, shape.hidden, generator=g) * 0.02).to(device, torch.bfloat16)
    chosen = {}
    for label, rd in (("bf16", None), ("fp32", "fp32"), ("fp64", "fp64")):
        router = TokenChoiceTopKRouter(
            shape.hidden, shape.experts, shape.top_k, score_func=shape.score_func,
            router_dtype=rd, num_expert_groups=shape.num_expert_groups,
            num_limited_groups=shape.num_limited_groups,
        ).to(device, torch.bfloat16)
        with torch.no_grad():
            router.gate.weight.copy_(weight)
            chosen[label] = router(x)[1]

    def rate(a: str, b: str) -> float:
        return topk_set_flip_rate(chosen[a], chosen[b])

    return {"bf16_vs_fp64": rate("bf16", "fp64"), "fp32_vs_fp64": rate("fp32", "fp64"),
            "bf16_vs_fp32": rate("bf16", "fp32")}


def policy_table(shape: Shape, tokens: list[int], device: torch.device) -> dict[str, Any]:
    """The act dtype the policy picks for each M and weight format, with the bound's source."""
    dev = None if device.type == "cpu" else device
    picks = {
        str(m): {q: select_act_dtype(m, quant=q, activation=shape.activation,
                                     gate_mode=shape.gate_mode, device=dev) for q in POLICY_QUANTS}
        for m in tokens
    }
    env_bound = os.environ.get(ENV_BOUND)
    return {
        "picks": picks,
        "bound": int(env_bound) if env_bound is not None else device_default_bound(dev),
        "bound_source": ENV_BOUND if env_bound is not None else "device default (configs/act_dtype_bounds.json)",
        "force_bf16_env": os.environ.get(ENV_FORCE_BF16),
    }


# ------------------------------------------------------------------------------ output


def _path_of(quant: str, act: str) -> str:
    return next(name for name, (w, a) in PATHS.items() if (w, a) == (quant, act))


def print_report(res: dict[str, Any]) -> None:
    s, smp = res["shape"], res["sample"]
    print(f"== moeprec report: {res['model']} (H={s['hidden']}, I={s['intermediate']}, "
          f"E={s['experts']}, top-{s['top_k']}, {s['activation']}, {s['gate_mode']}"
          f"{', biases' if s['bias'] else ''}) on {res['device']} ==")
    pol = res["policy"]
    print(f"\n-- activation dtype picked by the policy (bound {pol['bound']} from {pol['bound_source']}"
          f"{', ' + ENV_FORCE_BF16 + '=' + pol['force_bf16_env'] if pol['force_bf16_env'] else ''}) --")
    rows = []
    for m, picks in pol["picks"].items():
        cells = [m]
        for q in POLICY_QUANTS:
            path = _path_of(q, picks[q])
            err = res["paths"].get(path, {}).get("rel_l2")
            cells += [picks[q], "n/a" if err is None else f"{err:.2e}"]
        rows.append(cells)
    print(format_table(["M", "mxfp4 act", "rel L2", "fp8 act", "rel L2"], rows, markdown=False))

    print("\n-- expert path errors vs fp32 reference (fp32 activations and master weights) --")
    rows = [[name, f"{m['rel_l2']:.3e}", f"{m['max_abs']:.3e}", f"{m['cos_diff']:.2e}",
             f"{m['act_rel_l2']:.2e}" if "act_rel_l2" in m else "-", "yes" if m["nan"] else "no"]
            for name, m in res["paths"].items()]
    print(format_table(["path", "rel L2", "max abs", "1-cos", "act-only rel L2", "NaN"], rows, markdown=False))
    print(f"measured on {smp['error_tokens']} tokens routed top-{smp['top_k']} among "
          f"{smp['experts']} of {s['experts']} experts, intermediate {smp['intermediate']} of "
          f"{s['intermediate']} (CPU budget {smp['budget_melems']:g}M weight elements; "
          f"change with --experts-sample/--intermediate-sample/--budget-melems).")
    print("bf16 = bf16 weights and activations; mxfp4-w4a16 = MXFP4 weights, bf16 activations; "
          "mxfp4-fp8/-fp4 = activations quantized per token to E4M3 / to MXFP4; fp8-w8a16 / fp8 = "
          "E4M3 weights (per channel) with bf16 / E4M3 activations. act-only rel L2: against the same "
          "weights with bf16 activations (what the act dtype adds).")

    r = res["router"]
    print(f"\n-- router top-{s['top_k']} set flips over {res['router_tokens']} tokens "
          f"(bf16 inputs and gate weights; only the gate GEMM dtype differs) --")
    flips = [[k.replace("_", " "), f"{v * 100:.2f}%"] for k, v in r.items()]
    print(format_table(["pair", "flip rate"], flips, markdown=False))
    print("\nSynthetic Gaussian inputs and weights: compare paths with each other, not with a real "
          "model's accuracy.")


def plot_report(res: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(f"--plot needs matplotlib (pip install 'moeprec[plot]'): {exc}") from None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(res["paths"])
    a.bar(names, [max(res["paths"][n]["rel_l2"], 1e-12) for n in names], color="tab:blue")
    a.set_yscale("log")
    a.set_ylabel("relative L2 error vs fp32")
    a.set_title(f"{res['model']}: expert paths")
    a.tick_params(axis="x", rotation=30)
    pairs = list(res["router"])
    b.bar([p.replace("_", " ") for p in pairs], [100 * res["router"][p] for p in pairs], color="tab:orange")
    b.set_ylabel("top-k set flip rate (%)")
    b.set_title("router gate dtype")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def collect(args: argparse.Namespace) -> dict[str, Any]:
    """Run every measurement; returns the JSON-ready result."""
    t0 = time.perf_counter()
    model, shape = resolve_shape(args)
    for flag in ("error_tokens", "router_tokens"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')}: expected a positive int, got {getattr(args, flag)}")
    device = parse_device(args.device)
    n_exp, inter = sample_sizes(shape, args)
    _progress(f"{model}: policy table for M in {args.tokens}", t0)
    policy = policy_table(shape, args.tokens, device)
    paths = expert_errors(shape, n_exp, inter, args.error_tokens, device, args.seed, t0)
    _progress(f"router flip rates ({args.router_tokens} tokens, {shape.experts} experts)", t0)
    router = router_flips(shape, args.router_tokens, device, args.seed)
    _progress("done", t0)
    return {
        "model": model,
        "shape": asdict(shape),
        "device": str(device),
        "tokens": list(args.tokens),
        "policy": policy,
        "paths": paths,
        "router": router,
        "router_tokens": args.router_tokens,
        "sample": {"experts": n_exp, "intermediate": inter, "top_k": min(shape.top_k, n_exp),
                   "error_tokens": args.error_tokens, "budget_melems": args.budget_melems},
        "seed": args.seed,
        "seconds": time.perf_counter() - t0,
    }


def run(args: argparse.Namespace) -> int:
    res = collect(args)
    print_report(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
        print(f"\nJSON written to {args.json}")
    if args.plot:
        plot_report(res, args.plot)
        print(f"plot written to {args.plot}")
    return 0
