"""Where a decoding step's wall time goes on the real model: host work, waiting, device idle.

Runs MT-bench first turns one at a time (batch 1 by default) through plain decoding and through
each fixed tree given, on the default SmolLM2 + shipped head, and reports per engine step:
- wall time of ``LLM.step``, and the part of it spent blocked on the device (the flight's wait);
- the rest is host work; when the device finishes before the host queues more, it idles;
- a torch.profiler window (graphs replay as one launch each): device busy time over the window's
  span, the largest gaps, and the host ops that took longest;
- a window under CUDA's sync debug mode: every call that made the host wait for the device,
  with the Python line that made it (a hidden wait undoes the overlap of consecutive steps);
- the Python functions that took longest (cProfile).
The e2e benchmark says how fast; this says why a step costs more than its graph's replay.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
import warnings
from collections import Counter

import torch

from eaglespec import LLM, EngineConfig, SamplingParams, SpecConfig
from eaglespec.engine.llm import shipped_head_path
from eaglespec.engine.runner import DecodeFlight
from eaglespec.models.eagle import load_head
from eaglespec.speculative.step import SpecFlight
from eaglespec.train.data import load_conversations


class WaitClock:
    """Time spent inside the flights' ``wait`` (blocked on the device), patched on the classes."""

    def __init__(self):
        self.seconds = 0.0
        self._originals = {}

    def __enter__(self):
        for cls in (SpecFlight, DecodeFlight):
            original = cls.wait
            self._originals[cls] = original

            def timed(flight, _original=original):
                t = time.perf_counter()
                try:
                    return _original(flight)
                finally:
                    self.seconds += time.perf_counter() - t
            cls.wait = timed
        return self

    def __exit__(self, *exc):
        for cls, original in self._originals.items():
            cls.wait = original


def run_steps(llm: LLM, prompts, params, batch: int, profile=None) -> dict:
    """Every prompt, ``batch`` at a time; per-step wall and wait times of decoding steps."""
    walls, waits, prefills, tokens = [], [], [], 0
    sync = torch.cuda.synchronize if llm.device.type == "cuda" else (lambda: None)
    with WaitClock() as clock:
        sync()
        t0 = time.perf_counter()
        for i in range(0, len(prompts), batch):
            for p, sp in zip(prompts[i:i + batch], params[i:i + batch]):
                llm.add_request(p, sp)
            while llm.has_work:
                w0, s0 = clock.seconds, time.perf_counter()
                deltas = llm.step()
                if llm.core.last_step_kind in ("decode", "speculative"):
                    walls.append(time.perf_counter() - s0)
                    waits.append(clock.seconds - w0)
                else:
                    prefills.append(time.perf_counter() - s0)
                tokens += sum(len(d.new_token_ids) for d in deltas)
                if profile is not None:
                    profile.step()
            llm._requests.clear()
        sync()
        elapsed = time.perf_counter() - t0
    n = max(len(walls), 1)
    wall_ms, wait_ms = 1e3 * sum(walls) / n, 1e3 * sum(waits) / n
    return {"steps": len(walls), "tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed,
            "step_wall_ms": wall_ms, "step_wait_ms": wait_ms, "step_host_ms": wall_ms - wait_ms,
            "outside_steps_ms_per_step": 1e3 * (elapsed - sum(walls)) / n,
            # Of the time outside decoding steps, the prefill steps' (host and device, per prefill step).
            "prefill_steps": len(prefills), "prefill_step_ms": 1e3 * sum(prefills) / max(len(prefills), 1)}


def prefill_costs(llm: LLM, prompts) -> dict:
    """What one prompt's prefill costs, alone (max_tokens=1, so the prefill step is the whole
    request): its wall time with the device synchronized, the kernels it ran and their device
    time (torch.profiler), and its Python hotspots. At batch 1 a prefill of ~100 tokens costs
    as much as dozens of decode steps, most of it host work of eager launches."""
    params = SamplingParams(max_tokens=1)
    sync = torch.cuda.synchronize if llm.device.type == "cuda" else (lambda: None)

    def one(p) -> float:
        llm.add_request(p, params)
        sync()
        t = time.perf_counter()
        while llm.has_work:
            llm.step()
        sync()
        llm._requests.clear()
        return time.perf_counter() - t

    one(prompts[0])  # warm-up: compiles
    walls = [one(p) for p in prompts]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for p in prompts:
            one(p)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    profiler = cProfile.Profile()
    profiler.enable()
    for p in prompts:
        one(p)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    n = len(prompts)
    return {"prompts": n, "prompt_tokens_mean": sum(map(len, prompts)) / n, "prefill_ms_mean": 1e3 * sum(walls) / n,
            "kernels_per_prefill": len(kernels) / n,
            "device_us_per_prefill": sum(getattr(e, "device_time", 0.0) for e in kernels) / n,
            "python_hotspots": text.getvalue()}


