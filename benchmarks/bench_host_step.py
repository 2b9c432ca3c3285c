"""The engine's host work per decode step, with the device's work taken out (any machine).

At a large batch a step's host side (scheduling, staging the inputs, recording each request's
token, detokenizing, building the deltas) grows with the rows while the device's step barely
does, so the host can set the pace: data preparation at 256 rows made 19k tokens/s on an H100
where the device decodes several times faster (design note 34). This benchmark builds the engine
on the CPU around a one-layer model with SmolLM2's vocabulary and real tokenizer, replaces the
decode step's forward by an instant one (each row's next token is its input + 1), prefills
``--batch`` prompts, and times ``LLM.step`` over ``--steps`` decode steps.

``python benchmarks/bench_host_step.py --batch 256 --steps 200 [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

from eaglespec.config import EngineConfig, LlamaConfig, SamplingParams
from eaglespec.engine.llm import LLM
from eaglespec.engine.runner import StepRows
from eaglespec.models.llama import build_model
from eaglespec.models.loading import default_model_path
from eaglespec.tokenizer import Tokenizer

FIRST_ID = 100  # instant tokens stay clear of the special ids at the start of the vocabulary


def build(batch: int, prompt_len: int, steps: int) -> LLM:
    cfg = LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=16, num_layers=1, num_heads=1,
                      num_kv_heads=1, head_dim=16, rope_theta=10000.0, max_position_embeddings=4096)
    model = build_model(cfg, "cpu", torch.float32)
    model.init_random(seed=0, std=0.1)
    longest = prompt_len + steps + 80  # the prefill steps decode too (mixed steps): room past --steps
    engine = EngineConfig(max_batch_size=batch, max_model_len=longest, block_size=16,
                          num_blocks=batch * (longest // 16 + 2) + 8, use_cuda_graphs=False, attention_backend="torch")
    llm = LLM.from_model(model, tokenizer=Tokenizer.from_source(default_model_path()), engine=engine, eos_ids=(2,))
    vocab = cfg.vocab_size

    def instant(x: dict[str, torch.Tensor], greedy: bool) -> tuple[torch.Tensor, ...]:
        rows = StepRows(x["packed"], llm.runner.max_blocks_per_seq)
        return ((rows["input_ids"] - FIRST_ID + 1) % (vocab - FIRST_ID) + FIRST_ID,)

    llm.runner._decode_fn = instant
    return llm


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--no-text", action="store_true", help="SamplingParams(detokenize=False): token ids only")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    llm = build(args.batch, args.prompt_len, args.steps)
    rng = random.Random(0)
    for _ in range(args.batch):
        prompt = [rng.randrange(FIRST_ID, 49000) for _ in range(args.prompt_len)]
        llm.add_request(prompt, SamplingParams(max_tokens=args.steps + 64, ignore_eos=True, detokenize=not args.no_text))
    while llm.scheduler.waiting or any(r.num_cached < len(r.prompt_ids) for r in llm.scheduler.running):
        llm.step()  # prefill (the tiny model), not timed
    assert len(llm.scheduler.running) == args.batch, "every row must be running before the timed steps"
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        llm.step()
        times.append(time.perf_counter() - t0)
        assert len(llm.scheduler.running) == args.batch
    times.sort()
    record = {"benchmark": "host-step", "batch": args.batch, "prompt_len": args.prompt_len, "steps": args.steps,
              "detokenize": not args.no_text,
              "ms_per_step_median": 1e3 * times[len(times) // 2], "us_per_row_median": 1e6 * times[len(times) // 2] / args.batch,
              "python": sys.version.split()[0], "torch": torch.__version__}
    print(json.dumps(record))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = f"host-step-b{args.batch}" + ("-no-text" if args.no_text else "")
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
