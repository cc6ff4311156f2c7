"""Expert parallelism benchmark: correctness against the unsharded layer, then step time and the
all-to-all share, at the Qwen3-30B-A3B MoE shape (D=2048, I=768, E=128, k=8, bf16).

    torchrun --nproc-per-node 2 benchmarks/bench_expert_parallel.py --out DIR
    torchrun --nproc-per-node 2 benchmarks/bench_expert_parallel.py --device cpu --smoke --out DIR

Every rank builds the same layer (same seed) and an expert-parallel copy, and feeds both its own
tokens: outputs, input gradients and expert gradients (summed over ranks for the local shard) must
agree. Timings (fwd+bwd of one MoE layer, max over ranks):
- `ep_step`: the expert-parallel layer;
- `a2a_in_step`: the token all-to-alls inside that step (4: dispatch and combine, forward and
  backward), timed with CUDA events around each call;
- `exchange_only`: a step that does only the exchanges (count exchange with its host copy, and the
  4 token all-to-alls of the same sizes, with autograd);
- `single_device`: the unsharded layer (all E experts) on the same T tokens, for reference.
Then quantized inference (`--quant mxfp4|fp8`, default mxfp4; `none` skips it): the quantized
layer, sharded, against the quantized unsharded one (forward output), and forward times.
Rank 0 prints a table and writes DIR/bench_expert_parallel.json.

NVLink multicast stays off (machine policy): the three variables below are set when unset and
never unset.
"""

from __future__ import annotations

import os

for _var in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
    os.environ.setdefault(_var, "0" if _var == "NCCL_NVLS_ENABLE" else "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

# torchrun puts benchmarks/ on sys.path, not the checkout: make `import moeprec` find this checkout
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import moeprec.parallel._dispatch as ep_dispatch  # noqa: E402
from moeprec.args import MoEArgs  # noqa: E402
from moeprec.moe import MoE  # noqa: E402
from moeprec.parallel import expert_parallel  # noqa: E402
from moeprec.parallel._dispatch import all_to_all_rows, plan_dispatch  # noqa: E402

QWEN3_30B_A3B = dict(dim=2048, hidden=768, num_experts=128, top_k=8)
SMOKE = dict(dim=64, hidden=32, num_experts=8, top_k=2)
MULTICAST_ENV = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for bench_expert_parallel.json")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny shape and few iterations (CI, CPU)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per rank (default 8192; smoke 64)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default bf16 (smoke on CPU: fp32)")
    p.add_argument("--quant", choices=("mxfp4", "fp8", "none"), default="mxfp4",
                   help="also check and time quantized inference (forward only) in this format")
    return p.parse_args()


def main():
    a = parse_args()
    shape = SMOKE if a.smoke else QWEN3_30B_A3B
    T = a.tokens or (64 if a.smoke else 8192)
    warmup = a.warmup if a.warmup is not None else (1 if a.smoke else 5)
    iters = a.iters if a.iters is not None else (3 if a.smoke else 20)
    dtype_name = a.dtype or ("fp32" if a.smoke and a.device == "cpu" else "bf16")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]

    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in
                               (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if a.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(minutes=5))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))

    ref = build_layer(shape, dtype, device)
    ep = expert_parallel(copy.deepcopy(ref))
    x = torch.randn(T, shape["dim"], generator=torch.Generator().manual_seed(100 + rank)).to(device, dtype)
    g = torch.randn(T, shape["dim"], generator=torch.Generator().manual_seed(200 + rank)).to(device, dtype)

    checks = check_against_unsharded(ref, ep, x, g, rank)
    timer = Timer(device)
    rows, counts = routed_rows(ep, x)
    timings = {
        "ep_step_ms": timer.step(lambda: fwd_bwd(ep, x, g), warmup, iters),
        "single_device_step_ms": timer.step(lambda: fwd_bwd(ref, x, g), warmup, iters),
        "exchange_only_ms": timer.step(lambda: exchange_only(ep, rows, counts), warmup, iters),
    }
    timings["a2a_in_step_ms"] = timer.a2a_in_step(lambda: fwd_bwd(ep, x, g), warmup, iters)
    timings = {k: max_over_ranks(v, device) for k, v in timings.items()}
    quant = None if a.quant == "none" else quantized_inference(ref, x, a.quant, timer, warmup, iters)

    if rank == 0:
        report(a, shape, T, dtype_name, world, warmup, iters, checks, timings, quant, device)
    dist.barrier()
    dist.destroy_process_group()
    if not checks["ok"] or (quant is not None and not quant["correctness"]["ok"]):
        raise SystemExit(1)


