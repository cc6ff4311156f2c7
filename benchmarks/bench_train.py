"""Training benchmark of one MoE layer: forward + backward time, TFLOP/s and peak memory.

moeprec's `MoE` (fp32 router via `router_dtype=torch.float32`) side by side with a
torchtitan-style layer written plainly below (fp32-upcast router, softmax top-k, stable argsort
dispatch, `torch._grouped_mm` with offsets, bmm combine), both eager and `torch.compile`d, in bf16,
on the same weights and inputs.

Shapes: Qwen3-30B-A3B (D=2048, I=768, E=128, k=8) and gpt-oss-20b (D=2880, I=2880, E=32, k=4,
swiglu_oai, interleaved gate/up, biases); T in {4096, 16384} tokens.
FLOPs counted: 18 * T * k * D * I (the two expert GEMMs: 6 TkDI forward, twice that backward).

    python benchmarks/bench_train.py --out benchmarks/results/train            # GPU
    python benchmarks/bench_train.py --shapes gpt-oss-20b --out ...            # one shape
    python benchmarks/bench_train.py --smoke --device cpu --out /tmp/bench     # tiny, anywhere

Targets reported against: >= 450 TFLOP/s fwd+bwd at Qwen3-30B-A3B T=16384, >= 1.1x the
torchtitan-style layer, peak memory no higher.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from moeprec.activations import gated_activation
from moeprec.cli.presets import PRESETS, Shape

TARGET_TFLOPS = 450.0
TARGET_SPEEDUP = 1.1


# Model shapes come from `moeprec report`'s presets (hidden D, intermediate I, experts E, top_k).
BENCH_SHAPES = ("qwen3-30b-a3b", "gpt-oss-20b")
SHAPES: dict[str, Shape] = {n: PRESETS[n] for n in BENCH_SHAPES}
SMOKE_SHAPES: dict[str, Shape] = {
    "qwen3-30b-a3b": replace(PRESETS["qwen3-30b-a3b"], hidden=64, intermediate=32, experts=8,
                             top_k=4),
    "gpt-oss-20b": replace(PRESETS["gpt-oss-20b"], hidden=64, intermediate=64, experts=4, top_k=2),
}


# ------------------------------------------------------------------------------------------------
# The peer: a torchtitan-style MoE layer, written plainly.


class TitanStyleMoE(nn.Module):
    """Token-choice top-k MoE as torchtitan writes it, with moeprec's weight layout.

    Router: logits = F.linear(x.float(), w.float()) (fp32 upcast copies), softmax, top-k,
    renormalised. Dispatch: stable argsort of the flat expert ids, gather. Experts:
    torch._grouped_mm over offsets. Combine: un-permute, then a [T,1,k] x [T,k,D] bmm in fp32.
    """

    def __init__(self, s: Shape, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.s = s
        self.gate = nn.Parameter(torch.empty(s.experts, s.hidden, **kw))
        self.w1 = nn.Parameter(torch.empty(s.experts, 2 * s.intermediate, s.hidden, **kw))
        self.w2 = nn.Parameter(torch.empty(s.experts, s.hidden, s.intermediate, **kw))
        if s.bias:
            self.b1 = nn.Parameter(torch.empty(s.experts, 2 * s.intermediate, **kw))
            self.b2 = nn.Parameter(torch.empty(s.experts, s.hidden, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.s
        t = x.shape[0]
        logits = F.linear(x.float(), self.gate.float())
        scores = torch.softmax(logits, dim=-1)
        top_scores, selected = torch.topk(scores, s.top_k, dim=-1)
        top_scores = top_scores / (top_scores.sum(dim=-1, keepdim=True) + 1e-20)

        flat = selected.reshape(-1)
        order = torch.argsort(flat, stable=True)
        # histc, as torchtitan: a fixed-size result, so no host sync and no graph break
        counts = torch.histc(flat.float(), bins=s.experts, min=0, max=s.experts - 1)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        xs = x[order // s.top_k]

        h = torch._grouped_mm(xs, self.w1.transpose(-2, -1), offs=offs)
        if s.bias:
            expert_of_row = flat[order]
            h = h + self.b1[expert_of_row]
        z = gated_activation(h, s.activation, s.gate_mode)
        y = torch._grouped_mm(z, self.w2.transpose(-2, -1), offs=offs)
        if s.bias:
            y = y + self.b2[expert_of_row]

        unsorted = torch.empty_like(y)
        unsorted[order] = y
        out = torch.bmm(top_scores.unsqueeze(1), unsorted.view(t, s.top_k, s.hidden).float())
        return out.squeeze(1).to(x.dtype)


def build_layers(s: Shape, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """(moeprec MoE, TitanStyleMoE) holding the same weights."""
    from moeprec.args import MoEArgs
    from moeprec.moe import MoE

    args = MoEArgs(
        num_experts=s.experts, top_k=s.top_k, score_func="softmax", route_norm=True,
        router_dtype=torch.float32, activation=s.activation, gate_mode=s.gate_mode,
        mlp_bias=s.bias,
    )
    ours = MoE(args, s.hidden, s.intermediate).to(device=device, dtype=dtype)
    ours.init_weights(0.02)
    peer = TitanStyleMoE(s, device, dtype)
    with torch.no_grad():
        if s.bias:  # non-zero biases, so that they are exercised
            ours.experts.b1.normal_(0, 0.02)
            ours.experts.b2.normal_(0, 0.02)
            peer.b1.copy_(ours.experts.b1)
            peer.b2.copy_(ours.experts.b2)
        peer.gate.copy_(ours.router.gate.weight)
        peer.w1.copy_(ours.experts.w1)
        peer.w2.copy_(ours.experts.w2)
    return ours, peer


# ------------------------------------------------------------------------------------------------
# Timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fwd_bwd(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    for p in layer.parameters():
        p.grad = None
    x.grad = None
    out = layer(x)
    # A random gradient: torch._grouped_mm's backward rejects the stride-0 gradient of out.sum().
    out.backward(g)
    return out


def measure(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, warmup: int, iters: int,
            queued: bool = False) -> dict:
    """Median training-forward and forward+backward times (ms), peak memory of one fwd+bwd.

    Default: the GPU drains after every iteration, so the host's latency to launch the next
    iteration's first kernels counts. `queued`: events around each iteration, one sync at the
    end, so the host runs ahead as it does in a model with many layers.
    """
    device = x.device
    t0 = time.perf_counter()
    _fwd_bwd(layer, x, g)  # the first call compiles (compiled mode)
    _sync(device)
    first_call_s = time.perf_counter() - t0
    for _ in range(warmup):
        _fwd_bwd(layer, x, g)
    _sync(device)

    def timed(fn) -> float:
        samples = []
        if device.type == "cuda" and queued:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(iters)]
            for start, end in events:
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize(device)
            return statistics.median(start.elapsed_time(end) for start, end in events)
        for _ in range(iters):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)

    fwd_bwd_ms = timed(lambda: _fwd_bwd(layer, x, g))
    # the training forward alone (autograd records, no backward): the same compiled graph
    fwd_ms = timed(lambda: layer(x))
    peak_mib = None
    if device.type == "cuda":
        for p in layer.parameters():
            p.grad = None
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        _fwd_bwd(layer, x, g)
        _sync(device)
        peak_mib = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return {"fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms, "peak_mib": peak_mib,
            "first_call_s": first_call_s}


def kernel_profile(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, iters: int = 3,
                   top: int = 12) -> list[dict]:
    """Where one fwd+bwd spends device time: the `top` kernels by total time, us per iteration."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CUDA] if x.device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        for _ in range(iters):
            _fwd_bwd(layer, x, g)
        _sync(x.device)
    per_kernel: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA or x.device.type != "cuda":
            per_kernel[e.name] = per_kernel.get(e.name, 0.0) + e.device_time_total \
                if x.device.type == "cuda" else per_kernel.get(e.name, 0.0) + e.cpu_time_total
    total = sum(per_kernel.values())
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]
    return [{"kernel": k[:160], "us_per_iter": v / iters, "share": v / total if total else 0.0}
            for k, v in ranked]


