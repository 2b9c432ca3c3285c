"""Plain decoding speed: ms per step at several batch sizes, on a model built in place.

``python -m eaglespec.bench.decode --preset llama-3.1-8b`` builds a Llama-3.1-8B-shaped model
with random bf16 weights on the GPU (no download), prefills 128-token prompts and times 256
decode steps through the engine (CUDA graphs, Triton attention). Achieved bandwidth counts the
weight bytes read once per step plus the KV cache read by attention.
"""

from __future__ import annotations

import argparse
import time

import torch

from eaglespec.bench.results import write_result
from eaglespec.config import EngineConfig, LlamaConfig, SamplingParams
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
    """Prefill ``batch`` prompts, then time the decode steps alone (median of per-step times)."""
    gen = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=gen).tolist() for _ in range(batch)]
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    ids = [llm.add_request(p, params) for p in prompts]
    step_ms = []
    sync = torch.cuda.synchronize if llm.device.type == "cuda" else (lambda: None)
    while llm.scheduler.has_work:
        sync()
        t0 = time.perf_counter()
        scheduled = llm.step()
        sync()
        if scheduled and all(len(r.output_ids) > 1 for r in scheduled):
            step_ms.append(1000 * (time.perf_counter() - t0))
    for i in ids:
        llm._requests.pop(i)
    step_ms.sort()
    return {"batch": batch, "steps_timed": len(step_ms), "ms_per_step_median": step_ms[len(step_ms) // 2],
            "ms_per_step_mean": sum(step_ms) / len(step_ms)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="llama-3.1-8b", choices=sorted(PRESETS))
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--no-single-token-gemv", action="store_true",
                    help="batch 1 on cuBLAS and separate element-wise kernels (the comparison)")
    args = ap.parse_args(argv)
    cfg = PRESETS[args.preset]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(cfg, device, dtype)
    model.init_random(seed=0)
    batches = [int(b) for b in args.batches.split(",")]
    engine = EngineConfig(max_batch_size=max(batches), max_model_len=args.prompt_len + args.new_tokens + 64,
                          gpu_memory_fraction=0.5, single_token_gemv=not args.no_single_token_gemv)
    llm = LLM.from_model(model, engine=engine)
    wbytes = weight_bytes(model)
    copy_bw = measure_copy_bandwidth(device) if device.type == "cuda" else H100_COPY_BYTES_PER_S
    print(f"device-to-device copy: {copy_bw / 1e12:.2f} TB/s", flush=True)
    time_decode(llm, 1, 16, 8, cfg.vocab_size)  # warm-up: compiles kernels, captures a graph
    rows = []
    for batch in batches:
        r = time_decode(llm, batch, args.prompt_len, args.new_tokens, cfg.vocab_size)
        mean_context = args.prompt_len + args.new_tokens // 2
        moved = wbytes + kv_bytes_read(cfg, batch, mean_context, 2 if dtype != torch.float32 else 4)
        r["achieved_bytes_per_s"] = moved / (r["ms_per_step_median"] / 1000)
        r["fraction_of_measured_copy_bandwidth"] = r["achieved_bytes_per_s"] / copy_bw
        r["fraction_of_h100_copy_bandwidth"] = r["achieved_bytes_per_s"] / H100_COPY_BYTES_PER_S
        r["weight_floor_ms"] = 1000 * wbytes / copy_bw
        rows.append(r)
        print(f"{args.preset} batch {batch:3d}: {r['ms_per_step_median']:.2f} ms/step "
              f"(floor {r['weight_floor_ms']:.2f}), {100 * r['fraction_of_measured_copy_bandwidth']:.0f}% of copy bandwidth",
              flush=True)
    name = f"decode-{args.preset}" + ("-no-gemv" if args.no_single_token_gemv else "")
    path = write_result(name, {"weight_bytes": wbytes, "copy_bytes_per_s": copy_bw,
                                                  "prompt_len": args.prompt_len,
                                                  "single_token_gemv": not args.no_single_token_gemv,
                                                  "new_tokens": args.new_tokens, "rows": rows}, device, args.out)
    print("wrote", path)


if __name__ == "__main__":
    main()
