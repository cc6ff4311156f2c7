#!/usr/bin/env bash
# GPU checks in few device calls, logs and JSON under $OUT. Each section fits one 10-minute call:
#   bash benchmarks/gpu_checks.sh tests        # the whole GPU test suite (~5 min on an H200)
#   bash benchmarks/gpu_checks.sh router       # router bench + quantizer bench (~2 min)
#   bash benchmarks/gpu_checks.sh train        # training bench, both shapes, + eager memory probes
#   bash benchmarks/gpu_checks.sh kernels      # training kernels (act, gather) off vs on
#   bash benchmarks/gpu_checks.sh moe          # fused MoE bench, all shapes and paths (no peers)
#   bash benchmarks/gpu_checks.sh decode       # decode blocks: their tests, memcheck, bench M <= 64
#   bash benchmarks/gpu_checks.sh decode-tune  # re-tune decode points (tries pair_blocks), bench
#   bash benchmarks/gpu_checks.sh bf16-decode-tune  # re-tune bf16 M = 1 / 4 (pdl, pair_blocks), bench
#   bash benchmarks/gpu_checks.sh decode-flags # the table's decode configs, pair_blocks on vs off
#   bash benchmarks/gpu_checks.sh tiles        # MXFP4 tiles: their tests, explicit decode vs dot_scaled
#   bash benchmarks/gpu_checks.sh even-k       # tensor-core loop without K masks vs with (table configs)
#   bash benchmarks/gpu_checks.sh split-k      # tile stage-2 K splits: their tests, re-tune M = 64 / 256, bench
#   bash benchmarks/gpu_checks.sh dequant      # MXFP4 prefill: its tests, bench bf16 + w4a16 M >= 256
#   bash benchmarks/gpu_checks.sh dequant-probe  # weights decoded first vs the MXFP4 tiles
#   bash benchmarks/gpu_checks.sh prefill-tune # tune bf16 at M = 1024, 16384, bench with that table
#   bash benchmarks/gpu_checks.sh host         # host time per eager call; prefill bench as graphs
#   bash benchmarks/gpu_checks.sh align        # block alignment: Triton kernel vs torch path
#   bash benchmarks/gpu_checks.sh stages       # prefill GPU time kernel by kernel, cuBLAS beside it
#   bash benchmarks/gpu_checks.sh combine      # stage 2 atomics vs slot rows + sum: bf16 prefill bench both ways
#   bash benchmarks/gpu_checks.sh stage-sweep  # each bf16 prefill stage alone over a wide tile sweep
#   bash benchmarks/gpu_checks.sh tune-4096    # tune bf16 at M = 4096 (k = 8 shapes, gpt-oss), bench with that table
#   bash benchmarks/gpu_checks.sh fp8-tune     # tune the fp8 path at M = 16384 (never tuned), bench bf16 vs fp8
#   bash benchmarks/gpu_checks.sh w4a8         # MXFP4 decoded to fp8 first: tests, mxfp4 bf16 / fp8 crossover
#   bash benchmarks/gpu_checks.sh decoders     # both MXFP4 decoders' time and bandwidth
#   bash benchmarks/gpu_checks.sh tma          # weight tiles through TMA vs pointer loads: tests, bench both
#   bash benchmarks/gpu_checks.sh w4a8-tune    # tune fp8 GEMMs at M = 4096, 8192; mxfp4 bf16 / fp8 act with them
#   bash benchmarks/gpu_checks.sh small-kernels  # fp8 row quantizers and the align place launch, by parts
#   bash benchmarks/gpu_checks.sh pdl          # stage 2 as a programmatic dependent launch: tests, decode probe
#   bash benchmarks/gpu_checks.sh ncu          # Nsight Compute counters of the decode GEMMs
#   bash benchmarks/gpu_checks.sh mma          # tensor-core decode blocks: tests, memcheck, against the CUDA cores
#   bash benchmarks/gpu_checks.sh ring         # those blocks' weights through a TMA ring: tests, memcheck, probe
#   bash benchmarks/gpu_checks.sh ring-tune    # the w4a16 decode entries refined (ring per stage), bench
# Uses the machine's own python3 (torch + triton preinstalled); moeprec from this checkout.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u +%Y-%m-%dT%H:%MZ; } | tee -a "$OUT/env.txt"
decoders() {  # both MXFP4 decoders on Qwen3-30B-A3B's stage-1 weights: time and bandwidth
  python3 - <<'PY' 2>&1 | tee "$OUT/decoders.log"
import torch
from moeprec.formats.mxfp4 import quantize_mxfp4
from moeprec.kernels.quantize import dequantize_mxfp4_triton, mxfp4_to_fp8_triton
packed, scales = quantize_mxfp4(torch.randn(128, 1536, 2048, device="cuda", dtype=torch.bfloat16))
n = packed.numel() * 2  # Qwen3-30B-A3B's stage-1 weights
for name, fn, out_bytes in (("to bf16", lambda: dequantize_mxfp4_triton(packed, scales), 2),
                            ("to fp8 rows", lambda: mxfp4_to_fp8_triton(packed, scales), 1)):
    for _ in range(3):
        fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(20):
        fn()
    b.record()
    torch.cuda.synchronize()
    us = a.elapsed_time(b) / 20 * 1e3
    print(f"{name:12s} {us:8.1f} us  {n * (0.53125 + out_bytes) / us / 1e6:6.2f} TB/s")
PY
}
tune_into_copy() {  # NAME SECONDS TUNE-ARGS...: `moeprec tune` into a copy of the H200 table
  local name=$1 secs=$2
  shift 2
  mkdir -p "$OUT/configs"
  cp moeprec/configs/fused_moe_NVIDIA_H200.json "$OUT/configs/" 2>/dev/null
  timeout "$secs" python3 -m moeprec tune "$@" --out "$OUT/configs/fused_moe_NVIDIA_H200.json" \
    --log "$OUT/$name.jsonl" 2>&1 | tee "$OUT/$name.log" | grep -v "^\[" | tail -12
}
bench_with_copy() {  # NAME SECONDS BENCH-ARGS...: `moeprec bench` with that copy of the table
  local name=$1 secs=$2
  shift 2
  MOEPREC_FUSED_MOE_CONFIG_DIR="$OUT/configs" timeout "$secs" python3 -m moeprec bench "$@" \
    --no-plot --out "$OUT/$name" 2>&1 | tee "$OUT/$name.log" | tail -44
}
for section in "${@:-tests}"; do
  case $section in
    tests)
      timeout 400 python3 -m pytest -q -ra -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
      # the Triton fused-MoE file runs whole on CUDA when there is one (its unmarked tests too)
      timeout 180 python3 -m pytest -q -ra -m "not gpu" -p no:cacheprovider tests/test_fused_moe_triton.py \
        2>&1 | tee "$OUT/fused_moe_triton_tests.log" | tail -5 ;;
    router)
      timeout 200 python3 benchmarks/bench_router.py --agree-batches 6 --out "$OUT" 2>&1 | tee "$OUT/router.log" | tail -12
      timeout 150 python3 benchmarks/bench_quant.py --out "$OUT" 2>&1 | tee "$OUT/quant.log" | tail -12 ;;
    train)
      timeout 300 python3 benchmarks/bench_train.py --out "$OUT" 2>&1 | tee "$OUT/bench_train.log" | tail -24
      for layer in ours peer; do
        timeout 60 python3 benchmarks/probes/layer_memory.py $layer --experts 128 --tokens 16384 --device cuda
      done 2>&1 | tee "$OUT/layer_memory.log" ;;
    kernels)  # the training kernels against Inductor's / torch's code, queued timing
      timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gated_act_kernels.py \
        tests/test_combine_kernels.py 2>&1 | tee "$OUT/train_kernels_tests.log" | tail -3
      for ks in none act,gather; do
        timeout 220 python3 benchmarks/bench_train.py --shapes qwen3-30b-a3b,gpt-oss-20b --tokens 16384 \
          --queued --train-kernels $ks --out "$OUT/kernels_${ks/,/_}" 2>&1 \
          | tee "$OUT/kernels_${ks/,/_}.log" | tail -6
      done ;;
    moe)
      timeout 500 python3 -m moeprec bench --no-peers --reps 8 --sets 3 --out "$OUT/moe" 2>&1 | tee "$OUT/moe.log" | tail -40 ;;
    decode)
      timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_fused_moe_triton.py \
        -k "gemv or unaligned or packaged or decode" 2>&1 | tee "$OUT/decode_tests.log" | tail -5
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 200 compute-sanitizer --tool memcheck \
        python3 benchmarks/sanitize_fused_moe.py 2>&1 | tee "$OUT/memcheck.log" | tail -5
      timeout 180 python3 -m moeprec bench --paths bf16,mxfp4-w4a16 --M 1,4,16,64 --no-peers \
        --reps 8 --sets 3 --no-plot --out "$OUT/decode" 2>&1 | tee "$OUT/decode.log" | tail -34 ;;
    tiles)
      timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_mxfp4_tile_decode.py \
        tests/test_fused_moe_triton.py -k "tile_decode or both_decodes or packaged or model_shapes" \
        2>&1 | tee "$OUT/tiles_tests.log" | tail -3
      timeout 300 python3 benchmarks/probes/mxfp4_tiles.py --M 16,64,256,1024 --out "$OUT" 2>&1 \
        | tee "$OUT/mxfp4_tiles.log" | tail -20 ;;
    even-k)
      timeout 300 python3 benchmarks/probes/even_k.py --out "$OUT" 2>&1 | tee "$OUT/even_k.log" | tail -45 ;;
    split-k)  # stage 2 of the tensor-core tiles split along K; tuned into a copy of the table
      timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_fused_moe_triton.py \
        -k "split_k or smallest or config_rules" 2>&1 | tee "$OUT/split_k_tests.log" | tail -3
      tune_into_copy split_k_tune 300 --shapes mixtral-8x7b,gpt-oss-20b --paths bf16,mxfp4-w4a16 \
        --M 64,256 --budget-s 280
      bench_with_copy split_k 120 --shapes mixtral-8x7b,gpt-oss-20b --paths bf16,mxfp4-w4a16 \
        --M 64,256 --no-peers --reps 8 --sets 3 ;;
    decode-flags)
      timeout 240 python3 benchmarks/probes/decode_flags.py --out "$OUT" 2>&1 | tee "$OUT/decode_flags.log" | tail -40 ;;
    decode-tune)  # re-tune the decode points (tries pair_blocks on and off), bench with that table
      tune_into_copy decode_tune 330 --shapes qwen3-30b-a3b,mixtral-8x7b,gpt-oss-20b,deepseek-v3 \
        --paths mxfp4-w4a16 --M 1,4,16 --budget-s 300
      bench_with_copy decode_tuned 200 --paths bf16,mxfp4-w4a16 --M 1,4,16 --no-peers --reps 8 \
        --sets 3 ;;
    bf16-decode-tune)  # bf16 M = 1 / 4 entries (some predate pair_blocks and pdl), bench with them
      tune_into_copy bf16_decode_tune 230 --shapes qwen3-30b-a3b,gpt-oss-20b,mixtral-8x7b,deepseek-v3 \
        --paths bf16 --M 4,1 --budget-s 200
      bench_with_copy bf16_decode_tuned 110 --paths bf16 --M 1,4,16 --no-peers --reps 8 --sets 3 ;;
    dequant)
      { timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_quantize_triton.py -k dequant
        timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_fused_moe_triton.py \
          -k "dequant or decoded or packaged or model_shapes"; } 2>&1 | tee "$OUT/dequant_tests.log" | tail -6
      timeout 330 python3 -m moeprec bench --paths bf16,mxfp4-w4a16 --M 256,1024,4096,16384 \
        --loop-max-m 0 --reps 8 --sets 3 --out "$OUT/prefill" 2>&1 | tee "$OUT/prefill.log" | tail -36 ;;
    prefill-tune)  # tune bf16 prefill points into a copy of the H200 table, then bench with it
      tune_into_copy prefill_tune 470 --shapes qwen3-30b-a3b,mixtral-8x7b,gpt-oss-20b,deepseek-v3 \
        --paths bf16 --M 1024,16384 --reps 5 --budget-s 380
      bench_with_copy prefill_tuned 110 --paths bf16,mxfp4-w4a16 --M 1024,4096,16384 \
        --loop-max-m 0 --reps 8 --sets 3 ;;
    stages)  # a prefill call kernel by kernel (profiler), stage-2 atomics vs stores, cuBLAS
      timeout 300 python3 benchmarks/probes/prefill_stages.py --out "$OUT" 2>&1 \
        | tee "$OUT/prefill_stages.log" | tail -40 ;;
    combine)  # the table as is, then with every bf16 entry from M = 1024 on storing slot rows
      timeout 150 python3 -m moeprec bench --paths bf16 --M 1024,4096,16384 --loop-max-m 0 \
        --no-peers --reps 8 --sets 3 --no-plot --out "$OUT/combine_atomic" 2>&1 \
        | tee "$OUT/combine_atomic.log" | tail -14
      mkdir -p "$OUT/configs_rows"
      python3 - "$OUT/configs_rows" <<'PY'
