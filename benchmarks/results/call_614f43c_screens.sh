#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpuq/wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
mkdir -p .gpu && cp .gpuq/manifest.json .gpu/manifest.json; [ -f .gpuq/data/tokenizer/enwiki-bpe-32k.json ] || xz -dk .gpuq/data/tokenizer/enwiki-bpe-32k.json.xz
D=(--train-files '.gpuq/data/enwiki2015/train-0[0-3].jsonl.xz' --val-files .gpuq/data/enwiki2015/val.jsonl.xz --tokenizer .gpuq/data/tokenizer/enwiki-bpe-32k.json)
D+=(--test-files .gpuq/data/enwiki2015/test.jsonl.xz)
mkdir -p $OUT/scr $OUT/cm
(timeout 420 python3 benchmarks/quality.py --gpus 0 --jobs-per-gpu 8 --total-tokens 8000000 --lrs 3e-3 --inactive-lr-scales 0.1 --seeds 0,1 --variants frugal_d0_exact_w4,frugal_d0_sign_w4,frugal_d0_hier_2x2,frugal_projection_decay,frugal_columns --eval-every 100 --eval-batches 16 --max-seconds 410 "${D[@]}" --cache-dir /tmp/tokC --out-dir /tmp/qc -- --autocast=bfloat16 > $OUT/scr/quality.log 2>&1; cp /tmp/qc/quality.json /tmp/qc/quality.md $OUT/scr/; for d in /tmp/qc/runs/*; do echo "== $d"; tail -4 $d/stdout.log; done > $OUT/scr/tails.log 2>&1) & Q1=$!
(timeout 420 python3 benchmarks/quality.py --gpus 0 --jobs-per-gpu 2 --total-tokens 8000000 --lrs 3e-3 --inactive-lr-scales 1 --seeds 0,1 --variants frugal_columns_matched --eval-every 100 --eval-batches 16 --max-seconds 410 "${D[@]}" --cache-dir /tmp/tokD --out-dir /tmp/qd -- --autocast=bfloat16 > $OUT/cm/quality.log 2>&1; cp /tmp/qd/quality.json /tmp/qd/quality.md $OUT/cm/; for d in /tmp/qd/runs/*; do echo "== $d"; tail -4 $d/stdout.log; done > $OUT/cm/tails.log 2>&1) & Q2=$!
wait $Q1; wait $Q2
grep -A8 "^| variant" $OUT/scr/quality.log | head -9; grep -A3 "^| variant" $OUT/cm/quality.log | head -4
grep -il "error\|Traceback" /tmp/qc/runs/*/stdout.log /tmp/qd/runs/*/stdout.log 2>/dev/null | head
cd $OUT && tar czf all.tgz scr cm; ls
