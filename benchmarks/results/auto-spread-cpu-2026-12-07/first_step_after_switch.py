"""Does a tree's first step after a switch accept less than its later ones? (CPU, the shipped head)

The engine runs a fixed schedule of choices, four steps each (SCHEDULE, repeated), instead of
tree=auto's, and every step's accepted drafts per sequence are logged with the step's place in its
run of one choice and the choice before it. Printed: per tree, the mean over full-batch steps at
each place (with its standard error), and the first steps by the choice they followed.

    python3 first_step_after_switch.py NUM_PROMPTS BATCH MAX_TOKENS LOG.json
"""
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from eaglespec import LLM, SamplingParams, EngineConfig
from eaglespec.bench.e2e import mtbench_prompts
from eaglespec.speculative.policy import SpeculationPolicy, PLAIN

A, B = "dynamic:4,6,15", "dynamic:5,8,32"
SCHEDULE = [(A, 4), (PLAIN, 4), (B, 4), (A, 4), (B, 4), ("chain:3", 4), (A, 4)]
STEPS = [choice for choice, steps in SCHEDULE for _ in range(steps)]  # one cycle, step by step


@dataclass
class Scheduled(SpeculationPolicy):
    log: list = field(default_factory=list)
    _i: int = 0
    _last: str | None = None
    _pos: int = 0
    _prev: str | None = None

    def choose(self, bucket, greedy):
        self._i += 1
        return STEPS[(self._i - 1) % len(STEPS)]

    def observe(self, choice, bucket, greedy, seconds, tokens_per_sequence, steady=True):
        if choice != self._last:
            self._prev, self._pos = self._last, 0
        else:
            self._pos += 1
        self._last = choice
        self.log.append((choice, self._prev, self._pos, bucket, tokens_per_sequence))


def main() -> None:
    num, batch, max_tokens = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    llm = LLM(engine=EngineConfig(max_batch_size=batch, max_model_len=1024))
    llm.speculative.policy = Scheduled(list(llm.speculative.policy.trees))
    prompts = mtbench_prompts(llm.tokenizer, "mtbench", num)
    t0 = time.time()
    for i in range(0, num, batch):
        llm.generate(prompts[i:i + batch], SamplingParams(max_tokens=max_tokens))
        print(f"{i + batch} prompts, {time.time() - t0:.0f} s", flush=True)
    log = llm.speculative.policy.log
    with open(sys.argv[4], "w") as f:
        json.dump(log, f)
    full = [r for r in log if r[3] == batch]
    for tree in (A, B, "chain:3"):
        for pos in range(4):
            xs = [r[4] - 1 for r in full if r[0] == tree and r[2] == pos]
            if xs:
                error = statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0
                print(tree, "pos", pos, f"n={len(xs)} drafts {statistics.mean(xs):.3f} +- {error:.3f}")
        for prev in (PLAIN, A, B, "chain:3", None):
            xs = [r[4] - 1 for r in full if r[0] == tree and r[2] == 0 and r[1] == prev]
            if xs:
                print("   first after", prev, f"n={len(xs)} {statistics.mean(xs):.3f}")


if __name__ == "__main__":
    main()
