#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpuq/wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
mkdir -p .gpu && cp .gpuq/manifest.json .gpu/manifest.json; [ -f .gpuq/data/tokenizer/enwiki-bpe-32k.json ] || xz -dk .gpuq/data/tokenizer/enwiki-bpe-32k.json.xz
cp /tmp/shards/train-*.jsonl.xz .gpuq/data/enwiki2015/ 2>/dev/null; n=$(ls .gpuq/data/enwiki2015/train-*.jsonl.xz | wc -l); echo "train shards: $n"; [ "$n" = 10 ] || { echo "need 10 shards"; exit 3; }
D=(--test-files .gpuq/data/enwiki2015/test.jsonl.xz --train-files '.gpuq/data/enwiki2015/train-*.jsonl.xz' --val-files .gpuq/data/enwiki2015/val.jsonl.xz --tokenizer .gpuq/data/tokenizer/enwiki-bpe-32k.json)
mkdir -p $OUT/ada
S=$(date +%s)
(timeout 415 python3 benchmarks/quality.py --gpus 0 --jobs-per-gpu 2 --total-tokens 40108032 --lrs 3e-3 --inactive-lr-scales 1 --seeds 0,1 --variants frugal_projection_matched_adaT --eval-every 100 --eval-batches 16 --max-seconds 410 "${D[@]}" --cache-dir /tmp/tokE --out-dir /tmp/qe -- --autocast=bfloat16 > $OUT/ada/quality.log 2>&1; cp /tmp/qe/quality.json /tmp/qe/quality.md $OUT/ada/; for d in /tmp/qe/runs/*; do echo "== $d"; tail -n 4 $d/stdout.log; grep -c "refresh" $d/stdout.log; done > $OUT/ada/tails.log 2>&1) & Q1=$!
wait $Q1
grep -A3 "^| variant" $OUT/ada/quality.log | head -4; tail -n 3 $OUT/ada/quality.log
left=$((420-($(date +%s)-S))); echo "left $left"
[ $left -gt 40 ] && timeout $left python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/gpu/test_step_plan_cuda.py tests/gpu/test_cuda_step.py > $OUT/gpu_tests.log 2>&1; tail -n 3 $OUT/gpu_tests.log
cd $OUT && tar czf all.tgz ada *.log; ls
