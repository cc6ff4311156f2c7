"""`moeprec bench`: fused MoE timings on the GPU against the roofline and two torch peers.

For each model shape x token count M x weight/activation path it reports the median time (CUDA
events after warm-up, rotating several routed input sets so the L2 cache does not flatter), the
achieved TFLOP/s and weight GB/s, and the percent of the roofline floor:

    floor = max(6*M*k*H*I / GEMM rate,  unique experts touched x weight bytes / copy bandwidth)

with the three ceilings (copy bandwidth, bf16 and fp8 GEMM rates) measured in the same run.
Peers (bf16 only): a torch grouped-GEMM MoE (argsort, torch._grouped_mm, combine; every cost
included) and a per-expert loop. Decode-sized calls (M <= --graph-max-m) are timed as CUDA graph
replays, as a serving engine runs them; larger ones eagerly.
Output: a table, results.json and (with matplotlib) a plot under --out.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

from moeprec.cli.report import PATHS as REPORT_PATHS
from moeprec.cli.presets import PRESETS

# name: (H, I, E, k), from the model presets that `moeprec report` audits. The bench times
# every shape with silu and separated gate/up rows (the peers implement that one form; the
# activation costs nothing next to the GEMMs).
SHAPES: dict[str, tuple[int, int, int, int]] = {
    name: (p.hidden, p.intermediate, p.experts, p.top_k) for name, p in PRESETS.items()
}
M_VALUES = (1, 4, 16, 64, 256, 1024, 4096, 16384)
# path: (quant, act_dtype), named as in `moeprec report`
PATHS: dict[str, tuple[str, str]] = {
    name: REPORT_PATHS[name] for name in ("bf16", "mxfp4-w4a16", "mxfp4-fp8", "fp8")
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma list of " + ", ".join(SHAPES))
    p.add_argument("--M", default=",".join(map(str, M_VALUES)), help="comma list of token counts")
    p.add_argument("--paths", default=",".join(PATHS), help="comma list of " + ", ".join(PATHS))
    p.add_argument("--out", default="bench_out", help="folder for results.json and the plot")
    p.add_argument("--reps", type=int, default=20, help="timed calls per point (median)")
    p.add_argument("--sets", type=int, default=4, help="routed input sets rotated between calls")
    p.add_argument("--graph-max-m", type=int, default=256,
                   help="time M up to this as CUDA graph replays (0: always eager)")
    p.add_argument("--no-peers", action="store_true", help="skip the torch grouped-GEMM and loop")
    p.add_argument("--loop-max-m", type=int, default=1024, help="largest M for the per-expert loop")
    p.add_argument("--no-plot", action="store_true")


# ------------------------------------------------------------------------------ measuring


def _median_ms(fns: list[Callable[[], Any]], reps: int) -> float:
    import torch

    for f in fns:
        f()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fns[i % len(fns)]()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def _as_graphs(fns: list[Callable[[], Any]]) -> list[Callable[[], Any]]:
    import torch

    for f in fns:  # compile and allocate outside the capture
        f()
    torch.cuda.synchronize()
    graphs = []
    for f in fns:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            f()
        graphs.append(g.replay)
    return graphs


def measure_ceilings() -> dict[str, float]:
    """Copy bandwidth (bytes read + written), bf16 and fp8 dense GEMM rates, on random data."""
    import torch

    n = 1 << 29  # 1 GiB of bf16... per buffer: far past L2
    a = torch.randn(n // 2, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ms = _median_ms([lambda: b.copy_(a)], 20)
    copy_bw = 2 * a.numel() * a.element_size() / (ms * 1e-3)
    del a, b
    s = 8192
    x = torch.randn(s, s, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(s, s, device="cuda", dtype=torch.bfloat16)
    ms = _median_ms([lambda: torch.mm(x, y)], 20)
    bf16_rate = 2 * s**3 / (ms * 1e-3)
    fp8_rate = float("nan")
    try:
        xf = x.to(torch.float8_e4m3fn)
        yf = y.to(torch.float8_e4m3fn).t().contiguous().t()
        one = torch.ones((), device="cuda")
        ms = _median_ms([lambda: torch._scaled_mm(xf, yf, scale_a=one, scale_b=one,
                                                  out_dtype=torch.bfloat16)], 20)
        fp8_rate = 2 * s**3 / (ms * 1e-3)
    except Exception as exc:  # noqa: BLE001 (report, keep going)
        print(f"fp8 GEMM ceiling not measured: {exc}", file=sys.stderr)
    return {"copy_GBps": copy_bw / 1e9, "bf16_TFLOPs": bf16_rate / 1e12,
            "fp8_TFLOPs": fp8_rate / 1e12}


# ------------------------------------------------------------------------------ problem setup


def make_weights(path: str, H: int, I: int, E: int, seed: int = 0) -> dict[str, Any]:  # noqa: E741
    """Random expert weights in the path's storage format (bench data: values only need a
    realistic range; MXFP4 bytes are drawn directly, fp8 cast expert by expert)."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    quant = PATHS[path][0]
    if quant == "mxfp4":
        def mx(n, k):
            packed = torch.randint(0, 256, (E, n, k // 2), device="cuda", dtype=torch.uint8, generator=g)
            scales = torch.randint(118, 124, (E, n, k // 32), device="cuda", dtype=torch.uint8, generator=g)
            return packed, scales
        w1, s1 = mx(2 * I, H)
        w2, s2 = mx(H, I)
        return {"w1": w1, "w2": w2, "w1_scale": s1, "w2_scale": s2}
    if quant == "fp8":
        w1 = torch.empty(E, 2 * I, H, device="cuda", dtype=torch.float8_e4m3fn)
        w2 = torch.empty(E, H, I, device="cuda", dtype=torch.float8_e4m3fn)
        for e in range(E):
            w1[e] = (torch.randn(2 * I, H, device="cuda", generator=g) * 64).to(torch.float8_e4m3fn)
            w2[e] = (torch.randn(H, I, device="cuda", generator=g) * 64).to(torch.float8_e4m3fn)
        s1 = torch.full((E, 2 * I), 1.0 / (64 * H**0.5), device="cuda")
        s2 = torch.full((E, H), 1.0 / (64 * I**0.5), device="cuda")
        return {"w1": w1, "w2": w2, "w1_scale": s1, "w2_scale": s2}
    w1 = torch.empty(E, 2 * I, H, device="cuda", dtype=torch.bfloat16)
    w2 = torch.empty(E, H, I, device="cuda", dtype=torch.bfloat16)
    for e in range(E):
        w1[e] = torch.randn(2 * I, H, device="cuda", generator=g) / H**0.5
        w2[e] = torch.randn(H, I, device="cuda", generator=g) / I**0.5
    return {"w1": w1, "w2": w2}


def expert_bytes(path: str, H: int, I: int) -> float:  # noqa: E741
    n = 3 * H * I  # elements of w1 (2I x H) and w2 (H x I)
    quant = PATHS[path][0]
    if quant == "mxfp4":
        return n / 2 + n / 32
    if quant == "fp8":
        return n + 4 * (2 * I + H)
    return 2 * n


def make_inputs(M: int, H: int, E: int, k: int, sets: int, seed: int = 1) -> list[tuple]:
    import torch

    out = []
    for s in range(sets):
        g = torch.Generator(device="cuda").manual_seed(seed + 1000 * s + M)
        x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16, generator=g)
        logits = torch.randn(M, E, device="cuda", generator=g)
        tw, ti = torch.topk(logits.softmax(-1), k)
        out.append((x, tw, ti.to(torch.int32)))
    return out


# ------------------------------------------------------------------------------ peers


def torch_grouped_moe(x, w1, w2, tw, ti):
    """bf16 MoE from torch ops: argsort by expert, two grouped GEMMs, weighted index_add."""
    import torch
    import torch.nn.functional as F

    grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
    M, H = x.shape
    E, k = w1.shape[0], ti.shape[1]
    flat = ti.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    tok = order // k
    h = grouped_mm(x[tok], w1.transpose(-2, -1), offs=offs)
    g, u = h.chunk(2, dim=-1)
    z = (F.silu(g.float()) * u.float()).to(torch.bfloat16)
    y = grouped_mm(z, w2.transpose(-2, -1), offs=offs)
    y = y.float() * tw.reshape(-1)[order].float().unsqueeze(-1)
    return torch.zeros(M, H, dtype=torch.float32, device=x.device).index_add_(0, tok, y).to(x.dtype)


def torch_loop_moe(x, w1, w2, tw, ti):
    """bf16 MoE as a loop over experts (host-side selection)."""
    import torch
    import torch.nn.functional as F

    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(ti).tolist():
        tok, slot = torch.nonzero(ti == e, as_tuple=True)
        h = x[tok] @ w1[e].T
        g, u = h.chunk(2, dim=-1)
        y = (F.silu(g) * u) @ w2[e].T
        out.index_add_(0, tok, y.float() * tw[tok, slot].float().unsqueeze(-1))
    return out.to(x.dtype)


# ------------------------------------------------------------------------------ run


def _progress(i: int, n: int, label: str, t0: float) -> None:
    width = 24
    done = int(width * i / max(n, 1))
    eta = (time.time() - t0) / max(i, 1) * (n - i)
    print(f"[{'#' * done}{'.' * (width - done)}] {i}/{n} {label} (eta {eta:4.0f}s)", flush=True)


def bench_point(path, shape, M, weights, ceil, args) -> dict[str, Any]:
    import torch

    from moeprec.fused_moe_op import fused_moe

    H, I, E, k = SHAPES[shape]  # noqa: E741
    quant, act = PATHS[path]
    inputs = make_inputs(M, H, E, k, args.sets)
    wkw = {n: t for n, t in weights.items() if n not in ("w1", "w2")}

    def call(x, tw, ti):
        return fused_moe(x, weights["w1"], weights["w2"], tw, ti, quant=quant, act_dtype=act,
                         backend="triton", check_topk_ids=False, **wkw)

    fns = [lambda a=a: call(*a) for a in inputs]
    graphed = M <= args.graph_max_m
    if graphed:
        fns = _as_graphs(fns)
    ms = _median_ms(fns, args.reps)
    unique = statistics.mean(int(torch.unique(ti).numel()) for _, _, ti in inputs)
    flops = 6.0 * M * k * H * I
    wbytes = unique * expert_bytes(path, H, I)
    io_bytes = 2 * M * H * 2
    rate = ceil["fp8_TFLOPs"] if act == "fp8" else ceil["bf16_TFLOPs"]
    t_flop = flops / (rate * 1e12)
    t_byte = (wbytes + io_bytes) / (ceil["copy_GBps"] * 1e9)
    floor_ms = 1e3 * max(t_flop, t_byte)
    row = {
        "shape": shape, "path": path, "M": M, "ms": ms, "graph": graphed,
        "TFLOPs": flops / (ms * 1e-3) / 1e12, "weight_GBps": wbytes / (ms * 1e-3) / 1e9,
        "unique_experts": unique, "floor_ms": floor_ms, "floor_kind": "flop" if t_flop > t_byte else "byte",
        "pct_floor": 100.0 * floor_ms / ms,
    }
    if path == "bf16" and not args.no_peers:
        try:
            row["grouped_ms"] = _median_ms(
                [lambda a=a: torch_grouped_moe(a[0], weights["w1"], weights["w2"], a[1], a[2])
                 for a in inputs], max(5, args.reps // 2))
        except Exception as exc:  # noqa: BLE001
            row["grouped_error"] = str(exc)[:200]
        if M <= args.loop_max_m:
            row["loop_ms"] = _median_ms(
                [lambda a=a: torch_loop_moe(a[0], weights["w1"], weights["w2"], a[1], a[2])
                 for a in inputs], max(3, args.reps // 4))
    del inputs, fns
    return row


def add_bf16_ratios(rows: list[dict[str, Any]]) -> None:
    """rows[i]["x_bf16"] = bf16 time / this path's time at the same shape and M (the issue's
    targets compare paths this way), where the run measured bf16 there too."""
    bf16 = {(r["shape"], r["M"]): r["ms"] for r in rows if r["path"] == "bf16" and "ms" in r}
    for r in rows:
        if "ms" in r and (r["shape"], r["M"]) in bf16:
            r["x_bf16"] = bf16[(r["shape"], r["M"])] / r["ms"]


def _table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'shape':<14}{'path':<12}{'M':>6}{'us':>10}{'x bf16':>8}{'TFLOP/s':>9}{'wGB/s':>8}"
            f"{'floor us':>10}{'%floor':>8}{'grouped us':>12}{'x grp':>7}{'loop us':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        g = r.get("grouped_ms")
        lp = r.get("loop_ms")
        xb = r.get("x_bf16")
        lines.append(
            f"{r['shape']:<14}{r['path']:<12}{r['M']:>6}{r['ms'] * 1e3:>10.1f}"
            + (f"{xb:>8.2f}" if xb else f"{'':>8}")
            + f"{r['TFLOPs']:>9.1f}{r['weight_GBps']:>8.0f}{r['floor_ms'] * 1e3:>10.1f}"
            f"{r['pct_floor']:>7.0f}%"
            + (f"{g * 1e3:>12.1f}{g / r['ms']:>7.2f}" if g else f"{'':>19}")
            + (f"{lp * 1e3:>10.1f}" if lp else ""))
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    shapes = sorted({r["shape"] for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for p in PATHS:
            pts = sorted((r["M"], r["pct_floor"]) for r in rows if r["shape"] == shape and r["path"] == p)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=p)
        ax.set_xscale("log", base=2)
        ax.set_title(shape)
        ax.set_xlabel("tokens M")
        ax.set_ylabel("% of roofline floor")
        ax.set_ylim(0, 110)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_selection(args: argparse.Namespace) -> tuple[list[str], list[str], list[int]]:
    """(shapes, paths, token counts) from the comma lists, checked."""
    shapes = [s for s in args.shapes.split(",") if s]
    paths = [p for p in args.paths.split(",") if p]
    for s in shapes:
        if s not in SHAPES:
            raise ValueError(f"--shapes: expected names from {tuple(SHAPES)}, got {s!r}")
    for p in paths:
        if p not in PATHS:
            raise ValueError(f"--paths: expected names from {tuple(PATHS)}, got {p!r}")
    try:
        ms_list = [int(m) for m in args.M.split(",") if m]
    except ValueError:
        raise ValueError(f"--M: expected a comma list of positive ints, got {args.M!r}") from None
    if not ms_list or min(ms_list) < 1:
        raise ValueError(f"--M: expected a comma list of positive ints, got {args.M!r}")
    return shapes, paths, ms_list


def _save(out: str, device: str, ceil: dict[str, float], rows: list[dict[str, Any]]) -> None:
    import torch
    import triton

    result = {
        "device": device, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "moeprec " + " ".join(sys.argv[1:]), "torch": torch.__version__,
        "triton": triton.__version__, "ceilings": ceil, "rows": rows,
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)


def run(args: argparse.Namespace) -> int:
    import torch

    shapes, paths, ms_list = parse_selection(args)
    if not torch.cuda.is_available():
        print("moeprec bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    device = torch.cuda.get_device_name()
    print(f"device: {device}; measuring ceilings...", flush=True)
    ceil = measure_ceilings()
    print(f"ceilings: copy {ceil['copy_GBps']:.0f} GB/s, bf16 {ceil['bf16_TFLOPs']:.0f} TFLOP/s, "
          f"fp8 {ceil['fp8_TFLOPs']:.0f} TFLOP/s", flush=True)
    rows: list[dict[str, Any]] = []
    total = len(shapes) * len(paths) * len(ms_list)
    t0 = time.time()
    i = 0
    for shape in shapes:
        H, I, E, k = SHAPES[shape]  # noqa: E741
        for path in paths:
            weights = make_weights(path, H, I, E)
            for M in ms_list:
                i += 1
                _progress(i, total, f"{shape} {path} M={M}", t0)
                try:
                    rows.append(bench_point(path, shape, M, weights, ceil, args))
                except Exception as exc:  # noqa: BLE001 (one failing point must not lose the run)
                    print(f"  FAILED: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                    rows.append({"shape": shape, "path": path, "M": M, "error": str(exc)[:300]})
                _save(args.out, device, ceil, rows)  # after every point: a cut-off run keeps its data
            del weights
            torch.cuda.empty_cache()
    add_bf16_ratios(rows)
    _save(args.out, device, ceil, rows)
    ok = [r for r in rows if "ms" in r]
    table = _table(ok)
    with open(os.path.join(args.out, "table.txt"), "w") as f:
        f.write(table + "\n")
    if not args.no_plot:
        _plot(ok, os.path.join(args.out, "pct_floor.png"))
    print(table)
    return 0
