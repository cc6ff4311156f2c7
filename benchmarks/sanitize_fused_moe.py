"""Small fused MoE calls on every kernel path, for `compute-sanitizer --tool memcheck`.

Includes out-of-range and masked expert ids, M=1, sizes off the tile, the CUDA-core decode
blocks (BLOCK_M = 1) with stage-2 K splits, the tensor-core decode blocks ("mma": Gluon, K
tails, empty K splits, scales read bytewise and as words; and with the weights through a TMA ring),
with and without the alignment launch, the
three-launch block alignment (M = 200: 600 slots), MXFP4 weights decoded before the GEMMs
("dequant" to bf16 or to fp8 rows, two experts at a time; at M = 200 also with an expert that gets no token, whose
weights are then not decoded), the MXFP4 tiles' explicit decode ("dot_scaled": false; K = 96
and 64 against BLOCK_K = 128: K tails; BLOCK_M = 128 with BLOCK_K = 64: stage 2 without
K masks), plain tiles with K a multiple of BLOCK_K in both stages, tile stage 2 split along K (3 ways), stage 2 storing slot rows that a
per-token sum combines, weight tiles through TMA. Exit code 0 and the sanitizer's "0 errors" are the check; outputs are
also compared with the torch reference.
"""

import torch

from moeprec.fused_moe_op import fused_moe
from moeprec.kernels.fused_moe_triton import fused_moe_triton_impl
from moeprec.kernels.tuning import fix_config, path_name
from tests.test_fused_moe_triton import assert_close, make_case  # noqa: E402


def mma_blocks(x, w1, w2, tw, ti, args, ref, M, block_k):
    """The tensor-core decode blocks, stage 2 split 3 ways, with and without the alignment."""
    from moeprec.kernels import _decode_mma

    words = [_decode_mma.scale_words(args[n], K)
             for n, K in (("w1_scale", x.shape[1]), ("w2_scale", w2.shape[2] * 2))]
    st = {"BLOCK_N": 16, "BLOCK_K": block_k, "num_warps": 1, "num_stages": 2, "mma": True}
    cfg = fix_config({"BLOCK_M": 1, "s1": dict(st), "s2": dict(st, split_k=3)}, "w4a16")
    for pair in (True, False):
        out = fused_moe_triton_impl(x, w1, w2, tw, ti, config=dict(cfg, pair_blocks=pair), **args)
        assert_close(out, ref)
        print(f"mxfp4 bf16 {M} BLOCK_M=1 mma K={x.shape[1]} scale_words={words} "
              f"pair_blocks={pair} ok", flush=True)
    # the weights through a TMA ring of 2 steps (a producer warp; 4 consumer warps)
    ring = {**st, "num_warps": 4, "ring": 2}
    cfg = fix_config({"BLOCK_M": 1, "s1": dict(ring), "s2": dict(ring, split_k=3)}, "w4a16")
    assert_close(fused_moe_triton_impl(x, w1, w2, tw, ti, config=cfg, **args), ref)
    print(f"mxfp4 bf16 {M} BLOCK_M=1 mma ring=2 K={x.shape[1]} ok", flush=True)


