"""E2M1 nibbles to E4M3 bit positions in PTX: the decode step shared by the CUDA-core decode
blocks (`_fused_moe_kernels._e2m1_words_to_f32`) and the tensor-core ones (`_decode_mma`).

A packed MXFP4 word holds 8 E2M1 values, two per byte, low nibble first. Moved to E4M3 bit
positions (sign to bit 7, exponent and mantissa to bits 4..2), E4M3's exponent bias does the
decode (the value times 2^-6) and E2M1's subnormal 0.5 lands on an E4M3 subnormal, so Hopper's
`cvt.rn.f16x2.e4m3x2` then converts two values at a time, exactly.
"""


def e2m1_to_e4m3(word: str, lo: str, hi: str) -> str:
    """PTX that puts the low nibbles of the 4 bytes of register `word` into register `lo` as E4M3
    bytes and the high nibbles into `hi` (scratch: .b32 registers t0 and t1, declared by the
    caller)."""
    return (f"shl.b32 t0, {word}, 4;\nshl.b32 t1, {word}, 2;\nand.b32 t0, t0, 0x80808080;\n"
            f"and.b32 t1, t1, 0x1C1C1C1C;\nor.b32 {lo}, t0, t1;\nshr.b32 t1, {word}, 2;\n"
            f"and.b32 t1, t1, 0x1C1C1C1C;\nand.b32 t0, {word}, 0x80808080;\nor.b32 {hi}, t0, t1;\n")
