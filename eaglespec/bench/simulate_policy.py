"""tree=auto in simulation: the policy against each tree alone, where acceptance drifts with the text.

``simulate`` drives a fresh SpeculationPolicy (or one fixed choice) through simulated batch-1
steps; the policy tests and this benchmark share it. The benchmark's worlds: step times per
choice as measured on the H200 with SmolLM2 (policy summaries, batch 1 and 16, 2026-12-04) and
on this repository's CPU (``make demo``); acceptance per depth as the shipped head reached with
each tree alone (e2e runs). The text's *ease* shifts every tree's per-depth acceptance logits
together; it changes at random from one stretch of text to the next (normal with the given
spread, stretches of about the given length), and may start with a hard stretch (MT-bench's
first prompt accepts far less than most). A switch between choices costs a fifth of a plain
step (a step without overlap). Reported: the best fixed tree's and the policy's tokens/s over
plain decoding, mean and worst over seeds.

``python -m eaglespec.bench.simulate_policy [--policy '{"ease_memory": 16}']``
"""

from __future__ import annotations

import argparse
import json
import math
import random
from typing import Callable

from eaglespec.speculative.policy import PLAIN, SpeculationPolicy

ACCEPT = {"chain:1": [0.575], "chain:2": [0.575, 0.557], "chain:3": [0.575, 0.557, 0.67],
          "dynamic:4,6,15": [0.82, 0.67, 0.57, 0.71], "dynamic:5,8,32": [0.82, 0.70, 0.59, 0.64, 0.74]}
STEP_MS = {
    "h200-b1": {PLAIN: 0.70, "chain:1": 1.14, "chain:2": 1.25, "chain:3": 1.36, "dynamic:4,6,15": 1.74,
                "dynamic:5,8,32": 1.92},
    "h200-b16": {PLAIN: 0.99, "chain:1": 1.33, "chain:2": 1.48, "chain:3": 1.79, "dynamic:4,6,15": 2.0,
                 "dynamic:5,8,32": 2.38},
    "cpu": {PLAIN: 61.5, "chain:1": 95, "chain:2": 123, "chain:3": 146, "dynamic:4,6,15": 199, "dynamic:5,8,32": 264},
}
# (spread of the ease, mean stretch length in steps, ease of the first stretch, steps)
TEXTS = [(0.0, 100, -1.0, 2000), (0.7, 100, -1.0, 2000), (0.7, 100, 0.0, 2000), (1.0, 60, 0.0, 3000),
         (0.7, 100, 0.0, 300)]


def draw_tokens(accept: list[float], ease: float, rng: random.Random) -> int:
    """Tokens one step yields: the root's, plus each depth accepted in turn (conditional
    acceptance ``accept`` per depth, its logit shifted by ``ease``; [] for plain decoding)."""
    n = 1
    for p in accept:
        if rng.random() >= 1 / (1 + math.exp(-math.log(p / (1 - p)) - ease)):
            break
        n += 1
    return n


def simulate(trees: list[str], step_time: dict[str, float], draw: Callable[[str, int, random.Random], int],
             steps: int, rng: random.Random, policy_kwargs: dict | None = None, fixed: str | None = None,
             jitter: float = 0.0, switch_cost: float = 0.0, timed_from: int = 0, greedy: bool = True,
             policy_class: type[SpeculationPolicy] = SpeculationPolicy) -> float:
    """Tokens per unit of ``step_time`` over ``steps`` batch-1 steps, each choice made by a fresh
    ``policy_class`` over ``trees`` (seeded with ``step_time``) or ``fixed``. ``draw(choice, step, rng)``
    gives a step's tokens; a step's time is its choice's, times a uniform factor within
    ``jitter``, plus ``switch_cost`` when the choice changed; steps before ``timed_from`` run but
    are not counted. ``greedy``: the steps' kind, greedy or sampled (as the engine, the policy
    is seeded with step times for greedy steps only)."""
    policy = policy_class(list(trees), **(policy_kwargs or {}))
    for c in policy.choices:
        policy.seed(c, 1, True, step_time[c])
    last, seconds, tokens = None, 0.0, 0
    for step in range(steps):
        c = fixed or policy.choose(1, greedy)
        n = draw(c, step, rng)
        dt = step_time[c] * (rng.uniform(1 - jitter, 1 + jitter) if jitter else 1.0)
        dt += switch_cost if c != last else 0.0
        policy.observe(c, 1, greedy, dt, n, steady=c == last)
        last = c
        if step >= timed_from:
            seconds, tokens = seconds + dt, tokens + n
    return tokens / seconds


def ease_trace(seed: int, spread: float, stretch: float, first: float, steps: int) -> list[float]:
    rng, out, ease, left = random.Random(seed), [], first, stretch
    while len(out) < steps:
        out.append(ease)
        left -= 1
        if left <= 0:
            ease, left = rng.gauss(0, spread), rng.expovariate(1 / stretch)
    return out


def run(ms: dict, eases: list[float], seed: int, policy_kwargs: dict, fixed: str | None = None) -> float:
    """One world's run over an ease trace, in tokens per ms."""
    return simulate(list(ACCEPT), ms, lambda c, step, rng: draw_tokens(ACCEPT.get(c, []), eases[step], rng),
                    len(eases), random.Random(seed + 1000), policy_kwargs, fixed, jitter=0.05,
                    switch_cost=0.2 * ms[PLAIN])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--policy", default="{}", help="SpeculationPolicy keyword arguments, as JSON")
    ap.add_argument("--seeds", type=int, default=8)
    args = ap.parse_args(argv)
    kwargs = json.loads(args.policy)
    for world, ms in STEP_MS.items():
        for spread, stretch, first, steps in TEXTS:
            traces = [ease_trace(s, spread, stretch, first, steps) for s in range(args.seeds)]
            fixed = {c: sum(run(ms, t, s, kwargs, c) for s, t in enumerate(traces)) / len(traces) * ms[PLAIN]
                     for c in ACCEPT}
            best = max(fixed, key=fixed.get)
            auto = [run(ms, t, s, kwargs) * ms[PLAIN] for s, t in enumerate(traces)]
            print(f"{world:9s} ease spread {spread} stretch {stretch:3d} first {first:4.1f}, {steps:4d} steps: "
                  f"best fixed {best} {fixed[best]:.3f}x, auto {sum(auto) / len(auto):.3f}x (worst {min(auto):.3f}x)")


if __name__ == "__main__":
    main()
