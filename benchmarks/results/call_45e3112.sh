#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 || exit
python3 -c "import triton,torch;print('triton',triton.__version__,'torch',torch.__version__)"
mkdir -p $OUT/rso_a
(timeout 330 python3 benchmarks/quality.py --gpus 0 --jobs-per-gpu 8 --total-tokens 8000000 --lrs 1e-3 --seeds 0,1 --variants rso,rso_lr2x,rso_orthonormal_lr2x,rso_keep_moments --eval-every 100 --eval-batches 16 --max-seconds 320 --cache-dir /tmp/tok --out-dir /tmp/qa -- --autocast=bfloat16 > $OUT/rso_a/quality.log 2>&1; cp /tmp/qa/quality.json /tmp/qa/quality.md $OUT/rso_a/) & Q=$!
timeout 320 python3 -m pytest -q -p no:cacheprovider tests/gpu > $OUT/gpu_tests.log 2>&1
tail -15 $OUT/gpu_tests.log
wait $Q
grep -A10 "^| variant" $OUT/rso_a/quality.log | head -12
timeout 150 python3 benchmarks/step_trace.py --only frugal_projection_d0.25,frugal_svd_d0.25 --refresh --refresh-steps 5 --top 10 --out $OUT/step_trace_refresh.json > $OUT/step_trace_refresh.log 2>&1
grep -i "refresh\|^==" $OUT/step_trace_refresh.log | head -30
cd $OUT && tar czf all.tgz rso_a *.log *.json 2>/dev/null; ls
