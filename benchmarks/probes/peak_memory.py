"""Peak memory growth of a block of code, for the probes: on CUDA from the caching allocator's
peak, on CPU from the process's peak RSS (large blocks go back to the OS when freed, so that
peak is the live set at its largest; it only ever grows, so measure one thing per process)."""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager

import torch


@contextmanager
def peak_growth(device: torch.device):
    """with peak_growth(dev) as r: ... ; then r["mib"] and r["s"] hold the growth and the time."""
    r: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.max_memory_allocated(device)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    yield r
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    r["s"] = time.perf_counter() - t0
    r["mib"] = (peak - base) / 2**20
