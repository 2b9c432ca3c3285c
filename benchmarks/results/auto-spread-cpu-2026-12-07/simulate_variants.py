"""tree=auto's policy against two changes, in simulation (eaglespec.bench.simulate_policy's model):

- ``norm``: each tree's mean accepted drafts is kept normalised by the ease of the text it ran
  on (a step adds drafts / ease, not drafts), and the ease returns to its slow average (256
  steps) instead of to 1, so that a tree that ran through a hard stretch is not remembered as a
  worse tree;
- ``P<n>``: the head's priors weigh as much as n steps of a tree's own (main: 32).

Worlds: SmolLM2's step times on an H100 (policy summaries of
results/startup-times-and-prefill-fold-nvidia-h100-2026-12-07/, batch 1, 16 and 64); acceptance
per depth from the shipped head's acceptance.json (its priors). ``+P``: the policy has those priors.

    python3 simulate_variants.py [seeds]
"""
import math
import random
import sys
from dataclasses import dataclass, field

from eaglespec.bench.simulate_policy import draw_tokens, ease_trace, simulate
from eaglespec.speculative.policy import PLAIN, SpeculationPolicy, _Average, _Ease, _Mean

RATES = {"chain:3": [0.724, 0.515, 0.377], "dynamic:4,6,15": [0.909, 0.744, 0.570, 0.430],
         "dynamic:5,8,32": [0.921, 0.795, 0.622, 0.471, 0.362]}  # steps accepting >= d drafts


def conditional(r):
    return [r[0]] + [r[i] / r[i - 1] for i in range(1, len(r))]


TREES = {"chain:1": RATES["chain:3"][:1], "chain:2": RATES["chain:3"][:2], "chain:3": RATES["chain:3"],
         "dynamic:4,6,15": RATES["dynamic:4,6,15"], "dynamic:5,8,32": RATES["dynamic:5,8,32"]}
ACCEPT = {t: conditional(r) for t, r in TREES.items()}
PRIORS = {t: sum(r) for t, r in TREES.items()}
STEP_MS = {
    "h100-b1": {PLAIN: 0.717, "chain:1": 0.93, "chain:2": 1.0, "chain:3": 1.065, "dynamic:4,6,15": 1.22,
                "dynamic:5,8,32": 1.49},
    "h100-b16": {PLAIN: 0.90, "chain:1": 1.17, "chain:2": 1.26, "chain:3": 1.38, "dynamic:4,6,15": 1.83,
                 "dynamic:5,8,32": 2.21},
    "h100-b64": {PLAIN: 1.09, "chain:1": 1.39, "chain:2": 1.65, "chain:3": 1.81, "dynamic:4,6,15": 2.59,
                 "dynamic:5,8,32": 3.55},
}
# (spread of the ease, mean stretch in steps (about one 256-token reply), first stretch's ease, steps)
TEXTS = [(0.0, 70, -1.0, 1000), (0.5, 70, -1.0, 1000), (0.5, 70, 0.0, 1000), (0.8, 70, -1.0, 2000),
         (0.5, 70, -1.0, 300)]


@dataclass
class NormalisedMeans(SpeculationPolicy):
    slow_memory: int = 256
    _slow: dict = field(default_factory=dict)

    def observe(self, choice, bucket, greedy, seconds, tokens_per_sequence, steady=True):
        self._observed += 1
        if choice != PLAIN:
            drafts = tokens_per_sequence - 1.0
            mean = self._drafts.setdefault((choice, greedy), _Mean())
            ease = self.ease(greedy)
            if mean.count:
                self._ease.setdefault(greedy, _Ease()).update(drafts, mean.value, self.ease_memory, self._observed)
                self._slow.setdefault(greedy, _Ease()).update(drafts, mean.value, self.slow_memory, self._observed)
            mean.update(drafts / max(ease, 1e-3), self.token_memory)
        if steady:
            self._seconds.setdefault((choice, bucket, greedy), _Average()).update(
                seconds, self.smoothing, self._observed, self.step_time_clip)

    def ease(self, greedy):
        fast = self._ease.get(greedy)
        if fast is None or fast.expected <= 0:
            return 1.0
        slow = self._slow[greedy]
        base = slow.accepted / slow.expected if slow.expected > 0 else 1.0
        return base + (fast.accepted / fast.expected - base) * math.exp(
            -(self._observed - fast.last_step) / self.ease_revert)


def run(policy_class, ms, eases, seed, kwargs, fixed=None):
    return simulate(list(ACCEPT), ms, lambda c, step, rng: draw_tokens(ACCEPT.get(c, []), eases[step], rng),
                    len(eases), random.Random(seed + 1000), kwargs, fixed, jitter=0.05,
                    switch_cost=0.2 * ms[PLAIN], policy_class=policy_class)


VARIANTS = {"main": (SpeculationPolicy, {}), "main+P": (SpeculationPolicy, {"priors": PRIORS}),
            "norm": (NormalisedMeans, {}), "norm+P": (NormalisedMeans, {"priors": PRIORS}),
            "P128": (SpeculationPolicy, {"priors": PRIORS, "prior_steps": 128}),
            "P512": (SpeculationPolicy, {"priors": PRIORS, "prior_steps": 512})}


def main():
    seeds = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    print("speedup over plain decoding, mean over seeds (worst seed)")
    for world, ms in STEP_MS.items():
        for spread, stretch, first, steps in TEXTS:
            traces = [ease_trace(s, spread, stretch, first, steps) for s in range(seeds)]
            fixed = {c: sum(run(SpeculationPolicy, ms, t, s, {}, c) for s, t in enumerate(traces)) / seeds * ms[PLAIN]
                     for c in ACCEPT}
            best = max(fixed, key=fixed.get)
            line = f"{world:8s} spread {spread} first {first:4.1f} {steps:4d}: best fixed {best} {fixed[best]:.3f}x"
            for name, (cls, kwargs) in VARIANTS.items():
                a = [run(cls, ms, t, s, kwargs) * ms[PLAIN] for s, t in enumerate(traces)]
                line += f" | {name} {sum(a) / len(a):.3f} ({min(a):.3f})"
            print(line, flush=True)


if __name__ == "__main__":
    main()
