"""Per-step acceptance traces of each of tree=auto's trees alone (CPU, fp32, the shipped head).

Greedy outputs are the same whichever tree drafts them (fp32 is exact, see the tests), so a
prompt's reply is one text and each tree's run visits some of its positions. For every
speculative step this logs the prompt, the reply position the step started at and the tokens it
emitted (accepted drafts + 1); with each prompt's reply length and token ids, for the replay in
replay_policy.py.

    python3 record_traces.py NUM_PROMPTS BATCH MAX_TOKENS OUT.json [TREE ...]
"""
import json
import sys
import time

from eaglespec import LLM, EngineConfig, SamplingParams, SpecConfig
from eaglespec.bench.e2e import mtbench_prompts
from eaglespec.config import AUTO_TREES


def record(tree: str, prompts: list[list[int]], batch: int, max_tokens: int) -> dict:
    llm = LLM(engine=EngineConfig(max_batch_size=batch, max_model_len=2048), spec=SpecConfig(tree=tree))
    core, steps, prompt_of = llm.core, [], {}
    count = core._count_speculative

    def logged(reqs, emitted, choice):
        for req, row in zip(reqs, emitted):
            if not req.finished:
                steps.append((prompt_of[req.request_id], len(req.output_ids), len(row)))
        count(reqs, emitted, choice)

    core._count_speculative = logged
    params = SamplingParams(max_tokens=max_tokens)
    outputs = []
    for i in range(0, len(prompts), batch):
        ids = [llm.add_request(p, params) for p in prompts[i:i + batch]]
        prompt_of.update({rid: i + j for j, rid in enumerate(ids)})
        while llm.has_work:
            llm.step()
        outputs += [llm.collect(rid) for rid in ids]
    return {"tree": tree, "steps": steps, "token_ids": [o.token_ids for o in outputs],
            "finish_reason": [o.finish_reason for o in outputs]}


def main() -> None:
    num, batch, max_tokens, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    trees = sys.argv[5:] or list(AUTO_TREES)
    prompts = mtbench_prompts(LLM(draft="none").tokenizer, "mtbench", num)
    traces = {}
    for tree in trees:
        t0 = time.time()
        traces[tree] = record(tree, prompts, batch, max_tokens)
        print(f"{tree}: {len(traces[tree]['steps'])} steps, {time.time() - t0:.0f} s", flush=True)
        with open(out, "w") as f:
            json.dump({"num_prompts": num, "batch": batch, "max_tokens": max_tokens, "traces": traces}, f)


if __name__ == "__main__":
    main()
