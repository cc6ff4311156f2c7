"""`moeprec demo`: what the precision knobs change, shown on a model-sized example.

`run` walks through SECTIONS in order; each section is a function (args, DemoContext) -> None
that prints its own part. A later feature adds its part by appending a function to SECTIONS.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class DemoContext:
    """What sections share: the device, a seed, and results earlier sections left for later ones."""

    device: torch.device
    seed: int
    results: dict[str, Any] = field(default_factory=dict)

    def generator(self) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(self.seed)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (GPU when present)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens to route (default 4096)")
    parser.add_argument("--seed", type=int, default=0)


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int = 3) -> tuple[Any, float]:
    """(result, median milliseconds) of fn() after one warm-up call."""
    out = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return out, statistics.median(times)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(header), rule] + [fmt(r) for r in rows])


def router_precision(args: argparse.Namespace, ctx: DemoContext) -> None:
    """Route the same tokens with a bf16, an fp32 and an fp64 router gate (Qwen3-30B-A3B shape)."""
    from moeprec import TokenChoiceTopKRouter

    dim, num_experts, top_k = 2048, 128, 8
    tokens = args.tokens
    print(f"== Router precision: Qwen3-30B-A3B router shape (D={dim}, E={num_experts}, top-{top_k}), "
          f"{tokens} tokens, bf16 model, {ctx.device} ==")
    gen = ctx.generator()
    # Unit-variance hidden states (post-RMSNorm scale) and std-0.02 gate weights: logits of
    # std ~0.9, where the 8th and 9th best experts are often closer than bf16's resolution.
    x = torch.randn(tokens, dim, generator=gen).to(ctx.device, torch.bfloat16)
    weight = (torch.randn(num_experts, dim, generator=gen) * 0.02).to(torch.bfloat16)

    outs, times = {}, {}
    for label, router_dtype in (("bf16 (None)", None), ("fp32", "fp32"), ("fp64", "fp64")):
        router = TokenChoiceTopKRouter(dim, num_experts, top_k, router_dtype=router_dtype)
        router = router.to(ctx.device, torch.bfloat16)
        with torch.no_grad():
            router.gate.weight.copy_(weight)
            outs[label], times[label] = _timed(lambda r=router: r.route(x), ctx.device)

    ref = outs["fp64"]
    ref_sets = ref.selected_experts.sort(dim=-1).values
    rows = []
    for label, out in outs.items():
        flips = (out.selected_experts.sort(dim=-1).values != ref_sets).any(dim=-1).float().mean().item()
        score_err = (out.scores.double() - ref.scores).abs().max().item()
        logit_err = (out.logits.double() - ref.logits).abs().max().item()
        rows.append([
            label, str(out.logits.dtype).replace("torch.", ""), f"{flips * 100:.2f}%",
            f"{logit_err:.2e}", f"{score_err:.2e}", f"{times[label]:.1f}",
        ])
        ctx.results.setdefault("router_flip_rate", {})[label] = flips
    print(_table(
        ["router dtype", "logits", "top-k set flips vs fp64", "max logit err", "max score err",
         "time ms"], rows))
    print("Same bf16 inputs and weights in every row: only the gate GEMM's output precision differs.\n"
          "bf16 logits keep 8 significant bits, so near-tied experts swap; the fp32 router's logits\n"
          "differ from fp64 only by summation order (set router_dtype / PrecisionConfig.moe_router_dtype).")
    if ctx.device.type != "cuda":
        print("Times: CPU runs the upcast reference; on CUDA the fp32 router runs bf16 tensor-core\n"
              "GEMMs with fp32 output (see benchmarks/bench_router.py).")
    print()


# The demo, in order. Later features append their own section function here.
SECTIONS: list[Callable[[argparse.Namespace, DemoContext], None]] = [router_precision]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: expected cpu or auto on this machine (no CUDA), got {name!r}")
    return device


def run(args: argparse.Namespace) -> int:
    if args.tokens < 1:
        raise ValueError(f"--tokens: expected a positive int, got {args.tokens}")
    ctx = DemoContext(device=_device(args.device), seed=args.seed)
    t0 = time.perf_counter()
    for i, section in enumerate(SECTIONS):
        print(f"[{i + 1}/{len(SECTIONS)}] {(section.__doc__ or section.__name__).splitlines()[0]}", flush=True)
        section(args, ctx)
    print(f"demo done in {time.perf_counter() - t0:.1f} s")
    return 0