import json, sys
t = json.load(open("moeprec/configs/fused_moe_NVIDIA_H200.json"))
for shape in t["bf16"].values():
    for m, cfg in shape.items():
        if int(m) >= 1024:
            cfg["atomic"] = False
json.dump(t, open(sys.argv[1] + "/fused_moe_NVIDIA_H200.json", "w"), indent=1, sort_keys=True)
PY
      MOEPREC_FUSED_MOE_CONFIG_DIR="$OUT/configs_rows" timeout 150 python3 -m moeprec bench \
        --paths bf16 --M 1024,4096,16384 --loop-max-m 0 --no-peers --reps 8 --sets 3 --no-plot \
        --out "$OUT/combine_rows" 2>&1 | tee "$OUT/combine_rows.log" | tail -14 ;;
    stage-sweep)  # stages 1 and 2 alone, BLOCK_M 128, ~50 tile settings each; slot rows fp32 vs bf16
      timeout 430 python3 benchmarks/probes/stage_configs.py --block-m 128 --out "$OUT" \
        --points qwen3-30b-a3b:4096,qwen3-30b-a3b:16384,deepseek-v3:16384,gpt-oss-20b:4096 2>&1 \
        | grep -v Warn | tee "$OUT/stage_configs.log" | tail -40 ;;
    tune-4096)  # M = 4096 had no entry for DeepSeek-V3 (it took M = 16384's); the sweep's stage-2
      # winner (256x64, 8 warps, 3 stages) for DeepSeek-V3 M = 16384 set by hand; bench with it
      tune_into_copy tune_4096 300 --shapes qwen3-30b-a3b,gpt-oss-20b,deepseek-v3 --paths bf16 \
        --M 4096 --reps 5 --budget-s 270
      python3 - "$OUT/configs/fused_moe_NVIDIA_H200.json" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))
