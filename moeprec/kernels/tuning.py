"""Launch configurations of the fused MoE kernels: tuned data files first, a heuristic otherwise.

Data lives in `moeprec/configs/fused_moe_<device>.json` (device = torch.cuda.get_device_name()
with spaces and slashes turned into underscores), written by `moeprec tune`:

    {"<path>": {"E=128,H=2048,I=768,k=8": {"<M>": <config>, ...}, ...}, ...}

A config is {"BLOCK_M": int, "atomic": bool, "fuse_quant": bool, "s1": {...}, "s2": {...}},
each stage holding BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages and optionally
"dot_scaled" (MXFP4 tiles through tl.dot_scaled; the default with fp16 or fp8 activations,
while bf16 ones take the explicit bf16-pair decode: fused_moe_triton.use_dot_scaled).
"atomic": false makes stage 2 store one fp32 row per kept slot and a second kernel sum each
token's rows (instead of k fp32 atomic adds per output element; pays for large k = 4 / 8 batches).
BLOCK_M is shared because both stages
walk the same block layout. BLOCK_M = 1 (paths with 16-bit activations) runs both stages on the
CUDA cores, one (token, expert) pair per block; there "pair_blocks" (true unless the entry
says false) skips the alignment launch (block b is flat slot b; the GEMM kernels check each
id's range and mask themselves). Stage 2 may split K ("split_k", atomic combine only: more
programs for few output tiles over a long K, e.g. Mixtral's I = 14336), on either kind of block.
"dequant": true (MXFP4 weights, tensor-core tiles) decodes the weights before each stage and
runs the plain kernels with the config's settings: to the model dtype for 16-bit activations,
to fp8 with a power of two per row (the fp8 kernel's per-channel scales) for fp8 activations.
A stage's "tma_b": true (tensor-core tiles of plain / fp8 weights, or MXFP4 decoded first)
reads its weight tiles through a TMA descriptor instead of pointer loads. A BLOCK_M = 1 MXFP4
stage's "mma" (true unless it says false; 16-bit activations, GPU) runs the Gluon decode
blocks on the tensor cores where they fit (kernels/_decode_mma.py), else the CUDA-core ones.
"pdl": true launches stage 2 as a programmatic dependent of stage 1 (Hopper on): its programs
start while stage 1 drains and wait (griddepcontrol) only before reading stage 1's rows, which
hides the launch gap between the two; for short, decode-sized calls.
Lookup takes the exact shape key and the nearest tuned M (in log scale) if it is within a factor
of 4; anything missing falls back to `default_config`. MXFP4 entries that do not say whether to
decode first (tables written before that choice existed, or none at all) do so from
DEQUANT_MIN_TOKENS_PER_EXPERT (fp8 activations: DEQUANT_FP8_MIN_TOKENS_PER_EXPERT) routed tokens
per expert on, with the configuration of the plain path that runs them (bf16, or fp8).
"""

from __future__ import annotations

import functools
import json
import math
import os
from importlib import resources
from typing import Any

# kernel paths: (weight format, activation dtype)
PATHS = ("bf16", "w4a16", "w4a8", "fp8", "w8a16")
# A tuned entry stands for batches at most this factor away from the M it was tuned at: a
# table tuned for decode only must not pick launch settings for prefill (on the H200 an M = 16
# entry ran Mixtral-8x7B w4a16 at M = 16384 3.5x slower than the heuristic).
NEAREST_M_FACTOR = 4
# From this many routed tokens per expert on, MXFP4 weights with bf16 activations are decoded
# to bf16 before the GEMMs (H200, 2026-12-02, four bench shapes: 1.0-1.5x faster than the MXFP4
# tiles at 256 tokens per expert, 1.5-2.3x at 512-2048, even at 128, slower at 64 and below;
# benchmarks/results/README.md).
DEQUANT_MIN_TOKENS_PER_EXPERT = 256
# The same for fp8 activations (weights decoded to fp8 rows, 1 byte written per weight): the
# MXFP4 tiles there run tl.dot_scaled on bf16 MMAs, so decoding first pays earlier (H200,
# 2026-12-03: 1.27x at 128 tokens per expert on gpt-oss-20b, slower at 32-64 on Qwen3-30B-A3B
# and DeepSeek-V3; benchmarks/results/README.md).
DEQUANT_FP8_MIN_TOKENS_PER_EXPERT = 128
# the plain kernel path that runs MXFP4 weights decoded first
DEQUANT_PLAIN_PATH = {"w4a16": "bf16", "w4a8": "fp8"}


def path_name(quant: str, act_dtype: str) -> str:
    if quant == "mxfp4":
        return "w4a8" if act_dtype == "fp8" else "w4a16"
    if quant == "fp8":
        return "fp8" if act_dtype == "fp8" else "w8a16"
    return "bf16"


def shape_key(E: int, H: int, I: int, top_k: int) -> str:  # noqa: E741 (I is the MoE dim name)
    return f"E={E},H={H},I={I},k={top_k}"


