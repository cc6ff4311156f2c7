"""Which fused-MoE kernels compile for which GPU generation, without a GPU.

    PYTHONPATH=$PWD python3 benchmarks/compile_targets.py 80 89 90

Compiles one representative of each kernel path (the variants of compile_fused_moe_sm90.py)
for each sm target and prints ok or the compiler's last error line: the evidence behind
`fused_moe_triton.check_device` (which paths need compute capability 8.9 / 9.0).
"""
import sys

import compile_fused_moe_sm90 as C

# name -> compile_variant arguments (stage1, b_fmt, a_fp8, dot_scaled, BM, BN, BK, warps,
# [stages, pair_blocks, even_k, tma_b, pdl])
PATHS = {
    "bf16 tiles": (True, 0, False, False, 128, 128, 64, 8),
    "bf16 decode blocks": (True, 0, False, False, 1, 16, 256, 4),
    "mxfp4 decode blocks (CUDA cores)": (True, 1, False, False, 1, 16, 256, 4),
    "mxfp4 tiles, explicit decode": (True, 1, False, False, 64, 64, 128, 4),
    "mxfp4 tiles, dot_scaled": (True, 1, False, True, 64, 64, 128, 4),
    "fp8 tiles": (True, 2, True, False, 128, 128, 128, 8),
    "bf16 tiles, TMA weights": (True, 0, False, False, 128, 128, 64, 8, 3, False, True, True),
    "decode blocks with pdl": (True, 1, False, False, 1, 16, 256, 4, 3, True, True, False, True),
}


def compile_quantizer(name: str):
    """One of moeprec/kernels/quantize.py's MXFP4 kernels (the fused MoE's torch reference
    decodes weights with them on any GPU), compiled for C.ARCH."""
    from triton.compiler import ASTSource

    from moeprec.kernels import quantize as Q

    fn, sig, consts = {
        "quant": (Q._mxfp4_quant_kernel,
                  dict(x_ptr="*bf16", packed_ptr="*u8", scales_ptr="*u8", NB="i64"),
                  dict(MODE=1, BLOCK_B=32)),
        "dequant": (Q._mxfp4_dequant_kernel,
                    dict(packed_ptr="*u8", scales_ptr="*u8", out_ptr="*bf16", NB="i64",
                         keep_ptr="*i32", blocks_per_group="i64"),
                    dict(HAS_KEEP=False, BLOCK_B=32)),
    }[name]
    names = fn.arg_names
    src = ASTSource(fn, {n: "constexpr" if n in consts else sig[n] for n in names},
                    constexprs={(names.index(k),): v for k, v in consts.items()})
    return C.triton.compile(src, target=C.GPUTarget("cuda", C.ARCH, 32), options=dict(num_warps=4))


def last_line(exc: Exception) -> str:
    """The compiler's reason: ptxas's first error line, else the message's last line."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    errors = [ln.split("error", 1)[1].lstrip(" :") for ln in lines if "; error" in ln]
    return ((errors or lines or [type(exc).__name__])[0 if errors else -1])[:160]


def main() -> None:
    print(f"triton {C.triton.__version__}")
    for arch in [int(a) for a in sys.argv[1:]] or [80, 89, 90]:
        C.ARCH = arch
        cases = [(n, lambda v=v: C.compile_variant(*v)) for n, v in PATHS.items()]
        cases.append(("mxfp4 decode blocks (Gluon tensor cores)",
                      lambda: C.compile_decode_mma(True, 32, 256, 4, K=4096)))
        cases += [(f"mxfp4 {q} (quantize.py)", lambda q=q: compile_quantizer(q))
                  for q in ("quant", "dequant")]
        for name, compile_one in cases:
            try:
                compile_one()
                result = "ok"
            except Exception as exc:  # noqa: BLE001 (each failure is a row of the report)
                result = "FAIL " + last_line(exc)
            print(f"sm_{arch} {name:<42} {result}", flush=True)


if __name__ == "__main__":
    main()
