"""Cost of one speculative step against tree size and batch size, next to a plain decode step.

On a model built in place with random weights (default: Llama-3.1-8B shape, bf16) and a random
EAGLE-1 head of the official shape (one layer, fc 2H -> H). Every step function is captured as a
CUDA graph and timed by replaying it (median of CUDA-event timings). Reported per (batch, tree):
  decode_ms   plain decode step (one token per sequence)
  verify_ms   target forward over the tree (two-pass tree attention) + acceptance + commit
  step_ms     the whole speculative step: head extend, drafting, verify, accept, commit
  *_census    kernels launched by one eager run of the step (graphs off, torch.profiler) and the
              sum of their device time: a step bound by launches shows many kernels, little time
Random weights accept almost nothing, so tokens/s is also reported at *forced* acceptance
lengths tau = 2..5 and 2.78 (the seed paper's chain-3 tokens per call for Llama 3.1 8B; tokens
per step = tau, clearly not measured acceptance).
``--draft-vocab 32768,full``: each tree once per draft vocabulary size (the random head gets a
random token ranking; the step's cost does not depend on which tokens are kept).
``--temperature 0.7 --top-p 0.9``: the sampled steps (their graphs draw from the target's
distribution instead of taking its argmax).
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from eaglespec.bench.decode import PRESETS
from eaglespec.bench.e2e import draft_vocab_size_for, parse_draft_vocabs
from eaglespec.bench.results import write_result
from eaglespec.config import EngineConfig, LlamaConfig, SamplingParams, SpecConfig
from eaglespec.engine.graphs import StepGraphs
from eaglespec.engine.llm import LLM
from eaglespec.engine.runner import StepRows
from eaglespec.models.eagle import EagleConfig, EagleHead, build_head
from eaglespec.models.llama import build_model
from eaglespec.speculative.step import SPEC_ROWS
from eaglespec.speculative.tree import TreeBatch, ancestor_bits_from_parents
from eaglespec.speculative.verifier import verify_tree


FORCED_TAUS = (2, 2.78, 3, 4, 5)  # 2.78: the seed paper's chain-3 tokens per call for Llama 3.1 8B
NOTE = ("random weights: acceptance is not measured here; forced_tokens_per_s assumes tau tokens per step "
        "(tau = 2..5 and 2.78), i.e. what the step would deliver at that acceptance length")


def time_graph(fn, reps: int = 30) -> float:
    """Median ms of ``fn`` (a graph replay) over ``reps`` event-timed runs."""
    times = []
    for _ in range(3):
        fn()
    if not torch.cuda.is_available():  # CPU smoke runs only
        t0 = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - t0)
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def kernel_census(fn) -> dict:
    """Device work of one eager run of ``fn`` (graphs off), from torch.profiler: kernels launched,
    memory copies and sets, the sum of their device time and, per kernel name, [count, device us]
    (the 30 largest by time; CUDA only; None elsewhere)."""
    if not torch.cuda.is_available():
        return {"kernels": None, "copies_and_sets": None, "device_us": None, "by_kernel": None}
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    copies = [e for e in events if e.name.lower().startswith(("memcpy", "memset"))]
    device_us = sum(getattr(e, "device_time", 0.0) for e in events)
    by_kernel: dict[str, list] = {}
    for e in events:
        entry = by_kernel.setdefault(e.name[:80], [0, 0.0])
        entry[0] += 1
        entry[1] += getattr(e, "device_time", 0.0)
    largest = dict(sorted(by_kernel.items(), key=lambda kv: -kv[1][1])[:30])
    return {"kernels": len(events) - len(copies), "copies_and_sets": len(copies), "device_us": device_us,
            "by_kernel": largest}


def random_tree(batch: int, nodes: int, depth: int, vocab: int, device, cached_lens: torch.Tensor) -> TreeBatch:
    """A random tree of ``nodes`` draft nodes (plus the root) no deeper than ``depth``, its
    root at position cached_lens [B]."""
    gen = torch.Generator().manual_seed(nodes)
    parents, depths = [-1], [0]
    for i in range(1, nodes + 1):
        while True:
            p = int(torch.randint(0, i, (1,), generator=gen))
            if depths[p] < depth:
                break
        parents.append(p)
        depths.append(depths[p] + 1)
    par = torch.tensor(parents, device=device).expand(batch, -1).contiguous()
    dep = torch.tensor(depths, device=device).expand(batch, -1).contiguous()
    tokens = torch.randint(0, vocab, (batch, nodes + 1), generator=gen).to(device)
    return TreeBatch(tokens, par, dep, ancestor_bits_from_parents(par, depth), cached_lens[:, None].long() + dep)


def prefill_all(llm: LLM, batch: int) -> list:
    """Prefill every waiting request (the head too), however many ``schedule()`` calls the
    prefill token budget needs; check that ``batch`` requests are running, each with its whole
    prompt cached, so every row of the timed step is a real sequence and not padding."""
    while llm.scheduler.waiting or any(r.num_cached < len(r.all_ids) - 1 for r in llm.scheduler.running):
        scheduled = llm.scheduler.schedule_prefill(mixed=False)
        if scheduled is None:
            raise RuntimeError("spec_step: the KV pool cannot hold every request's prompt; lower --batches or --context")
        llm.core._apply(scheduled.requests, llm.core._prefill(scheduled), [True] * len(scheduled.requests))
    reqs = list(llm.scheduler.running)
    if len(reqs) != batch or any(r.num_cached != len(r.all_ids) - 1 for r in reqs):
        raise RuntimeError(f"spec_step: expected {batch} prefilled sequences, have {len(reqs)} running "
                           f"({sum(r.num_cached == len(r.all_ids) - 1 for r in reqs)} fully cached)")
    return reqs


def random_head(target) -> EagleHead:
    """A random one-layer EAGLE-1 head of the official shape for ``target``."""
    cfg = target.config
    head_layer = LlamaConfig(**{**{f: getattr(cfg, f) for f in cfg.__slots__}, "num_layers": 1, "eagle3_layers": ()})
    head = build_head(EagleConfig("eagle1", head_layer), target)
    head.init_random(seed=1)
    return head


def tree_specs(max_nodes: int) -> list[str]:
    specs = ["chain:1", "chain:3", "dynamic:3,2,4", "dynamic:4,4,8", "dynamic:5,4,16", "dynamic:6,6,32",
             "dynamic:6,8,48", "dynamic:7,8,60"]
    return [s for s in specs if (int(s.split(":")[1]) if s.startswith("chain") else int(s.split(",")[-1])) <= max_nodes]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="llama-3.1-8b", choices=sorted(PRESETS))
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--max-nodes", type=int, default=64)
    ap.add_argument("--trees", default="", help="';'-separated trees (default: a family up to --max-nodes)")
    ap.add_argument("--draft-vocab", default="default",
                    help="comma-separated draft vocabulary sizes, e.g. 32768,full (each tree runs with each)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: the greedy steps")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    greedy = args.temperature == 0
    device = torch.device(args.device)
    cfg: LlamaConfig = PRESETS[args.preset]
    target = build_model(cfg, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    target.init_random(seed=0)
    head = random_head(target)
    head.set_token_ranking(torch.randperm(cfg.vocab_size, generator=torch.Generator().manual_seed(2)))
    batches = [int(b) for b in args.batches.split(",")]
    trees = [t for t in args.trees.split(";") if t] or tree_specs(args.max_nodes)
    vocabs = parse_draft_vocabs(args.draft_vocab)
    name = (f"spec-step-{args.preset}" + ("-draft-vocab" if vocabs != [None] else "")
            + ("" if greedy else f"-t{args.temperature:g}-p{args.top_p:g}"))
    rows = []
    for spec_str, draft_vocab in [(t, n) for t in trees for n in vocabs]:
        engine = EngineConfig(max_batch_size=max(batches), max_model_len=args.context + 128, gpu_memory_fraction=0.3)
        llm = LLM.from_model(target, draft=head, spec=SpecConfig(tree=spec_str,
                                                                 draft_vocab_size=draft_vocab_size_for(draft_vocab, head)),
                             engine=engine)
        sr = llm.speculative
        program = sr.programs[spec_str]
        for batch in batches:
            gen = torch.Generator().manual_seed(batch)
            prompts = [torch.randint(0, cfg.vocab_size, (args.context,), generator=gen).tolist() for _ in range(batch)]
            params = SamplingParams(max_tokens=4, ignore_eos=True, temperature=args.temperature, top_p=args.top_p)
            ids = [llm.add_request(p, params) for p in prompts]
            reqs = prefill_all(llm, batch)
            for r in reqs:
                llm.scheduler._grow(r, r.num_cached + sr.lookahead)
            bucket = batch
            graphs = program.graphs[greedy]
            sr.stage_inputs(graphs, reqs, bucket)
            step_ms = time_graph(lambda: graphs.run(bucket))
            step_census = kernel_census(lambda: graphs.fn(graphs.inputs(bucket)))
            decode_graphs = llm.runner.decode_graphs[greedy]
            llm.runner.stage_inputs(decode_graphs, reqs, bucket)
            decode_ms = time_graph(lambda: decode_graphs.run(bucket))
            decode_census = kernel_census(lambda: decode_graphs.fn(decode_graphs.inputs(bucket)))
            # Verify alone: a fixed random tree of the same size through target + accept + commit.
            rows_in = StepRows(graphs.inputs(bucket)["packed"], llm.runner.max_blocks_per_seq, SPEC_ROWS)
            tables = rows_in.block_tables
            lens = rows_in["cached_lens"]
            tree = random_tree(batch, program.shape.num_nodes, program.shape.depth, cfg.vocab_size, device, lens)
            st = rows_in.sampling()

            def verify_fn(_x, tree=tree, tables=tables, lens=lens, st=st):
                res = verify_tree(llm.runner.model, llm.runner.cache, tree, lens, tables, st, greedy, "hidden",
                                  program.shape.depth, llm.runner.scale, llm.runner.backend)
                return res.accept.tokens, res.accept.num_emitted

            vg = StepGraphs(verify_fn, lambda b: {}, device.type == "cuda")
            verify_ms = time_graph(lambda: vg.run(bucket))
            verify_census = kernel_census(lambda: verify_fn(None))
            row = {"tree": spec_str, "nodes": program.shape.num_nodes, "draft_vocab": sr.vocab.size, "batch": batch,
                   "decode_ms": decode_ms,
                   "verify_ms": verify_ms, "step_ms": step_ms, "verify_over_decode": verify_ms / decode_ms,
                   "step_over_decode": step_ms / decode_ms,
                   "step_census": step_census, "decode_census": decode_census, "verify_census": verify_census,
                   "forced_tokens_per_s": {str(t): 1000 * t * batch / step_ms for t in FORCED_TAUS
                                           if t <= program.shape.depth + 1},
                   "plain_tokens_per_s": 1000 * batch / decode_ms}
            rows.append(row)
            print(f"{spec_str:>15s} ({row['nodes']:2d} nodes, vocab {sr.vocab.size:6d}) batch {batch:3d}: "
                  f"decode {decode_ms:6.2f} ms, "
                  f"verify {verify_ms:6.2f} ms ({row['verify_over_decode']:.2f}x), step {step_ms:6.2f} ms "
                  f"({row['step_over_decode']:.2f}x); kernels: step {step_census['kernels']}, "
                  f"decode {decode_census['kernels']}", flush=True)
            write_result(name, {"context": args.context, "temperature": args.temperature, "top_p": args.top_p,
                                "rows": rows, "note": NOTE}, device, args.out)
            for r in reqs:
                r.finish("length")
                llm.scheduler.retire(r)
                sr.release(r)
            for i in ids:
                llm._requests.pop(i)
        del llm, sr
        gc.collect()
        torch.cuda.empty_cache()
    print("wrote", write_result(name, {"context": args.context, "temperature": args.temperature,
                                       "top_p": args.top_p, "rows": rows, "note": NOTE}, device, args.out))


if __name__ == "__main__":
    main()