def quantized_inference(ref, x, fmt, timer, warmup, iters):
    """Quantize the full layer, shard it; compare forward outputs and time forward only."""
    qref = copy.deepcopy(ref).quantize_(fmt).eval()
    qep = expert_parallel(copy.deepcopy(qref))

    def fwd(model):
        with torch.no_grad():
            return model(x)

    err = max_over_ranks(relerr(fwd(qep), fwd(qref)), x.device)
    tol = 2e-2  # each weighted row is rounded once more than in the single-device kernel
    timings = {
        "ep_fwd_ms": timer.step(lambda: fwd(qep), warmup, iters),
        "single_device_fwd_ms": timer.step(lambda: fwd(qref), warmup, iters),
        "a2a_in_fwd_ms": timer.a2a_in_step(lambda: fwd(qep), warmup, iters),
    }
    return {
        "format": fmt,
        "correctness": {"rel_l2_err": {"output": err}, "tolerance": tol, "ok": err <= tol},
        "timings_ms": {k: max_over_ranks(v, x.device) for k, v in timings.items()},
    }


def build_layer(shape, dtype, device):
    torch.manual_seed(0)
    args = MoEArgs(num_experts=shape["num_experts"], top_k=shape["top_k"], route_norm=True,
                   load_balance_coeff=1e-3)
    moe = MoE(args, shape["dim"], shape["hidden"])
    moe.init_weights(0.02)
    moe.to(device=device, dtype=dtype)
    # counts and the bias are fp32 buffers: `.to(dtype)` cast them too, put them back
    moe.tokens_per_expert = moe.tokens_per_expert.float()
    moe.expert_bias = moe.expert_bias.float()
    return moe


def fwd_bwd(model, x, g):
    model.zero_grad(set_to_none=True)
    xi = x.detach().requires_grad_(True)
    out = model(xi)
    out.backward(g)
    return out, xi.grad


