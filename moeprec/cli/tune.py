"""`moeprec tune`: search launch configurations of the fused MoE kernels on this GPU.

For each (shape, path, M) it times candidate configurations (coordinate search per BLOCK_M,
1 = CUDA-core decode blocks, else tensor-core tiles: stage 1's tile with stage 2 fixed, then
stage 2's; then MXFP4's decode per stage, the combine, stage 2's K splits, decoding MXFP4
first, the fp8 quantization placement, and weight tiles through TMA per stage) and
merges the fastest into `moeprec/configs/fused_moe_<device>.json` (or --out), the file
`tuning.get_config` reads. Points are visited in the given order until --budget-s runs out;
what was found so far is always written. With --refine a point starts from the table's own
entry and only the per-flag steps run (the decode blocks' TMA ring among them); a change is
kept only if it beats that entry again in an alternating rematch (by 1% and 1 us).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

from moeprec.cli.bench import (
    PATHS,
    SHAPES,
    _as_graphs,
    _median_ms,
    make_inputs,
    make_weights,
    parse_selection,
)

# bench path name -> kernel path name (tuning.PATHS)
KERNEL_PATH = {"bf16": "bf16", "mxfp4-w4a16": "w4a16", "mxfp4-fp8": "w4a8", "fp8": "fp8"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument("--M", default="1,4,16,64,256,1024,4096,16384")
    p.add_argument("--out", default=None, help="JSON to merge into (default: the packaged file)")
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--budget-s", type=float, default=600.0, help="stop after this many seconds")
    p.add_argument("--log", default=None, help="append every timing (JSON lines) here")
    p.add_argument("--refine", action="store_true",
                   help="start from the table's entry and try only the per-flag steps (no tile "
                        "search): a quick re-tune after a new kernel option")


def _stage_candidates(bm: int) -> list[dict[str, int]]:
    if bm <= 32:
        shapes = [(32, 128, 4, 4), (64, 128, 4, 4), (32, 256, 4, 3), (64, 256, 4, 3), (128, 128, 4, 3)]
        g = 1
    elif bm == 64:
        shapes = [(64, 64, 4, 4), (128, 64, 4, 4), (128, 64, 8, 3), (64, 128, 4, 3), (128, 128, 8, 3)]
        g = 4
    else:
        # (256, 64, 8, 4): the best stage 2 alone at Qwen3 / gpt-oss M = 4096 on the H200
        # (benchmarks/probes/stage_configs.py, 2026-12-03)
        shapes = [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4), (128, 128, 8, 3),
                  (256, 64, 8, 3), (256, 64, 8, 4)]
        g = 8
    return [{"BLOCK_N": n, "BLOCK_K": k, "GROUP_M": g, "num_warps": w, "num_stages": s}
            for n, k, w, s in shapes]


def _gemv_stage_candidates(stage: str) -> list[dict[str, Any]]:
    """Settings for BLOCK_M = 1 (CUDA cores: no tensor-core tile or pipeline to fit)."""
    shapes = [(16, 256, 4, 2), (32, 256, 4, 2), (8, 256, 4, 2), (16, 256, 8, 2), (32, 128, 4, 2),
              (16, 512, 4, 2), (64, 256, 4, 2)]  # (the tensor-core blocks like more rows)
    cands = [{"BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 1, "num_warps": w, "num_stages": s}
             for n, k, w, s in shapes]
    if stage == "s2":  # K splits: more programs for the few output tiles of small batches
        cands += [dict(cands[1], split_k=2), dict(cands[0], split_k=4), dict(cands[6], split_k=2)]
    return cands


def _block_m_candidates(kpath: str, M: int, E: int, k: int) -> list[int]:
    """BLOCK_M values to search: 1 (one (token, expert) pair per block, CUDA cores) for decode
    sizes with 16-bit activations, then tensor-core block sizes by tokens per expert."""
    per_expert = M * k / E
    if per_expert <= 4:
        return ([1] if kpath in ("bf16", "w4a16", "w8a16") else []) + [16]
    if per_expert <= 24:
        return [16, 32]
    if per_expert <= 96:
        return [32, 64]
    return [64, 128]


# the Gluon decode blocks' TMA ring: (steps, registers per thread). The register cap sets
# programs per SM (8 warps each with the producer's padded warpgroup): 80 -> 3, 64 -> 4, 48 -> 5;
# the consumer warps keep 136 / 104 / 72 of them (sm_90 compile, 2026-12-04)
RING_CANDIDATES = ((2, 64), (3, 64), (2, 80), (4, 80), (2, 48))


def tune_point(shape: str, path: str, M: int, weights: dict, reps: int, log,
               refine: bool = False) -> dict[str, Any]:
    import torch

    from moeprec.kernels.fused_moe_triton import fused_moe_triton_impl, use_dot_scaled
    from moeprec.kernels.tuning import DEQUANT_PLAIN_PATH, default_config, fix_config, get_config

    H, I, E, k = SHAPES[shape]  # noqa: E741
    quant, act = PATHS[path]
    kpath = KERNEL_PATH[path]
    inputs = make_inputs(M, H, E, k, 2, seed=7)
    wkw = {n: t for n, t in weights.items() if n not in ("w1", "w2")}
    graphed = M <= 256

    def timed(cfg):
        cfg = fix_config(cfg, kpath)
        fns = [lambda a=a: fused_moe_triton_impl(a[0], weights["w1"], weights["w2"], a[1], a[2],
                                                 quant=quant, act_dtype=act, config=cfg, **wkw)
               for a in inputs]
        try:
            ms = _median_ms(_as_graphs(fns) if graphed else fns, reps)
        except Exception as exc:  # noqa: BLE001 (a config the compiler rejects is just slow)
            ms = float("inf")
            print(f"  config failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        if log:
            log.write(json.dumps({"shape": shape, "path": path, "M": M, "ms": ms, "cfg": cfg}) + "\n")
        return ms, cfg

    if refine:  # the table's entry (or the heuristic) as it is, then the flag steps below
        base = get_config(kpath, M, E, H, I, k, torch.cuda.get_device_name())
    else:
        base = default_config(kpath, M, E, H, I, k)
    best_ms, best = timed(base)
    default_ms = best_ms

    def offer(cand):  # time cand; it becomes the best if faster
        nonlocal best_ms, best
        ms, cfg = timed(cand)
        if ms < best_ms:
            best_ms, best = ms, cfg

    for bm in [] if refine else _block_m_candidates(kpath, M, E, k):
        cands = {st: _gemv_stage_candidates(st) if bm == 1 else _stage_candidates(bm)
                 for st in ("s1", "s2")}
        cur = dict(best, BLOCK_M=bm)
        if bm != best["BLOCK_M"]:
            cur["s1"], cur["s2"] = cands["s1"][0], cands["s2"][0]
        cur_ms, cur = timed(cur)
        for st in ("s1", "s2"):
            for c in cands[st]:
                ms, cfg = timed(dict(cur, **{st: c}))
                if ms < cur_ms:
                    cur_ms, cur = ms, cfg
        if bm == 1:  # with and without the alignment launch (blocks of one flat slot)
            ms, cfg = timed(dict(cur, pair_blocks=not cur.get("pair_blocks", True)))
            if ms < cur_ms:
                cur_ms, cur = ms, cfg
        if cur_ms < best_ms:
            best_ms, best = cur_ms, cur
    if kpath == "w4a16" and best["BLOCK_M"] == 1:  # MXFP4 decode blocks on the tensor cores
        # (Gluon, where a stage fits) or the CUDA cores, per stage
        for stages in (("s1",), ("s2",), ("s1", "s2")):
            cand = dict(best, **{st: dict(best[st], mma=not best[st].get("mma", False))
                                 for st in stages})
            offer(cand)
        for st in ("s1", "s2"):  # their weights through a TMA ring, per stage (where it runs;
            # a stage left on the CUDA cores gets the Gluon blocks with the ring too)
            for ring, maxnreg in RING_CANDIDATES:
                cand = dict(best[st], mma=True, ring=ring, maxnreg=maxnreg)
                offer(dict(best, **{st: cand}))
            if best[st].get("ring"):  # the ring changes programs per SM: rows per program
                # again; and longer steps (the consumer warps meet at two barriers per step)
                bn, bk = best[st]["BLOCK_N"], best[st]["BLOCK_K"]
                for over in ({"BLOCK_N": bn // 2}, {"BLOCK_N": bn * 2}, {"BLOCK_K": bk * 2}):
                    if 16 <= over.get("BLOCK_N", bn) <= 128 and over.get("BLOCK_K", bk) <= 512:
                        offer(dict(best, **{st: dict(best[st], **over)}))
    if kpath == "w4a16" and best["BLOCK_M"] != 1:  # MXFP4 tiles: the explicit bf16-pair
        # decode or tl.dot_scaled, per stage
        for stages in (("s1",), ("s2",), ("s1", "s2")):  # each flipped from the op's own choice
            cand = dict(best, **{st: dict(best[st], dot_scaled=not use_dot_scaled(
                torch.bfloat16, False, best[st], False)) for st in stages})
            offer(cand)
    if best["BLOCK_M"] != 1 and M * k >= 64 * E:  # prefill tiles: stage 2 storing slot rows
        # summed per token afterwards, instead of fp32 atomics (k adds per output element)
        offer(dict(best, atomic=not best.get("atomic", True)))
    if best["BLOCK_M"] != 1 and best.get("atomic", True):  # tiles: stage 2 split along K
        for split_k in (2, 4):
            offer(dict(best, s2=dict(best["s2"], split_k=split_k)))
    if kpath in DEQUANT_PLAIN_PATH and M * k > 96 * E:  # MXFP4 decoded first, then the plain
        # kernels: at this search's best tile, and at the plain path's own (table or heuristic)
        plain = get_config(DEQUANT_PLAIN_PATH[kpath], M, E, H, I, k, torch.cuda.get_device_name())
        for cand in (dict(best, dequant=True), dict(plain, dequant=True)):
            offer(cand)
    if act == "fp8":
        offer(dict(best, fuse_quant=not best.get("fuse_quant", True)))
    for st in ("s1", "s2"):  # plain / fp8 weight tiles through TMA or pointer loads
        cand = dict(best, **{st: dict(best[st], tma_b=not best[st].get("tma_b"))})
        if fix_config(cand, kpath)[st]["tma_b"] == best[st].get("tma_b", False):
            continue  # fix_config drops the flag here (decode blocks, MXFP4 tiles): nothing to time
        offer(cand)
    if graphed:  # short calls: stage 2 as a programmatic dependent launch of stage 1
        offer(dict(best, pdl=not best.get("pdl", False)))
    if refine and best != fix_config(base, kpath):  # a refinement must beat the entry it
        # started from in a fair rematch
        best_ms, best = confirm_against_start(timed, base, best)
    torch.cuda.synchronize()
    return {"config": best, "ms": best_ms, "default_ms": default_ms}


def confirm_against_start(timed, start: dict, best: dict, rounds: int = 3,
                          margin: float = 0.01, margin_ms: float = 1e-3) -> tuple[float, dict]:
    """Time the starting config and the search's best alternately `rounds` times each; the best
    stands only if its median beats the start's by `margin` and by `margin_ms`. (The start is
    timed first in a search, straight after compiling, and at decode sizes one timing can run
    20% slow: on the H200 a refined Qwen3-30B-A3B M = 1 entry timed 21.9 us, then 18.2 us
    unchanged; a later rematch there passed a 0.5 us (2%) change among single timings spread
    over 18.9-22.7 us, 2026-12-04: hence the microsecond too.)"""
    times: dict[str, list[float]] = {"start": [], "best": []}
    for _ in range(rounds):
        ms, start = timed(start)  # (timed returns the config as fixed for the kernels)
        times["start"].append(ms)
        ms, best = timed(best)
        times["best"].append(ms)
    start_ms, new_ms = (statistics.median(times[n]) for n in ("start", "best"))
    wins = new_ms < start_ms * (1 - margin) and start_ms - new_ms >= margin_ms
    return (new_ms, best) if wins else (start_ms, start)


def run(args: argparse.Namespace) -> int:
    import torch

    from moeprec.kernels.tuning import device_file_name, shape_key

    shapes, paths, ms_list = parse_selection(args)
    if not torch.cuda.is_available():
        print("moeprec tune: needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    out = args.out or os.path.join(os.path.dirname(__file__), "..", "configs", device_file_name(device))
    table: dict[str, Any] = {}
    if os.path.exists(out):
        with open(out) as f:
            table = json.load(f)
    table["_comment"] = ("fused_moe launch configurations for " + device + ", written by "
                         "`moeprec tune` (path -> shape -> M -> config); see moeprec/kernels/tuning.py")
    log = open(args.log, "a") if args.log else None
    t0 = time.time()
    done = 0
    for shape in shapes:
        H, I, E, k = SHAPES[shape]  # noqa: E741
        for path in paths:
            if time.time() - t0 > args.budget_s:
                break
            weights = make_weights(path, H, I, E)
            for M in ms_list:
                if time.time() - t0 > args.budget_s:
                    print(f"budget spent: stopping before {shape} {path} M={M}", flush=True)
                    break
                r = tune_point(shape, path, M, weights, args.reps, log, refine=args.refine)
                done += 1
                entry = table.setdefault(KERNEL_PATH[path], {}).setdefault(shape_key(E, H, I, k), {})
                entry[str(M)] = r["config"]
                print(f"{shape:<14}{path:<12}M={M:<6} {'table' if args.refine else 'default'} "
                      f"{r['default_ms'] * 1e3:9.1f} us -> "
                      f"tuned {r['ms'] * 1e3:9.1f} us  ({time.time() - t0:.0f}s)", flush=True)
                with open(out, "w") as f:  # after every point: a cut-off run keeps its results
                    json.dump(table, f, indent=1, sort_keys=True)
            del weights
            torch.cuda.empty_cache()
    if log:
        log.close()
    print(f"tuned {done} points -> {out}")
    return 0
