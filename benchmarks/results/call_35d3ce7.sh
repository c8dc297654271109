#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 || exit
S=$(date +%s)
timeout 200 python3 benchmarks/gpu_memory_speed.py --engine single --grad-clip 1.0 --only adamw,frugal_block_d0.25,frugal_d0,frugal_columns_d0.25,frugal_projection_d0.25,frugal_svd_d0.25 --max-seconds 170 --out $OUT/gpu_memory_speed_single.json > $OUT/gms.log 2>&1
grep "^\[1b\|^| 1b\|Error\|error" $OUT/gms.log | head -30
echo "gms done $(( $(date +%s)-S ))s"
timeout 110 python3 benchmarks/step_trace.py --only adamw,frugal_svd_d0.25,frugal_svd_d0.25_normgiven,frugal_projection_d0.25,frugal_block_d0.25_normgiven --steps 10 --top 8 --out $OUT/step_trace_cuda.json > $OUT/step_trace.log 2>&1
grep "^==" $OUT/step_trace.log
echo "trace done $(( $(date +%s)-S ))s"
timeout 50 python3 benchmarks/kernels_projection_state.py --out $OUT/kernels_projection_state_cuda.json > $OUT/kps.log 2>&1
timeout 40 python3 benchmarks/kernels_projection_state.py --precisions bf16 --clip --out $OUT/kernels_projection_state_clip_cuda.json > $OUT/kps_clip.log 2>&1
tail -12 $OUT/kps.log; tail -6 $OUT/kps_clip.log
echo "kps done $(( $(date +%s)-S ))s"
for f in tests/gpu/test_clip_grad_norm_cuda.py tests/gpu/test_projection_state.py tests/gpu/test_free_scale_cuda.py tests/gpu/test_block_gradnorm_cuda.py; do
  left=$((570-($(date +%s)-S))); if [ $left -lt 15 ]; then echo "== $f NOT RUN (time)"; continue; fi
  t0=$(date +%s); timeout $left python3 -m pytest -q -p no:cacheprovider -rf --tb=short $f > /tmp/t.log 2>&1; rc=$?
  echo "== $f rc=$rc $(( $(date +%s)-t0 ))s: $(tail -1 /tmp/t.log)"; echo "=== $f" >> $OUT/gpu_tests.log; cat /tmp/t.log >> $OUT/gpu_tests.log
done
grep -E "FAILED|Error" $OUT/gpu_tests.log | head -20
cd $OUT && tar czf all.tgz *.log *.json *.md *.png 2>/dev/null; ls
