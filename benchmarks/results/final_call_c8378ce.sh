#!/bin/bash
# third-session final GPU call (copied into benchmarks/results/COMMANDS.md)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 || exit
mkdir -p $OUT/q1 $OUT/q2
(timeout 235 python3 benchmarks/quality.py --gpus 0 --jobs-per-gpu 6 --total-tokens 6000000 --lrs 3e-3 --inactive-lr-scales 0.1 --seeds 0,1 --variants frugal_block_exact_w4,frugal_block_sign_w4,frugal_block_hier_2x2 --eval-every 100 --eval-batches 16 --max-seconds 210 --cache-dir /tmp/tok1 --out-dir /tmp/q1 -- --autocast=bfloat16 > $OUT/q1/quality.log 2>&1; cp /tmp/q1/quality.json /tmp/q1/quality.md $OUT/q1/) & Q1=$!
(timeout 235 python3 benchmarks/quality.py --gpus 0 --jobs-per-gpu 2 --total-tokens 8000000 --lrs 3e-3 --inactive-lr-scales 1,0.1 --seeds 0 --variants frugal_projection_matched --eval-every 100 --eval-batches 16 --max-seconds 210 --cache-dir /tmp/tok2 --out-dir /tmp/q2 -- --autocast=bfloat16 > $OUT/q2/quality.log 2>&1; cp /tmp/q2/quality.json /tmp/q2/quality.md $OUT/q2/) & Q2=$!
timeout 220 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_step_plan_cuda.py tests/gpu/test_free_scale_cuda.py tests/gpu/test_cuda_kernels_step.py tests/gpu/test_projection_state.py tests/gpu/test_kernels_finite_cuda.py tests/gpu/test_kernels_elementwise.py > $OUT/gpu_tests.log 2>&1
tail -12 $OUT/gpu_tests.log
wait $Q1; wait $Q2
grep -A6 "^| variant" $OUT/q1/quality.log | head -8; grep -A4 "^| variant" $OUT/q2/quality.log | head -5
timeout 170 python3 benchmarks/gpu_memory_speed.py --engine single --only adamw,frugal_block_d0.25,frugal_d0,frugal_columns_d0.25,frugal_projection_d0.25,frugal_svd_d0.25,frugal_svd_tf32_d0.25 --max-seconds 150 --out $OUT/gpu_memory_speed_single.json > $OUT/gms.log 2>&1
grep "^\[1b\|^| 1b" $OUT/gms.log
timeout 90 python3 benchmarks/step_trace.py --only adamw,frugal_block_d0.25,frugal_d0,frugal_columns_d0.25,frugal_svd_d0.25,frugal_block_d0.25_nocheck,frugal_d0_nocheck --steps 10 --top 8 --out $OUT/step_trace_cuda.json > $OUT/step_trace.log 2>&1
grep "^==" $OUT/step_trace.log
cd $OUT && tar czf all.tgz q1 q2 *.log *.json *.png *.md 2>/dev/null; ls
