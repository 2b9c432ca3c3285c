"""A chain:3 step emitted fewer tokens from one process to the next (CPU, fp32, the shipped head,
requests admitted while others run): found and fixed on 2026-12-08 (design note 72).

28 requests (prompt + the reply's first p tokens, from exact_samples.json's pairs 0-11 and
60-75) go into one engine at once (max_batch_size 4, so most are admitted while others run);
each one's first speculative step is logged (tokens emitted, reply tokens before it). Printed:
those of the last 16 and each of them alone in a fresh engine. Before the fix, run after run
of the same process (OMP_NUM_THREADS=1, the same schedule step for step), some runs gave
requests 2 and 13 two tokens where alone they emit four; with ``--fill`` (torch's
fill_uninitialized_memory: memory from torch.empty reads NaN) every run did. The cause: the
drafter's side K/V keep a padding row's values (NaN, from its scratch state) for the next step,
and tree attention multiplied unseen keys' values by a zero weight. After the fix, both lines
agree, with and without ``--fill``.

    for i in 1 2 3; do OMP_NUM_THREADS=1 python3 first_step_nondeterminism.py [--fill]; done
"""
import gzip
import json
import os
import sys

import torch

from eaglespec import LLM, EngineConfig, SamplingParams, SpecConfig
from eaglespec.bench.e2e import mtbench_prompts
from eaglespec.engine.llm import shipped_head_path
from eaglespec.models.eagle import load_head

HERE = os.path.dirname(os.path.abspath(__file__))


def first_steps(llm: LLM, prompts: list[list[int]]) -> list[tuple[int, int]]:
    """(tokens emitted, reply tokens before it) of each request's first speculative step, all added at once."""
    seen = {}
    count = llm.core._count_speculative

    def logged(reqs, emitted, choice):
        for r, row in zip(reqs, emitted):
            seen.setdefault(r.request_id, (len(row), len(r.output_ids)))
        count(reqs, emitted, choice)

    llm.core._count_speculative = logged
    ids = [llm.add_request(p, SamplingParams(max_tokens=8, ignore_eos=True)) for p in prompts]
    while llm.has_work:
        llm.step()
    return [seen[i] for i in ids]


def main() -> None:
    if "--fill" in sys.argv:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = True
    with gzip.open(os.path.join(HERE, "traces.json.gz"), "rt") as f:
        replies = next(iter(json.load(f)["traces"].values()))["token_ids"]
    pairs = json.load(open(os.path.join(HERE, "exact_samples.json")))["pairs"]
    plain = LLM(draft="none")
    prompts = mtbench_prompts(plain.tokenizer, "mtbench", 80)
    head = load_head(shipped_head_path(), plain.model)

    def engine() -> LLM:
        return LLM.from_model(plain.model, tokenizer=plain.tokenizer, draft=head, eos_ids=plain.eos_ids,
                              engine=EngineConfig(max_batch_size=4, max_model_len=2048),
                              spec=SpecConfig(tree="chain:3"))

    seqs = [prompts[i] + replies[i][:p] for i, p in pairs[:12] + pairs[60:76]]
    print("together", first_steps(engine(), seqs)[12:])
    print("alone   ", [first_steps(engine(), [s])[0] for s in seqs[12:]])


if __name__ == "__main__":
    main()
