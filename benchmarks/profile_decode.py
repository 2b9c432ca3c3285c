"""Kernel-time breakdown of one plain decode step (8B shape, batch 1), from torch.profiler.

GPU only:  python benchmarks/profile_decode.py [--batch 1]
Runs the decode step eagerly (same kernels as the CUDA graph, without graph replay) and prints
total CUDA time per kernel name, grouped, so the gap to the weights' HBM floor can be placed.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eaglespec.bench.decode import PRESETS  # noqa: E402
from eaglespec.config import EngineConfig, SamplingParams  # noqa: E402
from eaglespec.engine.llm import LLM  # noqa: E402
from eaglespec.models.llama import build_model  # noqa: E402


def graph_vs_step(model, batch: int) -> None:
    """Engine step wall time (host included) against replaying the captured decode graph alone."""
    import time

    engine = EngineConfig(max_batch_size=batch, max_model_len=512, gpu_memory_fraction=0.3)
    llm = LLM.from_model(model, engine=engine)
    for _ in range(batch):
        llm.add_request(list(range(1, 129)), SamplingParams(max_tokens=200, ignore_eos=True))
    walls = []
    for i in range(60):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm.step()
        torch.cuda.synchronize()
        if i > 10:
            walls.append(1000 * (time.perf_counter() - t0))
    graph = llm.runner.decode_graphs[True]._graphs[batch][0]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(50):
        graph.replay()
    end.record()
    end.synchronize()
    walls.sort()
    print(f"batch {batch}: engine step {walls[len(walls) // 2]:.3f} ms (synced, host included); "
          f"graph replay alone {start.elapsed_time(end) / 50:.3f} ms", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--graphs", action="store_true", help="also time engine steps against graph replay")
    args = ap.parse_args()
    cfg = PRESETS["llama-3.1-8b"]
    model = build_model(cfg, "cuda", torch.bfloat16)
    model.init_random(seed=0)
    if args.graphs:
        graph_vs_step(model, args.batch)
    engine = EngineConfig(max_batch_size=args.batch, max_model_len=512, use_cuda_graphs=False, gpu_memory_fraction=0.3)
    llm = LLM.from_model(model, engine=engine)
    prompts = [list(range(1, 129)) for _ in range(args.batch)]
    for p in prompts:
        llm.add_request(p, SamplingParams(max_tokens=64, ignore_eos=True))
    for _ in range(8):  # prefill + warm-up decode steps
        llm.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            llm.step()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            t = totals.setdefault(ev.name, [0.0, 0])
            t[0] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            t[1] += 1
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])
    all_us = sum(v[0] for _, v in rows) / args.steps
    print(f"batch {args.batch}: {all_us / 1000:.3f} ms of kernel time per step, "
          f"{sum(v[1] for _, v in rows) / args.steps:.0f} kernels per step")
    for name, (us, n) in rows[:25]:
        print(f"{us / args.steps / 1000:8.3f} ms  {n / args.steps:6.0f}x  {name[:110]}")


if __name__ == "__main__":
    main()
