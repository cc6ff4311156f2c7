"""Quantizer bandwidth: MXFP4 (each scale mode) and FP8 (per_token, block) vs device copy.

The quantizers are memory-bound: each reads the input once and writes the codes and scales.
Achieved GB/s = (bytes read + bytes written) / time, reported against the device-to-device copy
bandwidth measured in the same run (a copy of the same input: read + write). Target: the Triton
kernels reach >= 70% of copy bandwidth on a 16384 x 7168 bf16 tensor. Each Triton result is
also checked byte-for-byte against the torch reference on the same input.

  python benchmarks/bench_quant.py --out benchmarks/results/quant        # GPU
  python benchmarks/bench_quant.py --smoke --out /tmp/quant              # CPU, tiny, interpreter
  python benchmarks/bench_quant.py --sweep --out benchmarks/results/quant   # + launch-parameter sweep

--sweep also times alternative tile sizes / warp counts (moeprec.kernels.quantize.LAUNCH) for
one MXFP4 mode and both FP8 cases, and reports the fastest: copy the winner into LAUNCH.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():  # the Triton kernels run in the interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moeprec.formats.fp8 import quantize_fp8  # noqa: E402
from moeprec.formats.mxfp4 import MX_BLOCK, SCALE_MODES, quantize_mxfp4  # noqa: E402

TARGET_FRACTION = 0.70
FULL_SHAPE = (16384, 7168)
SMOKE_SHAPE = (64, 256)
FP8_BLOCK = 128


def _cases():
    """name -> (fn(x, backend) -> outputs, bytes written per input element and per row)."""
    cases = {}
    for mode in SCALE_MODES:
        cases[f"mxfp4_{mode}"] = (
            lambda x, b, m=mode: quantize_mxfp4(x, m, backend=b),
            lambda r, k: r * (k // 2 + k // MX_BLOCK),
        )
    cases["fp8_per_token"] = (
        lambda x, b: quantize_fp8(x, "per_token", backend=b),
        lambda r, k: r * (k + 4),
    )
    cases["fp8_block"] = (
        lambda x, b: quantize_fp8(x, "block", FP8_BLOCK, backend=b),
        lambda r, k: r * (k + 4 * -(-k // FP8_BLOCK)),
    )
    return cases


def _time_ms(fn, device: torch.device, iters: int) -> float:
    """Median milliseconds of fn() (after warm-up)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=max(iters, 20), return_mode="median"))
    fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _same(a, b) -> bool:
    """Same bytes (fp8 NaN matched by NaN), for the outputs of one quantizer."""
    for x, y in zip(a, b):
        if x.dtype == torch.float8_e4m3fn:
            x, y = x.view(torch.uint8), y.view(torch.uint8)
        if x.dtype == torch.float32:
            x, y = x.nan_to_num(), y.nan_to_num()
        if not torch.equal(x, y):
            return False
    return True


def run(shape, device: torch.device, iters: int, with_torch: bool) -> dict:
    r, k = shape
    x = torch.randn(r, k, device=device, dtype=torch.bfloat16)
    in_bytes = x.numel() * x.element_size()
    dst = torch.empty_like(x)
    copy_ms = _time_ms(lambda: dst.copy_(x), device, iters)
    copy_gbs = 2 * in_bytes / copy_ms / 1e6
    rows = []
    for name, (fn, out_bytes) in _cases().items():
        moved = in_bytes + out_bytes(r, k)
        ref = fn(x, "torch")
        got = fn(x, "triton")
        row = {"name": name, "bytes": moved, "matches_torch": _same(got, ref)}
        for backend in ("triton", "torch") if with_torch else ("triton",):
            ms = _time_ms(lambda b=backend: fn(x, b), device, iters)
            gbs = moved / ms / 1e6
            row[backend] = {"ms": ms, "gb_s": gbs, "fraction_of_copy": gbs / copy_gbs}
        row["meets_target"] = row["triton"]["fraction_of_copy"] >= TARGET_FRACTION
        rows.append(row)
        del ref, got
    return {"copy": {"ms": copy_ms, "gb_s": copy_gbs, "bytes": 2 * in_bytes}, "results": rows}


# alternatives timed by --sweep (each a partial update of moeprec.kernels.quantize.LAUNCH)
SWEEP_MX = [
    {"mx_blocks": nb, "mx_warps": w}
    for nb, w in ((64, 2), (64, 4), (128, 4), (128, 8), (256, 4), (256, 8), (512, 8), (512, 16), (1024, 16))
]
SWEEP_FP8 = [{"fp8_tile": t, "fp8_warps": w} for t in (4096, 8192, 16384) for w in (4, 8, 16)]
SWEEP_FP8_BLOCK = [{"fp8_tile": t, "fp8_block_warps": w} for t in (4096, 8192, 16384) for w in (4, 8, 16)]


