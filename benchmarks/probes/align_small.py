"""Probe: the one-program block alignment of decode batches, GPU time per launch.

    python3 benchmarks/probes/align_small.py [--out DIR]

For slot counts of decode (M x k of the bench shapes at M = 1 and 4) and each expert count:
`_align_kernel` as the op launches it (ONE_CHUNK: the ids in one tile of the next power of two,
loaded and one-hot encoded once) against its two-pass form with 64-slot tiles (the launch before
2026-12-04). CUDA-graph replays queued behind a sleep kernel (`_timing.queued_us`), so the
host's launch rate does not show; a graph of one empty launch costs ~2.9 us on the H200
(graph_overhead.py), included in both.
"""
import argparse

import torch
from _timing import queued_us, save_rows  # noqa: E402 (this folder)

from moeprec.cli.bench import _as_graphs
from moeprec.kernels import _fused_moe_kernels as K
from moeprec.kernels._grid import next_power_of_2
from moeprec.kernels.fused_moe_triton import max_blocks

ap = argparse.ArgumentParser()
ap.add_argument("--out", default=None)
args = ap.parse_args()
rows = []
for E, k, bm in ((128, 8, 16), (256, 8, 16), (32, 4, 16), (8, 2, 16)):
    for M in (1, 4):
        S = M * k
        ids = torch.randint(0, E, (S,), device="cuda", dtype=torch.int32)
        nb = max_blocks(S, E, bm)
        sorted_ids = torch.empty(nb * bm, dtype=torch.int32, device="cuda")
        expert_ids = torch.empty(nb, dtype=torch.int32, device="cuda")
        e_pad = next_power_of_2(E)
        chunk = max(16, min(64, 16384 // e_pad))
        res = {}
        for name, one, ch in (("two passes", False, chunk),
                              ("one tile", True, max(16, next_power_of_2(S)))):
            def f(one=one, ch=ch):
                K._align_kernel[(1,)](ids, ids, sorted_ids, expert_ids, S, E, nb, HAS_MASK=False,
                                      BLOCK_M=bm, E_PAD=e_pad, CHUNK=ch, ONE_CHUNK=one,
                                      num_warps=4 if e_pad <= 64 else 8)
            res[name] = queued_us(_as_graphs([f]))
            res[name + " ids"] = sorted_ids.clone()
        same = torch.equal(res["two passes ids"], res["one tile ids"])
        print(f"E={E:<4} slots={S:<3} two passes {res['two passes']:5.2f} us  one tile "
              f"{res['one tile']:5.2f} us  same layout {same}", flush=True)
        rows.append({"E": E, "slots": S, "two_passes_us": res["two passes"],
                     "one_tile_us": res["one tile"], "same": same})
save_rows(args.out, "align_small.json", rows)