def bench_case(name: str, s: Shape, tokens: int, device: torch.device,
               args: argparse.Namespace) -> list[dict]:
    dtype = torch.bfloat16
    torch.manual_seed(0)
    ours, peer = build_layers(s, device, dtype)
    x = torch.randn(tokens, s.hidden, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(tokens, s.hidden, device=device, dtype=dtype)
    flops = 18 * tokens * s.top_k * s.hidden * s.intermediate

    # Same weights, same inputs: the two layers must agree before their speeds are compared.
    with torch.no_grad():
        a, b = ours(x).float(), peer(x).float()
    agree = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()

    rows = []
    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    for impl, layer in (("moeprec", ours), ("titan-style", peer)):
        for mode in modes:
            row: dict[str, Any] = {"shape": name, "tokens": tokens, "impl": impl, "mode": mode,
                                   "rel_diff_vs_peer": agree}
            try:
                if mode == "eager":
                    run_layer, fullgraph = layer, None
                else:
                    run_layer, fullgraph = torch.compile(layer, fullgraph=True), True
                try:
                    m = measure(run_layer, x, g, args.warmup, args.iters, args.queued)
                except Exception as exc:
                    if mode != "compiled" or not fullgraph:
                        raise
                    # fullgraph failed (a graph break): record it and time the broken graph
                    row["fullgraph_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    torch._dynamo.reset()
                    run_layer, fullgraph = torch.compile(layer), False
                    m = measure(run_layer, x, g, args.warmup, args.iters, args.queued)
                row.update(m)
                row["fullgraph"] = fullgraph
                if args.profile:
                    row["profile"] = kernel_profile(run_layer, x, g)
                row["tflops"] = flops / (m["fwd_bwd_ms"] * 1e-3) / 1e12
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
            rows.append(row)
            print(_row_line(row), flush=True)
            for k in row.get("profile", []):
                print(f"    {k['us_per_iter']:9.1f} us {100 * k['share']:5.1f}%  {k['kernel'][:100]}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    del ours, peer, x, g
    if not args.no_compile:
        torch._dynamo.reset()
    return rows


# ------------------------------------------------------------------------------------------------
# Report


def _fmt(v: Any, spec: str, width: int = 0) -> str:
    return ("-" if v is None else format(v, spec)).rjust(width)


def _row_line(r: dict) -> str:
    if "error" in r:
        return f"{r['shape']:<22}{r['tokens']:>7} {r['impl']:<12}{r['mode']:<9} ERROR {r['error'][:90]}"
    return (f"{r['shape']:<22}{r['tokens']:>7} {r['impl']:<12}{r['mode']:<9}"
            f"{r['fwd_ms']:>9.3f}{r['fwd_bwd_ms']:>10.3f}{r['tflops']:>9.2f}"
            f"{_fmt(r['peak_mib'], '.0f', 10)}{r['rel_diff_vs_peer']:>10.1e}")


HEADER = (f"{'shape':<22}{'T':>7} {'impl':<12}{'mode':<9}{'fwd ms':>9}{'f+b ms':>10}"
          f"{'TFLOP/s':>9}{'peak MiB':>10}{'rel diff':>10}")


def summarize(rows: list[dict]) -> list[dict]:
    """moeprec vs the peer per (shape, tokens, mode): speedup and memory ratio, and the targets."""
    out = []
    by_key = {(r["shape"], r["tokens"], r["impl"], r["mode"]): r for r in rows if "error" not in r}
    for (shape, tokens, impl, mode), r in by_key.items():
        if impl != "moeprec":
            continue
        p = by_key.get((shape, tokens, "titan-style", mode))
        if p is None:
            continue
        speedup = p["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        mem_ratio = (r["peak_mib"] / p["peak_mib"]) if r["peak_mib"] and p["peak_mib"] else None
        out.append({
            "shape": shape, "tokens": tokens, "mode": mode, "tflops": r["tflops"],
            "speedup_vs_titan_style": speedup, "peak_mem_ratio_vs_titan_style": mem_ratio,
            "meets_speedup": speedup >= TARGET_SPEEDUP,
            "meets_memory": None if mem_ratio is None else mem_ratio <= 1.0,
            "meets_tflops": r["tflops"] >= TARGET_TFLOPS if shape == "qwen3-30b-a3b"
            and tokens == 16384 else None,
        })
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/train", help="folder for bench_train.json")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and few iterations")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma list of " + ", ".join(SHAPES))
    ap.add_argument("--tokens", default=None, help="comma list (default 4096,16384; smoke 64,128)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    ap.add_argument("--queued", action="store_true",
                    help="time iterations queued back to back (one sync at the end) instead of "
                         "draining the GPU after each")
    ap.add_argument("--train-kernels", default=None,
                    help="moeprec's Triton training kernels to run (the others run torch "
                         "ops), comma list of act (activations.TRAINING_ACT_BACKEND), gather "
                         "(reorder.DISPATCH_GATHER_BACKEND); 'none' for neither; default: the "
                         "library's settings")
    ap.add_argument("--profile", action="store_true",
                    help="also list each case's top kernels (torch.profiler, us per fwd+bwd)")
    args = ap.parse_args(argv)

    import moeprec.activations as activations
    import moeprec.reorder as reorder

    if args.train_kernels is not None:
        chosen = {k.strip() for k in args.train_kernels.split(",") if k.strip()} - {"none"}
        if chosen - {"act", "gather"}:
            ap.error(f"--train-kernels: unknown {sorted(chosen - {'act', 'gather'})}")
        activations.TRAINING_ACT_BACKEND = "triton" if "act" in chosen else "torch"
        reorder.DISPATCH_GATHER_BACKEND = "triton" if "gather" in chosen else "torch"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    table = SMOKE_SHAPES if args.smoke else SHAPES
    names = [n.strip() for n in args.shapes.split(",") if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        ap.error(f"--shapes: unknown {unknown}; expected names from {list(table)}")
    tokens = [int(t) for t in (args.tokens or ("64,128" if args.smoke else "4096,16384")).split(",")]
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    args.iters = args.iters if args.iters is not None else (2 if args.smoke else 20)

    print(f"device: {_device_name(device)}  torch {torch.__version__}  bf16, router fp32", flush=True)
    print(HEADER, flush=True)
    rows = []
    for name in names:
        for t in tokens:
            rows.extend(bench_case(name + ("(smoke)" if args.smoke else ""), table[name], t,
                                  device, args))
    summary = summarize(rows)
    print("\nmoeprec vs torchtitan-style (speedup = peer time / moeprec time, fwd+bwd):")
    for s in summary:
        mem = _fmt(s["peak_mem_ratio_vs_titan_style"], ".2f")
        tf = "" if s["meets_tflops"] is None else f"  >= {TARGET_TFLOPS:.0f} TFLOP/s: {s['meets_tflops']}"
        print(f"  {s['shape']:<22}{s['tokens']:>7} {s['mode']:<9} {s['tflops']:7.1f} TFLOP/s  "
              f"speedup {s['speedup_vs_titan_style']:.2f}x (target {TARGET_SPEEDUP}x)  "
              f"memory ratio {mem}{tf}")
    result = {
        "bench": "train_moe_layer",
        "device": _device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": "bf16",
        "router": "fp32 (moeprec router_dtype=torch.float32; peer: F.linear(x.float(), w.float()))",
        "flops_formula": "18 * T * k * D * I",
        "smoke": args.smoke,
        "moeprec_native_grouped_mm": _native_grouped(device),
        "warmup": args.warmup,
        "iters": args.iters,
        "moeprec_training_kernels": {"act": activations.TRAINING_ACT_BACKEND,
                                     "gather": reorder.DISPATCH_GATHER_BACKEND},
        "timing": "queued (one sync at the end)" if args.queued else "drained after each iteration",
        "shapes": {n: asdict(table[n]) for n in names},
        "targets": {"tflops_qwen3_T16384": TARGET_TFLOPS, "speedup_vs_titan_style": TARGET_SPEEDUP,
                    "peak_memory": "no higher than titan-style"},
        "rows": rows,
        "summary": summary,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # one file per shape selection, so that shapes may be run in separate invocations
    stem = "bench_train" + ("_smoke" if args.smoke else "")
    if names != list(table):
        stem += "_" + "_".join(names)
    path = out / f"{stem}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 1 if any("error" in r for r in rows) else 0


def _native_grouped(device: torch.device) -> bool:
    """Whether moeprec's GroupedExperts takes torch's native grouped GEMM here (bf16)."""
    from moeprec.experts import native_grouped_mm_supported

    return bool(native_grouped_mm_supported(device.type, torch.bfloat16))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


if __name__ == "__main__":
    sys.exit(main())
