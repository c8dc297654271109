#!/usr/bin/env bash
# The multi-GPU benchmark and GPU-test batch, one command on a 4-GPU host (H200 x 4 here):
#
#   benchmarks/gpu_suite.sh OUT_DIR
#
# Phases (each bounded; results and logs land in OUT_DIR, one subfolder-free set of files):
#   1. LLaMA-1B memory/speed under DeepSpeed ZeRO-3 (GPUs 0,1; one launch per variant, merged)
#      and ZeRO-2 (GPUs 2,3), side by side.
#   2. Communication bytes/time on 4 GPUs (comm_bench.py), FSDP2 memory/speed on 4 GPUs.
#   3. GPU-only tests (tests/gpu: fairscale FSDP, DeepSpeed fp16 loss scaling, CUDA step) on
#      GPUs 0,1; the largest-model scaling sweep on GPU 2; the optimizer-step profile on GPU 3.
# Run it after the stage.sh setup line (deepspeed/fairscale wheels on PYTHONPATH, NVLink
# multicast off). Every benchmark also records its command, hardware and versions in its JSON.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_suite.sh OUT_DIR}
mkdir -p "$out"
say() { echo "[gpu_suite] $(date +%T) $*"; }
ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')
nvidia-smi -L
[ "$ngpu" -ge 4 ] || { echo "gpu_suite.sh needs 4 GPUs, found $ngpu" >&2; exit 2; }
tr="torchrun --standalone"
mem=benchmarks/gpu_memory_speed.py

say "phase 1: ZeRO-3 (one launch per variant, merged) | ZeRO-2, LLaMA-1B, 2 GPUs each"
# DeepSpeed ZeRO-3 keeps a finished engine's memory in the process, so each variant gets its own
# launch there; ZeRO-2 frees it and runs every variant in one launch.
(
  parts=()
  for v in adamw frugal_block_d0.25 frugal_columns_d0.25 frugal_projection_d0.25 frugal_d0 rso; do
    CUDA_VISIBLE_DEVICES=0,1 timeout 90 $tr --nproc_per_node 2 $mem --engine zero3 --only "$v" \
      --max-seconds 45 --out "$out/zero3_$v.json" >>"$out/zero3.log" 2>&1
    [ -f "$out/zero3_$v.json" ] && parts+=("$out/zero3_$v.json")
  done
  python3 $mem --merge "${parts[@]}" --out "$out/gpu_memory_speed_zero3.json" >>"$out/zero3.log" 2>&1
  rm -f "$out"/zero3_*
) &
CUDA_VISIBLE_DEVICES=2,3 timeout 200 $tr --nproc_per_node 2 $mem --engine zero2 \
  --max-seconds 100 --out "$out/gpu_memory_speed_zero2.json" >"$out/zero2.log" 2>&1 &
wait

say "phase 2: communication and FSDP2 on 4 GPUs"
timeout 150 $tr --nproc_per_node 4 benchmarks/comm_bench.py --model 1b --max-seconds 60 \
  --out "$out/comm_bench_ws4.json" >"$out/comm4.log" 2>&1
timeout 150 $tr --nproc_per_node 4 $mem --engine fsdp2 --max-seconds 75 \
  --out "$out/gpu_memory_speed_fsdp2_ws4.json" >"$out/fsdp2_ws4.log" 2>&1

say "phase 3: GPU tests | scaling sweep | step profile"
CUDA_VISIBLE_DEVICES=0,1 timeout 280 python3 -m pytest -q -p no:cacheprovider -rs tests/gpu \
  >"$out/gpu_tests.log" 2>&1 &
CUDA_VISIBLE_DEVICES=2 timeout 280 python3 $mem --engine single --scaling --max-seconds 240 \
  --out "$out/gpu_memory_speed_single_scaling.json" >"$out/scaling.log" 2>&1 &
CUDA_VISIBLE_DEVICES=3 timeout 200 python3 benchmarks/step_profile.py \
  --out "$out/step_profile_cuda_h200.json" >"$out/step_profile.log" 2>&1 &
wait
say "done"
tail -n 3 "$out"/*.log