def host_waits(llm: LLM, prompts, params, batch: int) -> dict[str, float]:
    """Per decoding step, how often each Python line made the host wait for the device (CUDA's
    sync debug mode warns at every such call; empty on the CPU)."""
    if llm.device.type != "cuda":
        return {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            steps = run_steps(llm, prompts, params, batch)["steps"]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = Counter(f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    return {line: n / max(steps, 1) for line, n in where.most_common(12)}


def device_timeline(prof) -> dict:
    """Device busy fraction over the profiled window and its largest idle gaps."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    if not spans:
        return {}
    busy, gaps, end = 0.0, [], spans[0][0]
    for s, e in spans:
        if s > end:
            gaps.append(s - end)
        busy += max(0.0, e - max(s, end))
        end = max(end, e)
    span = end - spans[0][0]
    gaps.sort(reverse=True)
    return {"span_us": span, "busy_us": busy, "busy_fraction": busy / span, "gaps_over_20us": sum(g > 20 for g in gaps),
            "idle_in_gaps_over_20us": sum(g for g in gaps if g > 20), "largest_gaps_us": gaps[:10]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--questions", default="mtbench")
    ap.add_argument("--num", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--trees", default="dynamic:5,8,32;chain:3")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    engine = EngineConfig(max_batch_size=max(args.batch, 2), max_model_len=2048, gpu_memory_fraction=0.3)
    plain = LLM(draft="none", engine=engine)
    convs = load_conversations(args.questions, 0, args.num)
    prompts = [plain.tokenizer.encode(plain.tokenizer.apply_chat_template([{"role": "user", "content": c[0]}]))
               for c in convs if c]
    params = [SamplingParams(max_tokens=args.max_tokens, seed=i) for i in range(len(prompts))]
    head = load_head(shipped_head_path(), plain.model)
    engines = {"plain": plain}
    for tree in (t for t in args.trees.split(";") if t):
        engines[tree] = LLM.from_model(plain.model, tokenizer=plain.tokenizer, draft=head, engine=engine,
                                       spec=SpecConfig(tree=tree), eos_ids=plain.eos_ids)
    report = {}
    for name, llm in engines.items():
        warm = max(2, args.batch)  # the batch's own bucket is captured here, not in the timed run
        run_steps(llm, prompts[:warm], params[:warm], args.batch)  # warm-up: compiles and captures
        row = run_steps(llm, prompts, params, args.batch)
        # The profiled windows run one batch of the timed size (not one prompt: at batch 16 a
        # window of one request would profile batch 1): device busy time and gaps, host ops.
        window = slice(0, args.batch)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            run_steps(llm, prompts[window], params[window], args.batch)
        row["device"] = device_timeline(prof)
        row["host_ops"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        row["host_waits_per_step"] = host_waits(llm, prompts[window], params[window], args.batch)
        profiler = cProfile.Profile()
        profiler.enable()
        run_steps(llm, prompts[window], params[window], args.batch)
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
        row["python_hotspots"] = text.getvalue()
        row["prefill"] = prefill_costs(llm, prompts)
        report[name] = row
        print(f"== {name}: {row['tokens_per_s']:.0f} tok/s, {row['steps']} steps, step wall {row['step_wall_ms']:.3f} ms "
              f"(blocked {row['step_wait_ms']:.3f}, host {row['step_host_ms']:.3f}), outside steps "
              f"{row['outside_steps_ms_per_step']:.3f} ms/step ({row['prefill_steps']} prefill steps of "
              f"{row['prefill_step_ms']:.2f} ms); device busy {row['device'].get('busy_fraction', 0):.1%} "
              f"of {row['device'].get('span_us', 0) / 1e3:.1f} ms, gaps>20us {row['device'].get('gaps_over_20us')}, "
              f"idle in them {row['device'].get('idle_in_gaps_over_20us', 0) / 1e3:.2f} ms", flush=True)
        pre = row["prefill"]
        print(f"== {name} prefill alone: {pre['prefill_ms_mean']:.2f} ms for {pre['prompt_tokens_mean']:.0f} tokens, "
              f"{pre['kernels_per_prefill']:.0f} kernels, {pre['device_us_per_prefill'] / 1e3:.2f} ms of device time",
              flush=True)
        print(pre["python_hotspots"][:4000])
        print("host waits per step (sync debug mode):", row["host_waits_per_step"])
        print(row["host_ops"])
        print(row["python_hotspots"][:6000])
        # Written after every engine: a run cut short keeps what it measured.
        with open(f"{args.out}/profile-step-b{args.batch}.json", "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
