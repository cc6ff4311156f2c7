"""Probe: where the three-launch alignment's place launch spends its GPU time.

    python3 benchmarks/probes/align_place.py [--out DIR]

On the H200 (2026-12-03 14:32 UTC, results README) the place launch took 60 us at 131072 slots
with 128 or 256 experts (Qwen3-30B-A3B / DeepSeek-V3 at M = 16384) against 9-16 us for the count
launch over the same chunks, and ranking slots pairwise instead of by a cumsum did not change
it. Here, for routed ids of those shapes (and M = 4096): (1) the place launch with parts
switched off (each of 2048 programs recomputes the block layout; program 0 writes the pads; each
writes its share of block owners; each places its chunk), from the same count / scan results;
(2) the whole three-launch alignment with other chunk sizes and warp counts, its layout checked
against `fused_moe_triton._align`. GPU time: the launches captured in a CUDA graph, mean of 20
replays (the 16:26 UTC run timed each call between CUDA events, host launch time included).
"""
import argparse

import torch
import triton
import triton.language as tl
from _timing import graph_us, save_rows  # noqa: E402 (this folder)

from moeprec.kernels import _fused_moe_kernels as K
from moeprec.kernels import fused_moe_triton as F
from moeprec.kernels._grid import cdiv, next_power_of_2

ap = argparse.ArgumentParser()
ap.add_argument("--out", default=None)
args = ap.parse_args()


@triton.jit
def _place_parts_kernel(topk_ids_ptr, expert_mask_ptr, chunk_base_ptr, totals_ptr,
                        sorted_ids_ptr, expert_ids_ptr, num_slots, num_experts, max_blocks,
                        blocks_per_chunk, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr,
                        E_PAD: tl.constexpr, CHUNK: tl.constexpr, PADS: tl.constexpr,
                        OWNERS: tl.constexpr, PLACE: tl.constexpr):
    """`_align_place_kernel` with each part behind a switch (the layout is always computed)."""
    c = tl.program_id(0)
    counts = tl.load(totals_ptr + tl.arange(0, E_PAD))
    padded, ends, starts, total = K._block_layout(counts, BLOCK_M)
    if PADS:
        if c == 0:
            K._write_pads(sorted_ids_ptr, counts, padded, starts, num_slots, BLOCK_M)
    if OWNERS:
        b_lo = c * blocks_per_chunk
        K._write_block_owners(expert_ids_ptr, ends, total, b_lo,
                              tl.minimum(b_lo + blocks_per_chunk, max_blocks), BLOCK_M, CHUNK)
    if PLACE:
        offs = c * CHUNK + tl.arange(0, CHUNK)
        base = tl.load(chunk_base_ptr + c * E_PAD + tl.arange(0, E_PAD)) + starts
        K._place_chunk(topk_ids_ptr, expert_mask_ptr, sorted_ids_ptr, offs, base, num_slots,
                       num_experts, HAS_MASK, E_PAD)
    if not (PADS or OWNERS or PLACE):  # keep the layout from being optimized away
        tl.store(expert_ids_ptr + c, total + tl.sum(starts, axis=0))


def align(ids, E, bm, chunk, warps):
    """`fused_moe_triton._align`'s three launches (no mask) with this chunk and warps, as a
    callable writing into fresh buffers; with them, the result of one call."""
    nb = F.max_blocks(ids.numel(), E, bm)
    sorted_ids = torch.empty(nb * bm, dtype=torch.int32, device=ids.device)
    expert_ids = torch.empty(nb, dtype=torch.int32, device=ids.device)

    def run():
        return F._align_launches(ids, ids, False, E, bm, sorted_ids, expert_ids, chunk, warps)

    totals, chunk_base = run()
    return run, sorted_ids, expert_ids, totals, chunk_base, chunk_base.shape[0], nb


rows = []
for shape, E, k in (("qwen3-30b-a3b", 128, 8), ("deepseek-v3", 256, 8)):
    for M in (4096, 16384):
        g = torch.Generator(device="cuda").manual_seed(M)
        ids = torch.rand(M, E, device="cuda", generator=g).topk(k, dim=1).indices.to(torch.int32)
        flat = ids.reshape(-1)
        bm = 128
        ref = F._align(ids, E, bm, None)
        used = int((ref.expert_ids >= 0).sum())
        default_chunk, default_warps = F._align_chunk_launch(next_power_of_2(E))
        # (1) the place launch by parts, timed alone after one full run
        run, sorted_ids, expert_ids, totals, chunk_base, n_chunks, nb = align(
            flat, E, bm, default_chunk, default_warps)
        e_pad = next_power_of_2(E)
        for parts in ((1, 1, 1), (0, 1, 1), (1, 0, 1), (1, 1, 0), (0, 0, 1), (0, 0, 0)):
            # the place launch alone, from the count and scan results of that one call (it
            # reads them and writes only the outputs)
            us = graph_us(lambda p=parts: _place_parts_kernel[(n_chunks,)](
                flat, sorted_ids, chunk_base, totals, sorted_ids, expert_ids, flat.numel(), E,
                nb, cdiv(nb, n_chunks), HAS_MASK=False, BLOCK_M=bm, E_PAD=e_pad,
                CHUNK=default_chunk, PADS=p[0], OWNERS=p[1], PLACE=p[2],
                num_warps=default_warps))
            label = "place: " + (", ".join(n for n, on in zip(("pads", "owners", "place"), parts)
                                           if on) or "layout only")
            print(f"{shape:<14} M={M:<6} {label:<34} {us:7.1f} us", flush=True)
            rows.append({"shape": shape, "M": M, "variant": label, "us": us})
        # (2) the whole alignment with other chunk sizes / warps, layout checked
        for chunk in (16, 32, 64, 128, 256):
            for warps in (4, 8):
                run, sorted_ids, expert_ids, *_ = align(flat, E, bm, chunk, warps)
                same = (torch.equal(expert_ids, ref.expert_ids)
                        and torch.equal(sorted_ids[: used * bm], ref.sorted_ids[: used * bm]))
                us = graph_us(run)
                label = f"align chunk {chunk} warps {warps}"
                print(f"{shape:<14} M={M:<6} {label:<34} {us:7.1f} us  same {same}", flush=True)
                rows.append({"shape": shape, "M": M, "variant": label, "us": us, "same": same})
save_rows(args.out, "align_place.json", rows)
