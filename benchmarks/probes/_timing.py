"""Timing helpers shared by the probes (run them as `python3 benchmarks/probes/<name>.py`)."""
import time

import torch


def host_us(f, n=50):
    """CPU wall time per call over n back-to-back calls, stopped before the final sync."""
    for _ in range(5):
        f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def graph_us(f, n=20):
    """GPU time per call: f captured once in a CUDA graph, replayed n times."""
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        f()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g.replay()
    start.record()
    for _ in range(n):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n * 1e3


def queued_us(replays, reps=200):
    """GPU time per replay of CUDA graph replays (callables, rotated) queued back to back behind
    a ~10-20 ms sleep kernel, so that the host's replay rate does not show (median)."""
    torch.cuda._sleep(20_000_000)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(reps + 1)]
    ev[0].record()
    for i, e in enumerate(ev[1:]):
        replays[i % len(replays)]()
        e.record()
    torch.cuda.synchronize()
    gaps = sorted(a.elapsed_time(b) * 1e3 for a, b in zip(ev, ev[1:]))
    return gaps[len(gaps) // 2]


def rel_diff(out, ref):
    """Largest |out - ref| relative to max |ref| (summation-order differences show as ~1e-3)."""
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def save_rows(out_dir, name, rows):
    """Probe rows as JSON under out_dir (no-op without one), with the device and torch version."""
    import json
    import os

    if not out_dir:
        return
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "rows": rows}, f, indent=1)