t["bf16"]["E=256,H=7168,I=2048,k=8"]["16384"]["s2"].update(BLOCK_N=256, num_stages=3)
json.dump(t, open(sys.argv[1], "w"), indent=1, sort_keys=True)
PY
      bench_with_copy tuned_4096 150 --paths bf16 --M 1024,4096,16384 --loop-max-m 0 --no-peers \
        --reps 8 --sets 3 ;;
    pdl)  # config "pdl": its tests on the GPU (graph capture included), then the decode probe
      timeout 200 python3 -m pytest -q -ra -p no:cacheprovider tests/test_fused_moe_triton.py \
        -k "programmatic" 2>&1 | tee "$OUT/pdl_tests.log" | tail -3
      (cd benchmarks/probes && timeout 300 python3 decode_flags.py --M 1,4,16,64,256 \
        --out "$OUT/pdl_flags" 2>&1 | tee "$OUT/pdl_flags.log" | grep -E "^shape|table") ;;
    ncu)  # what bounds the decode GEMMs: DRAM, issue slots or loads in flight (env NCU_SPECS:
      # "shape path M" triples, comma-separated)
      IFS=, read -ra specs <<< "${NCU_SPECS:-mixtral-8x7b mxfp4-w4a16 1,mixtral-8x7b bf16 1,qwen3-30b-a3b mxfp4-w4a16 4}"
      for spec in "${specs[@]}"; do
        read -r shape path m <<< "$spec"
        echo "=== $shape $path M=$m"
        timeout 150 ncu --clock-control none -k "regex:_moe_gemm|_decode_mma" --launch-skip 4 --launch-count 2 \
          --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
          --section SchedulerStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
          python3 benchmarks/probes/decode_ncu.py --shape "$shape" --path "$path" --M "$m" --calls 4
      done 2>&1 | tee "$OUT/ncu_decode.log" | grep -E "===|config|_moe_gemm|Duration|DRAM Throughput|Memory Throughput|Issue Slots Busy|No Eligible|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Stall" ;;
    mma)  # MXFP4 decode blocks on the tensor cores (Gluon, stage config "mma") against the
      # CUDA-core blocks: tests, memcheck, the probe (table settings and its variants)
      timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_fused_moe_triton.py \
        -k "tensor_core or gemv or packaged" 2>&1 | tee "$OUT/mma_tests.log" | tail -3
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 200 compute-sanitizer --tool memcheck \
        python3 benchmarks/sanitize_fused_moe.py 2>&1 | tee "$OUT/memcheck.log" | grep -E "mma|ERROR S"
      (cd benchmarks/probes && timeout 240 python3 decode_mma.py --M 1,4,16 --out "$OUT/mma" 2>&1 \
        | tee "$OUT/decode_mma.log" | tail -25) ;;
    ring)  # the Gluon decode blocks' weights through a TMA ring filled by a producer warp
      # (stage setting "ring"; a hang would be cut by the timeouts)
      timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_fused_moe_triton.py \
        -k "decode_ring or ring_rules" 2>&1 | tee "$OUT/ring_tests.log" | tail -4
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 150 compute-sanitizer --tool memcheck \
        python3 benchmarks/sanitize_fused_moe.py 2>&1 | tee "$OUT/memcheck.log" | grep -E "ring|ERROR S"
      (cd benchmarks/probes && timeout 200 python3 decode_mma.py --M 1,4,16 --variants \
        '{"ring2": {"ring": 2}, "ring4": {"ring": 4}, "ring6": {"ring": 6}, "ring4_r128": {"ring": 4, "maxnreg": 128}}' \
        --out "$OUT/ring" 2>&1 | tee "$OUT/decode_mma_ring.log" | tail -16) ;;
    ring-tune)  # the table's w4a16 decode entries refined (`tune --refine`: the flag steps only,
      # the TMA ring and its register cap per stage among them), bench bf16 + w4a16 with them
      tune_into_copy ring_tune 300 --shapes deepseek-v3,mixtral-8x7b,gpt-oss-20b,qwen3-30b-a3b \
        --paths mxfp4-w4a16 --M 1,4,16 --refine --budget-s 270
      bench_with_copy ring_tuned 230 --paths bf16,mxfp4-w4a16 --M 1,4,16 --no-peers --reps 8 \
        --sets 3 ;;
    small-kernels)  # the prefill call's small kernels (60-150 us each at Qwen3 M = 16384)
      (cd benchmarks/probes && timeout 200 python3 quant_rows.py --out "$OUT/quant_rows" 2>&1 \
        | tee "$OUT/quant_rows.log" | tail -6
       timeout 200 python3 align_place.py --out "$OUT/align_place" 2>&1 \
        | tee "$OUT/align_place.log" | tail -6) ;;
    fp8-tune)  # fp8 weights + fp8 activations at M = 16384 into a copy of the table; bf16 beside it
      FP8_SHAPES=${FP8_SHAPES:-qwen3-30b-a3b,gpt-oss-20b,mixtral-8x7b,deepseek-v3}  # short of 1.6x first
      tune_into_copy fp8_tune 260 --shapes "$FP8_SHAPES" --paths fp8 --M 16384 --reps 3 \
        --budget-s ${FP8_TUNE_S:-230}
      bench_with_copy fp8_tuned 160 --shapes "$FP8_SHAPES" --paths bf16,fp8 --M 16384 \
        --loop-max-m 0 --no-peers --reps 5 --sets 3 ;;
    w4a8)  # MXFP4 weights decoded to fp8 rows before the fp8 GEMMs (fp8 activations): tests,
      # memcheck, both decoders' bandwidth, the mxfp4 bf16 / fp8 activation crossover (env
      # W4A8_K: a -k selection of the fused-MoE tests; W4A8_PATHS, W4A8_M: the bench's)
      { timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_quantize_triton.py -k fp8_rows
        timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_fused_moe_triton.py \
          ${W4A8_K:+-k "$W4A8_K"}; } 2>&1 \
        | tee "$OUT/w4a8_tests.log" | grep -E "passed|failed|FAIL|Error"
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 200 compute-sanitizer --tool memcheck \
        python3 benchmarks/sanitize_fused_moe.py 2>&1 | tee "$OUT/memcheck.log" | grep -E "dequant|ERROR S"
      decoders
      timeout 260 python3 -m moeprec bench --paths ${W4A8_PATHS:-mxfp4-w4a16,mxfp4-fp8} \
        --M ${W4A8_M:-1024,2048,4096,8192,16384} \
        --loop-max-m 0 --reps 8 --sets 3 --no-plot --out "$OUT/crossover" 2>&1 \
        | tee "$OUT/crossover.log" | tail -44 ;;
    decoders)
      decoders ;;
    w4a8-tune)  # fp8 GEMM configs at the act-dtype crossover's M (only M = 16384 was tuned; mxfp4
      # decoded to fp8 rows reads the same entries) into a copy of the table, then the paths beside
      tune_into_copy w4a8_tune 300 --paths fp8 --M ${W4A8_TUNE_M:-4096,8192} --reps 3 \
        --budget-s ${W4A8_TUNE_S:-280}
      bench_with_copy w4a8_tuned 200 --paths mxfp4-w4a16,mxfp4-fp8 --M ${W4A8_TUNE_M:-4096,8192} \
        --loop-max-m 0 --no-peers --reps 8 --sets 3 ;;
    tma)  # weight tiles through TMA descriptors ("tma_b") vs pointer loads: its tests, then the
      # bench with the table as is and with tma_b set on every stage of a copy of it
      timeout 200 python3 -m pytest -q -p no:cacheprovider \
        tests/test_fused_moe_triton.py::test_weight_tiles_through_tma \
        tests/test_fused_moe_triton.py::test_tma_weight_tiles_config_and_descriptor_rules \
        2>&1 | tee "$OUT/tma_tests.log" | tail -3
      mkdir -p "$OUT/configs"
      python3 - moeprec/configs/fused_moe_NVIDIA_H200.json "$OUT/configs/fused_moe_NVIDIA_H200.json" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))
