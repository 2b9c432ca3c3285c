"""What plain decoding steps between tree steps do to a tree's acceptance (design note 39).

Under ``tree="auto"`` plain steps run between tree steps. Each leaves its (feature, token) pair
for the head; this script runs one tree with plain steps scripted in between and reports the
tokens each tree step yields (accepted drafts + 1), against the tree alone. The real SmolLM2
and the shipped head, MT-bench first turns spread over the categories, greedy, one request at
a time, on any device (a CPU takes about a minute per pattern in fp32):

    python benchmarks/plain_steps_acceptance.py --tree dynamic:4,6,15 --prompts 8 --max-tokens 128
"""

from __future__ import annotations

import argparse
import json

from tqdm import tqdm

from eaglespec import LLM, SamplingParams, SpecConfig
from eaglespec.bench.results import write_result
from eaglespec.config import EngineConfig
from eaglespec.speculative.policy import PLAIN, SpeculationPolicy
from eaglespec.train.data import load_conversations

# (tree steps, plain steps) repeated: (1, 0) is the tree alone.
PATTERNS = [(1, 0), (3, 1), (1, 1), (8, 4), (8, 8)]


class Scripted(SpeculationPolicy):
    """Runs ``tree_steps`` of the tree, then ``plain_steps`` plain, in turn; records the tokens per
    sequence of every tree step."""

    def __init__(self, trees: list[str], tree_steps: int, plain_steps: int):
        super().__init__(trees=trees)
        self.tree_steps, self.plain_steps, self.n, self.tree_tokens = tree_steps, plain_steps, 0, []

    def choose(self, bucket: int, greedy: bool) -> str:
        self.n += 1
        return self.trees[0] if (self.n - 1) % (self.tree_steps + self.plain_steps) < self.tree_steps else PLAIN

    def observe(self, choice: str, bucket: int, greedy: bool, seconds: float, tokens_per_sequence: float,
                steady: bool = True) -> None:
        if choice != PLAIN:
            self.tree_tokens.append(tokens_per_sequence)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tree", default="dynamic:4,6,15")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    engine = EngineConfig(max_batch_size=1, max_model_len=2048, overlap_decode=False)
    llm = LLM(device=args.device, dtype=args.dtype, spec=SpecConfig(tree="auto"), engine=engine)
    if args.tree not in llm.speculative.programs:
        raise SystemExit(f"--tree must be one of tree=auto's trees: {sorted(llm.speculative.programs)}")
    convs = load_conversations("mtbench", 0, 80)
    picked = [i * len(convs) // args.prompts for i in range(args.prompts)]
    prompts = [llm.tokenizer.encode(llm.tokenizer.apply_chat_template([{"role": "user", "content": convs[i][0]}]))
               for i in picked]
    rows = []
    for tree_steps, plain_steps in PATTERNS:
        policy = Scripted([args.tree], tree_steps, plain_steps)
        llm.speculative.policy = policy
        for prompt in tqdm(prompts, desc=f"{tree_steps} tree / {plain_steps} plain", leave=False):
            llm.generate([prompt], SamplingParams(max_tokens=args.max_tokens))
        assert policy.tree_tokens, "no tree step ran"
        yield_ = sum(policy.tree_tokens) / len(policy.tree_tokens)
        rows.append({"tree_steps": tree_steps, "plain_steps": plain_steps, "tree_steps_run": len(policy.tree_tokens),
                     "tokens_per_tree_step": yield_})
        print(f"{args.tree}: {tree_steps} tree / {plain_steps} plain steps in turn: {yield_:.3f} tokens per tree "
              f"step over {len(policy.tree_tokens)}", flush=True)
    record = {"tree": args.tree, "prompts": picked, "max_tokens": args.max_tokens, "dtype": args.dtype,
              "rows": rows}
    print(json.dumps(rows))
    print("wrote", write_result(f"plain-steps-acceptance-{args.tree.replace(':', '-').replace(',', '-')}", record,
                                llm.device, args.out))


if __name__ == "__main__":
    main()
