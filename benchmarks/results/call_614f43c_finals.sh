#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpuq/wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
mkdir -p .gpu && cp .gpuq/manifest.json .gpu/manifest.json; [ -f .gpuq/data/tokenizer/enwiki-bpe-32k.json ] || xz -dk .gpuq/data/tokenizer/enwiki-bpe-32k.json.xz
cp /tmp/shards/train-*.jsonl.xz .gpuq/data/enwiki2015/ 2>/dev/null; n=$(ls .gpuq/data/enwiki2015/train-*.jsonl.xz | wc -l); echo "train shards: $n"; [ "$n" = 10 ] || { echo "need 10 shards"; exit 3; }
D=(--test-files .gpuq/data/enwiki2015/test.jsonl.xz --train-files '.gpuq/data/enwiki2015/train-*.jsonl.xz' --val-files .gpuq/data/enwiki2015/val.jsonl.xz --tokenizer .gpuq/data/tokenizer/enwiki-bpe-32k.json)
mkdir -p $OUT/base $OUT/plus
(timeout 585 python3 benchmarks/quality.py --gpus 0 --jobs-per-gpu 2 --total-tokens 40108032 --lrs 3e-3 --inactive-lr-scales 0.1 --seeds 0,1 --variants frugal_projection --eval-every 100 --eval-batches 16 --max-seconds 575 "${D[@]}" --cache-dir /tmp/tokA --out-dir /tmp/qa -- --autocast=bfloat16 > $OUT/base/quality.log 2>&1; cp /tmp/qa/quality.json /tmp/qa/quality.md $OUT/base/; for d in /tmp/qa/runs/*; do echo "== $d"; tail -4 $d/stdout.log; done > $OUT/base/tails.log 2>&1) & Q1=$!
(timeout 585 python3 benchmarks/quality.py --gpus 0 --jobs-per-gpu 2 --total-tokens 40108032 --lrs 3e-3 --inactive-lr-scales 1 --seeds 0,1 --variants frugal_projection_matched --eval-every 100 --eval-batches 16 --max-seconds 575 "${D[@]}" --cache-dir /tmp/tokB --out-dir /tmp/qb -- --autocast=bfloat16 > $OUT/plus/quality.log 2>&1; cp /tmp/qb/quality.json /tmp/qb/quality.md $OUT/plus/; for d in /tmp/qb/runs/*; do echo "== $d"; tail -4 $d/stdout.log; done > $OUT/plus/tails.log 2>&1) & Q2=$!
wait $Q1; wait $Q2
grep -A4 "^| variant" $OUT/base/quality.log | head -5; grep -A4 "^| variant" $OUT/plus/quality.log | head -5
tail -3 $OUT/base/quality.log $OUT/plus/quality.log
cd $OUT && tar czf all.tgz base plus; ls
