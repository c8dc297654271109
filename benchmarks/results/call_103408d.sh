#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 || exit
mkdir -p $OUT/rso_b $OUT/blk
(timeout 400 python3 benchmarks/quality.py --gpus 0 --jobs-per-gpu 8 --total-tokens 8000000 --lrs 1e-3 --seeds 0,1 --variants rso_orthonormal,rso_inner50,rso_inner50_keep,rso_prox --eval-every 100 --eval-batches 16 --max-seconds 390 --cache-dir /tmp/tok --out-dir /tmp/qb -- --autocast=bfloat16 > $OUT/rso_b/quality.log 2>&1; cp /tmp/qb/quality.json /tmp/qb/quality.md $OUT/rso_b/) & Q1=$!
(timeout 400 python3 benchmarks/quality.py --gpus 0 --jobs-per-gpu 4 --total-tokens 8000000 --lrs 3e-3 --inactive-lr-scales 0.1 --seeds 0,1 --variants frugal_block,frugal_block_gradnorm --eval-every 100 --eval-batches 16 --max-seconds 390 --cache-dir /tmp/tok2 --out-dir /tmp/qc -- --autocast=bfloat16 > $OUT/blk/quality.log 2>&1; cp /tmp/qc/quality.json /tmp/qc/quality.md $OUT/blk/) & Q2=$!
S=$(date +%s)
for f in tests/gpu/test_*.py; do
  left=$((380-($(date +%s)-S))); if [ $left -lt 15 ]; then echo "== $f NOT RUN (time)"; continue; fi
  t0=$(date +%s); timeout $left python3 -m pytest -q -p no:cacheprovider -rf --tb=short $f > /tmp/t.log 2>&1; rc=$?
  echo "== $f rc=$rc $(( $(date +%s)-t0 ))s: $(tail -1 /tmp/t.log)"; echo "=== $f" >> $OUT/gpu_tests.log; cat /tmp/t.log >> $OUT/gpu_tests.log
done
wait $Q1; wait $Q2
grep -A6 "^| variant" $OUT/rso_b/quality.log | head -7; grep -A4 "^| variant" $OUT/blk/quality.log | head -5
timeout 150 python3 benchmarks/step_trace.py --only adamw,frugal_block_d0.25,frugal_block_d0.25_normgiven,frugal_block_d0.25_nocheck,frugal_d0,frugal_d0_normgiven,frugal_d0_nocheck,frugal_columns_d0.25,frugal_columns_d0.25_normgiven,frugal_svd_d0.25,frugal_svd_d0.25_normgiven --steps 10 --top 8 --out $OUT/step_trace_cuda.json > $OUT/step_trace.log 2>&1
grep "^==" $OUT/step_trace.log
cd $OUT && tar czf all.tgz rso_b blk *.log *.json 2>/dev/null; ls