for path, shapes in t.items():
    for entries in (shapes.values() if path != "_comment" else ()):
        for cfg in entries.values():
            cfg["s1"]["tma_b"] = cfg["s2"]["tma_b"] = True
json.dump(t, open(sys.argv[2], "w"), indent=1, sort_keys=True)
PY
      for table in pointers tma; do
        [ $table = tma ] && export MOEPREC_FUSED_MOE_CONFIG_DIR="$OUT/configs"
        timeout 200 python3 -m moeprec bench --paths ${TMA_PATHS:-bf16,fp8,mxfp4-w4a16,mxfp4-fp8} \
          --M ${TMA_M:-256,1024,4096,16384} --no-peers --reps 8 --sets 3 --no-plot \
          --out "$OUT/tma_$table" 2>&1 | tee "$OUT/tma_$table.log" | tail -66
      done
      unset MOEPREC_FUSED_MOE_CONFIG_DIR ;;
    align)  # the two block-alignment paths: host and GPU time per call
      timeout 120 python3 benchmarks/probes/align_paths.py 2>&1 | tee "$OUT/align_paths.log" ;;
    host)  # eager host time per fused_moe call vs its graphed GPU time; bench with graphs
      timeout 200 python3 benchmarks/probes/fused_moe_host.py 2>&1 | tee "$OUT/fused_moe_host.log"
      timeout 200 python3 -m moeprec bench --paths bf16,mxfp4-w4a16 --M 1024,4096,16384 \
        --graph-max-m 16384 --no-peers --reps 8 --sets 3 --no-plot --out "$OUT/prefill_graphed" 2>&1 \
        | tee "$OUT/prefill_graphed.log" | tail -26 ;;
    dequant-probe)  # the probe: MXFP4 tiles, decoded first with bf16's and w4a16's settings, bf16
      timeout 330 python3 benchmarks/probes/w4a16_dequant.py --out "$OUT" 2>&1 \
        | tee "$OUT/w4a16_dequant.log" | tail -20 ;;
    *) echo "unknown section: $section (tests | router | train | kernels | moe | decode | tiles | even-k | split-k | decode-flags | decode-tune | dequant | dequant-probe | prefill-tune | host | align | stages | combine | stage-sweep | tune-4096 | fp8-tune | w4a8 | decoders | w4a8-tune | tma | small-kernels | pdl)" >&2; exit 2 ;;
  esac
done