def sweep(shape, device: torch.device, iters: int) -> list[dict]:
    """Time each launch alternative (bytes checked against the torch reference each time)."""
    from moeprec.kernels import quantize as kq

    r, k = shape
    x = torch.randn(r, k, device=device, dtype=torch.bfloat16)
    cases = _cases()
    default = dict(kq.LAUNCH)
    rows = []
    try:
        for name, options in (("mxfp4_rceil", SWEEP_MX), ("fp8_per_token", SWEEP_FP8), ("fp8_block", SWEEP_FP8_BLOCK)):
            fn, out_bytes = cases[name]
            moved = x.numel() * x.element_size() + out_bytes(r, k)
            ref = fn(x, "torch")
            for opt in options:
                kq.LAUNCH.update(default)
                kq.LAUNCH.update(opt)
                ok = _same(fn(x, "triton"), ref)
                ms = _time_ms(lambda: fn(x, "triton"), device, iters)
                rows.append({"name": name, "launch": dict(opt), "ms": ms, "gb_s": moved / ms / 1e6, "matches_torch": ok})
    finally:
        kq.LAUNCH.clear()
        kq.LAUNCH.update(default)
    return rows


def _device_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["triton_interpret"] = os.environ.get("TRITON_INTERPRET")
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for bench_quant.json")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run (kernels interpreted)")
    ap.add_argument("--iters", type=int, default=None, help="CPU: timed calls; GPU: ms of repetitions")
    ap.add_argument("--no-torch", action="store_true", help="skip timing the torch reference")
    ap.add_argument("--sweep", action="store_true", help="also time alternative launch parameters")
    args = ap.parse_args(argv)

    if args.smoke:
        device, shape, iters = torch.device("cpu"), SMOKE_SHAPE, args.iters or 2
    else:
        if not torch.cuda.is_available():
            ap.error("needs a CUDA device (use --smoke for a CPU check)")
        device, shape, iters = torch.device("cuda"), FULL_SHAPE, args.iters or 100  # rep in ms
    res = run(shape, device, iters, with_torch=not args.no_torch)
    if args.sweep:
        from moeprec.kernels.quantize import LAUNCH

        res["launch_default"] = dict(LAUNCH)
        res["sweep"] = sweep(shape, device, iters)
    report = {
        "benchmark": "quant",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python3 benchmarks/bench_quant.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "shape": list(shape),
        "dtype": "bfloat16",
        "target_fraction_of_copy": TARGET_FRACTION,
        **_device_info(device),
        **res,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_quant.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)

    c = res["copy"]
    print(f"{report.get('gpu', device)}  input {shape[0]}x{shape[1]} bf16  "
          f"copy {c['gb_s']:.0f} GB/s ({c['ms']:.3f} ms)")
    head = f"{'quantizer':<16}{'MB moved':>10}{'triton ms':>11}{'GB/s':>9}{'% copy':>8}{'torch ms':>10}  ok"
    print(head)
    print("-" * len(head))
    for row in res["results"]:
        t = row["triton"]
        torch_ms = f"{row['torch']['ms']:10.3f}" if "torch" in row else f"{'-':>10}"
        flag = ("match" if row["matches_torch"] else "MISMATCH") + ("" if row["meets_target"] else " <70%")
        print(f"{row['name']:<16}{row['bytes'] / 1e6:>10.2f}{t['ms']:>11.3f}{t['gb_s']:>9.0f}"
              f"{100 * t['fraction_of_copy']:>7.0f}%{torch_ms}  {flag}")
    if args.sweep:
        print(f"\nlaunch sweep (default {res['launch_default']}); copy {c['gb_s']:.0f} GB/s")
        for name in dict.fromkeys(row["name"] for row in res["sweep"]):
            rows = sorted((row for row in res["sweep"] if row["name"] == name), key=lambda row: row["ms"])
            for i, row in enumerate(rows):
                mark = "best" if i == 0 else ""
                ok = "" if row["matches_torch"] else " MISMATCH"
                print(f"  {name:<14} {str(row['launch']):<55} {row['ms']:8.3f} ms {row['gb_s']:7.0f} GB/s "
                      f"{100 * row['gb_s'] / c['gb_s']:4.0f}% {mark}{ok}")
    print(f"wrote {path}")
    rows = res["results"] + res.get("sweep", [])
    return 0 if all(r["matches_torch"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
