"""The main job on the embedded default: SmolLM2-135M-Instruct with the shipped EAGLE head.

Answers a few MT-bench-style questions with plain decoding, then with speculative decoding,
then plainly again on the same machine (the speedup is over the mean of the two plain runs, and
their spread says how steady the machine was), checks that greedy outputs are identical, and
prints tau and the speedup.
"""

from __future__ import annotations

import argparse
import time

from eaglespec import LLM, SamplingParams
from eaglespec.engine.llm import shipped_head_path

QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a short poem about the sea.",
    "Explain what a hash table is to a beginner.",
    "Give me three tips for staying focused while studying.",
]


def run(llm: LLM, params: SamplingParams) -> tuple[list, float]:
    t0 = time.perf_counter()
    outs = [llm.chat([{"role": "user", "content": q}], params) for q in QUESTIONS]
    return outs, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    params = SamplingParams(max_tokens=args.max_tokens)
    head = shipped_head_path()
    print(f"eaglespec demo: SmolLM2-135M-Instruct (embedded GGUF), draft head: {head or 'none shipped'}")
    plain = LLM(draft="none", device=args.device)
    run(plain, SamplingParams(max_tokens=4))  # warm-up (kernels, graphs)
    plain_outs, plain_s = run(plain, params)
    if head is None:
        for q, o in zip(QUESTIONS, plain_outs):
            print(f"\n> {q}\n{o.text}")
        print(f"\nplain decoding: {sum(len(o.token_ids) for o in plain_outs) / plain_s:.1f} tokens/s")
        return 0
    spec = LLM(device=args.device)
    # Warm-up: kernels and graphs, and tree="auto" tries each tree once on this machine before
    # the timed run (as a server does on its first requests).
    run(spec, SamplingParams(max_tokens=48))
    spec_outs, spec_s = run(spec, params)
    _, plain_again_s = run(plain, params)
    for q, o in zip(QUESTIONS, spec_outs):
        print(f"\n> {q}\n{o.text}")
    tokens = sum(len(o.token_ids) for o in spec_outs)
    forwards = sum(o.stats["target_forwards"] for o in spec_outs)
    same = all(a.token_ids == b.token_ids for a, b in zip(spec_outs, plain_outs))
    spec_rate = tokens / spec_s
    plain_tokens = sum(len(o.token_ids) for o in plain_outs)
    plain_rates = (plain_tokens / plain_s, plain_tokens / plain_again_s)
    plain_rate = sum(plain_rates) / 2
    spread = abs(plain_rates[0] - plain_rates[1]) / plain_rate
    chosen: dict[str, int] = {}
    for o in spec_outs:
        for choice, n in o.stats["speculation"].items():
            chosen[choice] = chosen.get(choice, 0) + n
    ran = ", ".join(f"{c} {n}" for c, n in sorted(chosen.items(), key=lambda kv: -kv[1]))
    print(f"\ntree {spec.spec_config.tree} (decoding steps: {ran}): tau = {tokens / forwards:.2f} tokens per "
          f"target forward")
    print(f"speculative {spec_rate:.1f} tokens/s, plain {plain_rate:.1f} tokens/s (a run before and after, "
          f"{spread:.0%} apart): speedup {spec_rate / plain_rate:.2f}x")
    print(f"greedy outputs identical to plain decoding: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
