#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 || exit
S=$(date +%s)
cp frugal_dist/kernels/projection_tiles.json /tmp/tiles_before.json
timeout 200 python3 benchmarks/kernels_projection_tiles.py --apply-v2 --down-v2 --precisions bf16 --time-cap 140 --out $OUT/tiles_v2.json --write-tiles frugal_dist/kernels/projection_tiles.json > $OUT/tiles.log 2>&1; echo "tiles rc=$? $(( $(date +%s)-S ))s"
tail -30 $OUT/tiles.log | grep -v "^$" | tail -25
cp frugal_dist/kernels/projection_tiles.json $OUT/projection_tiles.json
diff <(python3 -m json.tool /tmp/tiles_before.json) <(python3 -m json.tool frugal_dist/kernels/projection_tiles.json) | head -20
t0=$(date +%s); timeout 110 python3 benchmarks/kernels_sign.py --no-legacy --no-torch --out $OUT/kernels_sign_cuda.json > $OUT/sign.log 2>&1; echo "sign rc=$? $(( $(date +%s)-t0 ))s"
grep -i "target\|x bound\|vote_bits\|pack+vote" $OUT/sign.log | head -20
for f in tests/gpu/test_clip_grad_norm_cuda.py tests/gpu/test_grad_norm_cuda.py "tests/gpu/test_fairscale_fsdp.py -k columns" tests/gpu/test_sign_kernels_cuda.py tests/gpu/test_projection_state.py tests/gpu/test_kernels_elementwise.py tests/gpu/test_step_plan_cuda.py tests/gpu/test_kernels_projection.py tests/gpu/test_free_scale_cuda.py tests/gpu/test_kernels_finite_cuda.py tests/gpu/test_hierarchical_nccl.py tests/gpu/test_participants_nccl.py "tests/gpu/test_fairscale_fsdp.py -k llama"; do
  left=$((570-($(date +%s)-S))); if [ $left -lt 15 ]; then echo "== $f NOT RUN (time)"; continue; fi
  t0=$(date +%s); timeout $left python3 -m pytest -q -p no:cacheprovider -rf --tb=short $f > /tmp/t.log 2>&1; rc=$?
  echo "== $f rc=$rc $(( $(date +%s)-t0 ))s: $(tail -1 /tmp/t.log)"; echo "=== $f" >> $OUT/gpu_tests.log; cat /tmp/t.log >> $OUT/gpu_tests.log
done
grep -B2 -A25 "^FAILED\|Error" $OUT/gpu_tests.log | head -60
cd $OUT && tar czf all.tgz *.log *.json *.md 2>/dev/null; ls