def device_file_name(device_name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-." else "_" for c in device_name)
    return f"fused_moe_{safe}.json"


def _stage(bn: int, bk: int, group_m: int, warps: int, stages: int) -> dict[str, int]:
    return {"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "num_warps": warps,
            "num_stages": stages}


def default_config(path: str, M: int, E: int, H: int, I: int, top_k: int) -> dict[str, Any]:  # noqa: E741
    """Hand-picked starting points by tokens per expert (what `moeprec tune` refines).

    MXFP4 with bf16 activations and at most one token per expert on average takes the
    CUDA-core blocks (BLOCK_M = 1): on the H200 they beat the tensor-core tiles there
    (benchmarks/results/README.md); with more tokens per expert each pair would stream its
    expert's weights again.
    """
    per_expert = M * top_k / E
    fp8_act = path in ("w4a8", "fp8")
    bk_small = 128
    if path == "w4a16" and per_expert <= 1:
        cfg = {"BLOCK_M": 1, "s1": _stage(16, 256, 1, 4, 2), "s2": _stage(16, 256, 1, 4, 2)}
    elif per_expert <= 4:
        cfg = {"BLOCK_M": 16, "s1": _stage(64, bk_small, 1, 4, 4), "s2": _stage(64, bk_small, 1, 4, 4)}
    elif per_expert <= 24:
        cfg = {"BLOCK_M": 32, "s1": _stage(64, bk_small, 1, 4, 4), "s2": _stage(64, bk_small, 1, 4, 4)}
    elif per_expert <= 96:
        cfg = {"BLOCK_M": 64, "s1": _stage(64, 64 if not fp8_act else 128, 4, 4, 4),
               "s2": _stage(128, 64 if not fp8_act else 128, 4, 4, 4)}
    else:
        bk = 128 if fp8_act else 64
        cfg = {"BLOCK_M": 128, "s1": _stage(128, bk, 8, 8, 3), "s2": _stage(128, bk, 8, 8, 4)}
    # stage 2's k fp32 atomic adds per output element against storing slot rows and a
    # per-token sum: on the H200 the rows won at k = 8 from 256 tokens per expert on (Qwen3
    # 5-10%, DeepSeek-V3 3%) and at k = 4 from 128 (gpt-oss 4-5%), lost at 64 (Qwen3 M = 1024)
    # and tied at k = 2 (benchmarks/results/README.md, 2026-12-03 07:45 UTC)
    cfg["atomic"] = not (top_k >= 4 and per_expert >= 128)
    # fp8: quantize z inside stage 2 for small batches (saves a launch), in a separate pass for
    # large ones (keeps stage 2's A operand a pipelined copy)
    cfg["fuse_quant"] = per_expert <= 24
    return cfg


def fix_config(cfg: dict[str, Any], path: str) -> dict[str, Any]:
    """Make a config legal for the kernels (any file or tuner output goes through here)."""
    cfg = {"BLOCK_M": int(cfg["BLOCK_M"]), "atomic": bool(cfg.get("atomic", True)),
           "fuse_quant": bool(cfg.get("fuse_quant", True)),
           "dequant": bool(cfg.get("dequant", False)),
           "pair_blocks": bool(cfg.get("pair_blocks", True)),
           "pdl": bool(cfg.get("pdl", False)),
           "s1": dict(cfg["s1"]), "s2": dict(cfg["s2"])}
    bm = cfg["BLOCK_M"]
    if bm != 1 and (bm < 16 or bm & (bm - 1)):
        raise ValueError(f"BLOCK_M must be 1 or a power of two >= 16, got {bm}")
    # weights decoded before the GEMMs: MXFP4 weights, tensor-core tiles only
    # (never with BLOCK_M = 1: a pdl stage 2 of one-pair blocks reads weights before its wait)
    cfg["dequant"] = cfg["dequant"] and path in DEQUANT_PLAIN_PATH and bm != 1
    dequant = cfg["dequant"]
    mxfp4_tiles = path in DEQUANT_PLAIN_PATH and not dequant  # packed weights decoded in-kernel
    if path in ("w4a8", "fp8"):  # fp8 activations only run on the tensor cores
        cfg["BLOCK_M"] = max(bm, 16)
    gemv = cfg["BLOCK_M"] == 1
    cfg["pair_blocks"] = cfg["pair_blocks"] and gemv
    for st in ("s1", "s2"):
        s = cfg[st]
        # K splits add into the fp32 output with atomics: stage 2 only, atomic combine only
        split_ok = st == "s2" and cfg["atomic"]
        s["split_k"] = max(1, int(s.get("split_k", 1))) if split_ok else 1
        if gemv:  # whole 32-value blocks, a power of two of them per step
            s["BLOCK_K"] = max(32, 1 << (int(s["BLOCK_K"]) - 1).bit_length())
        s.setdefault("GROUP_M", 1)
        s.setdefault("num_warps", 4)
        s.setdefault("num_stages", 3)
        # weight tiles through TMA: plain / fp8 weights (or MXFP4 decoded first) on the tensor cores
        s["tma_b"] = bool(s.get("tma_b", False)) and not gemv and not mxfp4_tiles
        # MXFP4 one-pair blocks with 16-bit activations: the Gluon tensor-core decode (GPU,
        # where it fits) instead of the CUDA-core product (1.02-1.29x on the H200, 2026-12-03)
        s["mma"] = bool(s.get("mma", True)) and gemv and path == "w4a16"
        # those blocks' weights through a TMA ring of this many steps filled by a producer warp
        # (0: registers; docs/kernels.md), its launch's register cap (programs per SM)
        s["ring"] = max(0, int(s.get("ring", 0))) if s["mma"] else 0
        if s["ring"]:
            s["maxnreg"] = min(max(int(s.get("maxnreg", 80)) // 8 * 8, 40), 256)
        else:
            s.pop("maxnreg", None)
        # MXFP4 decodes K in blocks of 32; tl.dot needs K >= 16 per half (>= 32 for fp8).
        if mxfp4_tiles:
            s["BLOCK_K"] = max(s["BLOCK_K"], 64)
        if path in ("fp8", "w4a8"):
            s["BLOCK_K"] = max(s["BLOCK_K"], 32)
        # shared memory per pipeline stage: the A tile plus the weight tile (stage 1 loads the
        # gate and up rows, 2 x BLOCK_N); drop stages until it fits the 227 KiB of an H100 SM
        a_bytes = 1 if path in ("fp8", "w4a8") else 2
        # weights decoded first are read as the plain path's (bf16, or fp8 rows)
        b_path = DEQUANT_PLAIN_PATH[path] if dequant else path
        b_bytes = {"bf16": 2, "w4a16": 0.5, "w4a8": 0.5, "fp8": 1, "w8a16": 1}.get(b_path, 2)
        rows = s["BLOCK_N"] * (2 if st == "s1" else 1)
        per_stage = cfg["BLOCK_M"] * s["BLOCK_K"] * a_bytes + rows * s["BLOCK_K"] * b_bytes
        # the explicit MXFP4 decode (bf16 activations) stages its decoded tile once more
        fixed = rows * s["BLOCK_K"] * 2 if path == "w4a16" and not dequant else 0
        while s["num_stages"] > 2 and s["num_stages"] * per_stage + fixed > 200 * 1024:
            s["num_stages"] -= 1
    return cfg


@functools.lru_cache(maxsize=8)
def _load_table(file_name: str) -> dict[str, Any]:
    override = os.environ.get("MOEPREC_FUSED_MOE_CONFIG_DIR")
    if override and os.path.exists(os.path.join(override, file_name)):
        with open(os.path.join(override, file_name)) as f:
            return json.load(f)
    try:
        text = resources.files("moeprec").joinpath("configs", file_name).read_text()
    except (FileNotFoundError, OSError):
        return {}
    return json.loads(text)


def clear_caches() -> None:
    """Forget loaded tables and looked-up configs (after the files or the override dir change)."""
    _load_table.cache_clear()
    get_config.cache_clear()


# Looked up on every fused_moe call (a decode step calls it per layer): cached, since the search
# and fix-up cost ~14 us of host time per call on a CPU of this project's machines. Callers
# share the returned dict and must not change it.
@functools.lru_cache(maxsize=4096)
def get_config(path: str, M: int, E: int, H: int, I: int, top_k: int,  # noqa: E741
               device_name: str | None = None) -> dict[str, Any]:
    """The launch configuration for one call: tuned entry for (device, path, shape, nearest M)."""
    entry = None
    if device_name is not None:
        per_m = _load_table(device_file_name(device_name)).get(path, {}).get(
            shape_key(E, H, I, top_k))
        if per_m:
            dist = {m: abs(math.log(max(int(m), 1)) - math.log(max(M, 1))) for m in per_m}
            best = min(per_m, key=lambda m: (dist[m], -int(m)))  # a tie: the larger batch's
            # one-pair blocks stream an expert's weights once per token: tuned at a smaller
            # batch, they do not carry over to one with more tokens per expert
            if (dist[best] <= math.log(NEAREST_M_FACTOR) + 1e-9
                    and not (per_m[best]["BLOCK_M"] == 1 and int(best) < M)):
                entry = per_m[best]
    min_per_expert = (DEQUANT_FP8_MIN_TOKENS_PER_EXPERT if path == "w4a8"
                      else DEQUANT_MIN_TOKENS_PER_EXPERT)
    if (path in DEQUANT_PLAIN_PATH and (entry is None or "dequant" not in entry)
            and M * top_k >= min_per_expert * E):
        plain = get_config(DEQUANT_PLAIN_PATH[path], M, E, H, I, top_k, device_name)
        return fix_config(dict(plain, dequant=True), path)
    return fix_config(entry if entry is not None else default_config(path, M, E, H, I, top_k), path)
