"""Probe (CPU, no GPU needed): host cost of Triton's argument binding per fused-MoE GEMM launch.

    PYTHONPATH=<triton 3.6 install>:$PWD python3 benchmarks/probes/launch_binder.py

Every `kernel[grid](...)` call runs Triton's generated binder (specialising each argument:
alignment of pointers, divisibility of ints) and builds the compiled-kernel cache key before
the driver launch. This captures the arguments of one Qwen3-30B-A3B M = 1024 call's two GEMM
launches (kernels replaced by recorders, CPU tensors) and times binder + key for each, with an
sm_90 backend object, so the part of an eager call's host time that a launch cache could save
is known without a GPU. Then the same with the weight tiles through TMA (config "tma_b": a
TensorDescriptor argument), and the descriptor's own construction.
"""
import time

import torch
import triton.runtime.jit as jit
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend

from moeprec.kernels import fused_moe_triton as F

gemm = F.K._moe_gemm_kernel
launches = []


class Recorder:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: launches.append((args, kwargs))


class Skip:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


F.K._moe_gemm_kernel = Recorder()
for name in ("_align_kernel", "_align_count_kernel", "_align_scan_kernel", "_align_place_kernel",
             "_sum_slot_rows_kernel"):
    setattr(F.K, name, Skip())

M, H, I, E, k = 1024, 2048, 768, 128, 8  # noqa: E741
x = torch.randn(M, H, dtype=torch.bfloat16)
w1 = torch.randn(E, 2 * I, H, dtype=torch.bfloat16)
w2 = torch.randn(E, H, I, dtype=torch.bfloat16)
tw, ti = torch.rand(M, k), torch.randint(0, E, (M, k))
binder = jit.create_function_from_signature(gemm.signature, gemm.params,
                                            CUDABackend(GPUTarget("cuda", 90, 32)))


def per_call_us(fn, n=2000):
    for _ in range(50):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


for tma in (False, True):
    launches.clear()
    stage = {"BLOCK_K": 64, "BLOCK_N": 128, "GROUP_M": 4, "num_stages": 3, "num_warps": 8,
             "tma_b": tma}
    F.fused_moe_triton_impl(x, w1, w2, tw, ti, config={"BLOCK_M": 64, "s1": stage, "s2": stage})
    for name, (args, kwargs) in zip(("stage 1", "stage 2"), launches):
        kwargs = dict(kwargs, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)
        cache: dict = {}

        def bind(args=args, kwargs=kwargs, cache=cache):
            _, spec, opts = binder(*args, **kwargs)
            return jit.compute_cache_key(cache, spec, opts)

        print(f"{name}{' tma_b' if tma else ''}: binder + cache key {per_call_us(bind):.1f} us per "
              f"launch ({len(args)} arguments, {len(kwargs)} keywords incl. constexprs and launch "
              "options)")
print(f"_weight_descriptor (stage 1's): {per_call_us(lambda: F._weight_descriptor(w1, 2, 256, 64)):.1f} us")
