"""Plain decoding speed: ms per step at several batch sizes, on a model built in place.

``python -m eaglespec.bench.decode --preset llama-3.1-8b`` builds a Llama-3.1-8B-shaped model
with random bf16 weights on the GPU (no download), prefills 128-token prompts and times the
decode phase of 256 new tokens through the engine (CUDA graphs, Triton attention, overlapped
steps). Achieved bandwidth counts the weight bytes read once per step plus the KV cache read by
attention.
"""

from __future__ import annotations

import argparse
import time

import torch

from eaglespec.bench.results import write_result
from eaglespec.config import EngineConfig, LlamaConfig, SamplingParams
from eaglespec.engine.graphs import bucket_for
from eaglespec.engine.llm import LLM
from eaglespec.models.llama import build_model

PRESETS = {
    "llama-3.1-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                                num_heads=32, num_kv_heads=8, rope_theta=500000.0, max_position_embeddings=131072,
                                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "smollm2-135m": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                                num_heads=9, num_kv_heads=3, rope_theta=100000.0, max_position_embeddings=8192,
                                tie_word_embeddings=True),
}

H100_COPY_BYTES_PER_S = 2.98e12  # device-to-device copy measured on the H100 here (the yardstick)


def measure_copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Bytes/s of a large device-to-device copy (bytes read + bytes written), median of 10."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del src, dst
    torch.cuda.empty_cache()
    return nbytes / sorted(times[2:])[len(times[2:]) // 2]


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes_read(cfg: LlamaConfig, batch: int, context: int, dtype_bytes: int) -> int:
    return 2 * cfg.num_layers * batch * context * cfg.num_kv_heads * cfg.head_dim * dtype_bytes


def time_decode(llm: LLM, batch: int, prompt_len: int, new_tokens: int, vocab: int) -> dict:
    """Prefill ``batch`` prompts, then time the decode steps as the engine runs them.

    ms per step = wall time of the whole decode phase (host work, overlapped steps and the
    final drain included) over the number of decode steps, as a user waiting for the tokens
    sees it. The graph's replay time alone (device only) is given beside it.
    """
    gen = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=gen).tolist() for _ in range(batch)]
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    ids = [llm.add_request(p, params) for p in prompts]
    sync = torch.cuda.synchronize if llm.device.type == "cuda" else (lambda: None)
    scheduled = llm.step()
    if len(scheduled) != batch:
        raise RuntimeError(f"expected one prefill step for {batch} prompts, got {len(scheduled)} requests")
    sync()
    t0 = time.perf_counter()
    while llm.has_work:
        llm.step()
    sync()
    wall_ms = 1000 * (time.perf_counter() - t0)
    for i in ids:
        llm.collect(i)
    steps = new_tokens - 1  # the prefill produced each request's first token
    return {"batch": batch, "steps_timed": steps, "ms_per_step": wall_ms / steps,
            "graph_replay_ms": graph_replay_ms(llm, batch)}


def graph_replay_ms(llm: LLM, batch: int, reps: int = 50) -> float | None:
    """Device time of one decode step: the bucket's greedy graph replayed back to back."""
    graphs = llm.runner.decode_graphs[True]
    bucket = bucket_for(batch, llm.runner.buckets)
    if not graphs.use_graphs or bucket not in graphs._graphs:
        return None
    graph = graphs._graphs[bucket][0]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="llama-3.1-8b", choices=sorted(PRESETS))
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--no-overlap", action="store_true",
                    help="read each step's tokens before queueing the next (the comparison)")
    args = ap.parse_args(argv)
    cfg = PRESETS[args.preset]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(cfg, device, dtype)
    model.init_random(seed=0)
    batches = [int(b) for b in args.batches.split(",")]
    engine = EngineConfig(max_batch_size=max(batches), max_model_len=args.prompt_len + args.new_tokens + 64,
                          gpu_memory_fraction=0.5,
                          overlap_decode=not args.no_overlap)
    llm = LLM.from_model(model, engine=engine)
    wbytes = weight_bytes(model)
    copy_bw = measure_copy_bandwidth(device) if device.type == "cuda" else H100_COPY_BYTES_PER_S
    print(f"device-to-device copy: {copy_bw / 1e12:.2f} TB/s", flush=True)
    rows = []
    for batch in batches:
        time_decode(llm, batch, 16, 8, cfg.vocab_size)  # warm-up: compiles kernels, captures the graph
        r = time_decode(llm, batch, args.prompt_len, args.new_tokens, cfg.vocab_size)
        mean_context = args.prompt_len + args.new_tokens // 2
        moved = wbytes + kv_bytes_read(cfg, batch, mean_context, 2 if dtype != torch.float32 else 4)
        r["achieved_bytes_per_s"] = moved / (r["ms_per_step"] / 1000)
        r["fraction_of_measured_copy_bandwidth"] = r["achieved_bytes_per_s"] / copy_bw
        r["fraction_of_h100_copy_bandwidth"] = r["achieved_bytes_per_s"] / H100_COPY_BYTES_PER_S
        r["weight_floor_ms"] = 1000 * wbytes / copy_bw
        rows.append(r)
        graph = "" if r["graph_replay_ms"] is None else f", graph alone {r['graph_replay_ms']:.2f} ms"
        print(f"{args.preset} batch {batch:3d}: {r['ms_per_step']:.2f} ms/step (floor {r['weight_floor_ms']:.2f}"
              f"{graph}), {100 * r['fraction_of_measured_copy_bandwidth']:.0f}% of copy bandwidth", flush=True)
    name = (f"decode-{args.preset}"
            + ("-no-overlap" if args.no_overlap else ""))
    path = write_result(name, {"weight_bytes": wbytes, "copy_bytes_per_s": copy_bw,
                                                  "prompt_len": args.prompt_len,
                                                  "overlap_decode": not args.no_overlap,
                                                  "new_tokens": args.new_tokens, "rows": rows}, device, args.out)
    print("wrote", path)


if __name__ == "__main__":
    main()
