#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 || exit
timeout 200 python3 benchmarks/gpu_memory_speed.py --engine single --grad-clip 1.0 --only adamw,frugal_block_d0.25,frugal_d0,frugal_columns_d0.25,frugal_projection_d0.25,frugal_svd_d0.25 --max-seconds 170 --out $OUT/gpu_memory_speed_single.json > $OUT/gms.log 2>&1
grep "^\[1b\|^| 1b\|Error\|error" $OUT/gms.log | head -30
