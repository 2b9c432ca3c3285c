"""What a tree's step emits at reply positions its own run did not visit, measured (CPU, fp32).

For NUM (prompt, position p) pairs drawn at random from the traces' replies, the same for every
tree, the engine prefills the prompt and the reply's first p tokens, makes token p from the
prefill as any step would, and runs one speculative step from p + 1: what the tree emits there
mid-reply (the head's cache then holds the target's features of every earlier position, as after
any step). replay_policy.py --exact compares its estimates at these positions with these counts.

    python3 exact_samples.py TRACES.json NUM BATCH OUT.json [TREE ...]
"""
import gzip
import json
import random
import sys
import time

from eaglespec import LLM, EngineConfig, SamplingParams, SpecConfig
from eaglespec.bench.e2e import mtbench_prompts


def main() -> None:
    traces_path, num, batch, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    with (gzip.open if traces_path.endswith(".gz") else open)(traces_path, "rt") as f:
        traces = json.load(f)
    first = next(iter(traces["traces"].values()))
    replies = first["token_ids"]
    prompts = mtbench_prompts(LLM(draft="none").tokenizer, "mtbench", traces["num_prompts"])
    rng = random.Random(0)
    pairs = []
    while len(pairs) < num:
        i = rng.randrange(len(replies))
        if len(replies[i]) >= 8:
            pairs.append((i, rng.randrange(1, len(replies[i]) - 6)))  # the step starts at p + 1
    samples = {}
    for tree in sys.argv[5:] or list(traces["traces"]):
        t0 = time.time()
        llm = LLM(engine=EngineConfig(max_batch_size=batch, max_model_len=2048), spec=SpecConfig(tree=tree))
        core, first_step = llm.core, {}
        count = core._count_speculative

        def logged(reqs, emitted, choice):
            for req, row in zip(reqs, emitted):
                first_step.setdefault(req.request_id, len(row))
            count(reqs, emitted, choice)

        core._count_speculative = logged
        params = SamplingParams(max_tokens=8, ignore_eos=True)
        ids = [llm.add_request(prompts[i] + replies[i][:p], params) for i, p in pairs]
        while llm.has_work:
            llm.step()
        samples[tree] = [first_step[r] for r in ids]
        print(f"{tree}: {time.time() - t0:.0f} s", flush=True)
        with open(out, "w") as f:
            json.dump({"pairs": pairs, "emitted": samples}, f)


if __name__ == "__main__":
    main()