def routed_rows(ep, x):
    """The expert-sorted rows and per-expert counts the EP layer exchanges for `x`."""
    with torch.no_grad():
        routed = ep.router.route(x, ep.expert_bias)
    rows = x[torch.argsort(routed.selected_experts.reshape(-1), stable=True) // ep.args.top_k]
    return rows, routed.num_tokens_per_expert


def exchange_only(ep, rows, counts):
    """The exchanges of one EP step without the compute: the same counts and row volumes."""
    e = ep._ep
    rows = rows.detach().requires_grad_(True)
    plan = plan_dispatch(counts, e.group, e.world_size)
    recv = all_to_all_rows(rows, plan.output_splits, plan.input_splits, e.group)
    back = all_to_all_rows(recv, plan.input_splits, plan.output_splits, e.group)
    back.backward(torch.ones_like(back))


def relerr(got, want):
    got, want = got.detach().float(), want.detach().float()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def check_against_unsharded(ref, ep, x, g, rank):
    """Relative L2 errors (max over ranks) of EP vs the unsharded layer on this rank's tokens."""
    out_ref, gx_ref = fwd_bwd(ref, x, g)
    out_ep, gx_ep = fwd_bwd(ep, x, g)
    El = ep.experts.w1.shape[0]
    errs = {"output": relerr(out_ep, out_ref), "input_grad": relerr(gx_ep, gx_ref)}
    for name in ("w1", "w2"):
        full = getattr(ref.experts, name).grad.float()
        dist.all_reduce(full)
        errs[f"experts.{name}.grad"] = relerr(getattr(ep.experts, name).grad, full[rank * El:(rank + 1) * El])
    errs["router.grad"] = relerr(ep.router.gate.weight.grad, ref.router.gate.weight.grad)
    errs = {k: max_over_ranks(v, x.device) for k, v in errs.items()}
    tol = 1e-2 if x.dtype == torch.bfloat16 else 1e-5
    return {"rel_l2_err": errs, "tolerance": tol, "ok": all(v <= tol for v in errs.values())}


def max_over_ranks(v, device):
    t = torch.tensor([float(v)], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


class Timer:
    """Per-iteration milliseconds: CUDA events on GPU, wall clock on CPU; ranks start together."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()
        dist.barrier()

    def step(self, fn, warmup, iters):
        for _ in range(warmup):
            fn()
        self._sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e3 / iters

    def a2a_in_step(self, fn, warmup, iters):
        """Time spent inside the token all-to-alls of real steps (events around each call)."""
        inner = ep_dispatch._all_to_all
        spans = []

        def timed(*args):
            if self.cuda:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                out = inner(*args)
                e.record()
                spans.append((s, e))
                return out
            t0 = time.perf_counter()
            out = inner(*args)
            spans.append((t0, time.perf_counter()))
            return out

        for _ in range(warmup):
            fn()
        self._sync()
        ep_dispatch._all_to_all = timed
        try:
            for _ in range(iters):
                fn()
        finally:
            ep_dispatch._all_to_all = inner
        self._sync()
        if self.cuda:
            total = sum(s.elapsed_time(e) for s, e in spans)
        else:
            total = sum(e - s for s, e in spans) * 1e3
        return total / iters


def report(a, shape, T, dtype_name, world, warmup, iters, checks, timings, quant, device):
    elt = 2 if dtype_name == "bf16" else 4
    # per rank per step: T*k rows of D elements leave in the dispatch and come back in the combine,
    # forward and backward (a fraction (W-1)/W of them crosses to another rank on average)
    a2a_bytes = 4 * T * shape["top_k"] * shape["dim"] * elt
    step, a2a = timings["ep_step_ms"], timings["a2a_in_step_ms"]
    result = {
        "benchmark": "expert_parallel",
        "shape": {**shape, "tokens_per_rank": T, "dtype": dtype_name},
        "world_size": world,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "backend": dist.get_backend(),
        "torch": torch.__version__,
        "env": {k: os.environ.get(k) for k in MULTICAST_ENV},
        "warmup": warmup,
        "iters": iters,
        "smoke": a.smoke,
        "correctness": checks,
        "timings_ms": timings,
        "a2a_share_of_step": a2a / step if step > 0 else None,
        "a2a_bytes_per_rank_per_step": a2a_bytes,
        "a2a_algbw_GBps": a2a_bytes / (a2a * 1e-3) / 1e9 if a2a > 0 else None,
        "exchange_only_algbw_GBps": (
            a2a_bytes / (timings["exchange_only_ms"] * 1e-3) / 1e9 if timings["exchange_only_ms"] > 0 else None
        ),
        "quantized_inference": quant,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_expert_parallel.json").write_text(json.dumps(result, indent=2))

    print(f"expert parallel: {world} x {result['device']} ({result['backend']}), D={shape['dim']} "
          f"I={shape['hidden']} E={shape['num_experts']} k={shape['top_k']} {dtype_name}, "
          f"T={T} tokens/rank")
    print(f"correctness vs unsharded (rel L2, tol {checks['tolerance']:g}): "
          + ", ".join(f"{k} {v:.2e}" for k, v in checks["rel_l2_err"].items())
          + ("  OK" if checks["ok"] else "  FAILED"))
    rows = [
        ("EP step (fwd+bwd)", step, ""),
        ("  token all-to-alls inside it", a2a,
         f"{100 * result['a2a_share_of_step']:.1f}% of step, {result['a2a_algbw_GBps']:.3g} GB/s algbw"),
        ("exchanges only (counts + 4 a2a)", timings["exchange_only_ms"],
         f"{result['exchange_only_algbw_GBps']:.3g} GB/s algbw"),
        ("unsharded layer, same T, 1 device", timings["single_device_step_ms"], ""),
    ]
    print(f"{'what':<36}{'ms':>10}  note")
    if quant is not None:
        q = quant["timings_ms"]
        qerr = quant["correctness"]["rel_l2_err"]["output"]
        rows += [
            (f"{quant['format']} inference EP fwd", q["ep_fwd_ms"],
             f"rel L2 err {qerr:.2e} vs unsharded ({'OK' if quant['correctness']['ok'] else 'FAILED'})"),
            ("  token all-to-alls inside it", q["a2a_in_fwd_ms"],
             f"{100 * q['a2a_in_fwd_ms'] / q['ep_fwd_ms']:.1f}% of fwd" if q["ep_fwd_ms"] > 0 else ""),
            (f"{quant['format']} unsharded fwd, 1 device", q["single_device_fwd_ms"], ""),
        ]
    for name, ms, note in rows:
        print(f"{name:<36}{ms:>10.3f}  {note}")
    print(f"a2a bytes per rank per step: {a2a_bytes / 2**20:.1f} MiB "
          f"(2 x k x D x {elt} B per token forward, same again backward)")
    print(f"wrote {out / 'bench_expert_parallel.json'}")


if __name__ == "__main__":
    main()