def main() -> None:
    for quant, act, H, I in (("none", "bf16", 80, 48), ("mxfp4", "bf16", 96, 64),  # noqa: E741
                             ("mxfp4", "fp8", 64, 96), ("fp8", "fp8", 80, 48)):
        for M in (1, 7, 200):
            E, k = 6, 3
            x, w1, w2, tw, ti, kw = make_case(M, H, I, E, k, quant, bias=True, seed=M)
            ti = ti.clone()
            ti[0, 0] = E + 5
            if M > 1:
                ti[1, 2] = -3
            mask = torch.ones(E, dtype=torch.bool, device="cuda")
            mask[ti[-1, 1]] = False
            args = dict(quant=quant, act_dtype=act, expert_mask=mask, check_topk_ids=False, **kw)
            out = fused_moe(x, w1, w2, tw, ti, backend="triton", **args)
            ref = fused_moe(x, w1, w2, tw, ti, backend="torch", **args)
            assert_close(out, ref, 1e-2 if act == "bf16" else 2.0**-4)
            print(quant, act, M, "ok", flush=True)
            del args["check_topk_ids"]  # the kernels' entry point takes checked ids as they are
            if act == "bf16":  # the CUDA-core decode blocks, with stage-2 K splits
                st = {"BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}
                cfg = fix_config({"BLOCK_M": 1, "s1": dict(st), "s2": dict(st, split_k=3)},
                                 path_name(quant, act))
                out = fused_moe_triton_impl(x, w1, w2, tw, ti, config=cfg, **args)
                assert_close(out, ref)
                print(quant, act, M, "BLOCK_M=1 split_k=3 ok", flush=True)
                # with the alignment launch (the default skips it: the GEMMs check raw ids)
                out = fused_moe_triton_impl(x, w1, w2, tw, ti, config=dict(cfg, pair_blocks=False),
                                            **args)
                assert_close(out, ref)
                print(quant, act, M, "BLOCK_M=1 aligned ok", flush=True)
                if quant == "mxfp4":  # the tensor-core decode blocks (Gluon), K tails, splits
                    mma_blocks(x, w1, w2, tw, ti, args, ref, M, 128)
                    # scale words (K a multiple of 128; H = 384 under BLOCK_K = 256: a K tail)
                    x2, w12, w22, tw2, _, kw2 = make_case(M, 384, 128, E, k, quant, bias=True,
                                                          seed=M)
                    args2 = dict(args, **kw2)
                    ref2 = fused_moe(x2, w12, w22, tw2, ti, backend="torch", check_topk_ids=False,
                                     **args2)
                    mma_blocks(x2, w12, w22, tw2, ti, args2, ref2, M, 256)
            if quant == "mxfp4":  # decoded first (to bf16 / to fp8 rows), in chunks of 2 experts
                import moeprec.kernels.fused_moe_triton as m

                tol = 1e-2 if act == "bf16" else 2.0**-4
                st = {"BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
                cfg = fix_config({"BLOCK_M": 16, "dequant": True, "s1": dict(st), "s2": dict(st)},
                                 path_name(quant, act))
                m.DEQUANT_WORKSPACE_BYTES = 2 * 2 * I * H * 2
                out = fused_moe_triton_impl(x, w1, w2, tw, ti, config=cfg, **args)
                m.DEQUANT_WORKSPACE_BYTES = 1 << 30
                assert_close(out, ref, tol)
                print(quant, act, M, "dequant ok", flush=True)
                if M == 200:  # three-launch alignment: an expert without tokens is not decoded
                    idle = (int(ti[-1, 1]) + 1) % E  # not the masked one
                    ti_idle = torch.where(ti == idle, (idle + 1) % E, ti)
                    ref_idle = fused_moe(x, w1, w2, tw, ti_idle, backend="torch",
                                         check_topk_ids=False, **args)
                    out = fused_moe_triton_impl(x, w1, w2, tw, ti_idle, config=cfg, **args)
                    assert_close(out, ref_idle, tol)
                    print(quant, act, M, "dequant, an expert without tokens ok", flush=True)
            if quant == "mxfp4" and act == "bf16":  # the explicit decode on both kinds of tile
                st = {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 2,
                      "dot_scaled": False}
                for bm, bk in ((16, 128), (64, 128), (128, 64)):  # mma.sync and wgmma tiles
                    cfg = fix_config({"BLOCK_M": bm, "s1": dict(st, BLOCK_K=bk),
                                      "s2": dict(st, BLOCK_K=bk)}, "w4a16")
                    out = fused_moe_triton_impl(x, w1, w2, tw, ti, config=cfg, **args)
                    assert_close(out, ref)
                    print(quant, act, M, f"explicit decode BLOCK_M={bm} BLOCK_K={bk} ok", flush=True)
            if quant == "none":  # H = 80, I = 48 under BLOCK_K = 16: no K masks in either stage
                st = {"BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}
                cfg = fix_config({"BLOCK_M": 16, "s1": dict(st), "s2": dict(st)}, "bf16")
                out = fused_moe_triton_impl(x, w1, w2, tw, ti, config=cfg, **args)
                assert_close(out, ref)
                print(quant, act, M, "tiles, K a multiple of BLOCK_K ok", flush=True)
            if act == "bf16" or quant == "fp8":  # tensor-core stage 2 split along K
                st = {"BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
                cfg = fix_config({"BLOCK_M": 16, "s1": dict(st), "s2": dict(st, split_k=3)},
                                 path_name(quant, act))
                out = fused_moe_triton_impl(x, w1, w2, tw, ti, config=cfg, **args)
                assert_close(out, ref, 1e-2 if act == "bf16" else 2.0**-4)
                print(quant, act, M, "tiles, stage 2 split_k=3 ok", flush=True)
            # stage 2 storing one row per kept slot, then the per-token sum (no atomics)
            st = {"BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}
            cfg = fix_config({"BLOCK_M": 16, "atomic": False, "s1": dict(st), "s2": dict(st)},
                             path_name(quant, act))
            out = fused_moe_triton_impl(x, w1, w2, tw, ti, config=cfg, **args)
            assert_close(out, ref, 1e-2 if act == "bf16" else 2.0**-4)
            print(quant, act, M, "slot rows summed without atomics ok", flush=True)
            # weight tiles through TMA ("tma_b"): plain / fp8 weights, MXFP4 decoded first
            st = {"BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2, "tma_b": True}
            cfg = fix_config({"BLOCK_M": 16, "dequant": quant == "mxfp4", "s1": dict(st),
                              "s2": dict(st)}, path_name(quant, act))
            out = fused_moe_triton_impl(x, w1, w2, tw, ti, config=cfg, **args)
            assert_close(out, ref, 1e-2 if act == "bf16" else 2.0**-4)
            print(quant, act, M, "weight tiles through TMA ok", flush=True)


if __name__ == "__main__":
    main()
