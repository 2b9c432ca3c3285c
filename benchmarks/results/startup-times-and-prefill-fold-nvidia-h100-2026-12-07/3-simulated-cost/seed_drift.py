"""What optimistic start-up times cost tree=auto, in simulation, and what a drift correction would win back.

Each world is one batch size of ../startup-vs-served-greedy.json: every choice's served step
time (what a step really costs) and its start-up time (what the policy is seeded with).
Acceptance and the text's drifting ease are eaglespec.bench.simulate_policy's batch-1 model.
Three policies per world, 16 seeds each, tokens/s over plain decoding:
  exact      seeded with the served times (no start-up error);
  seeded     seeded with the start-up times (today's engine);
  corrected  as seeded, but a choice still on its seed counts it times the median served/seeded
             ratio of the choices serving has refreshed in that bucket.
A study, not the engine: it reaches into the policy's private averages.

    python3 seed_drift.py ../startup-vs-served-greedy.json
"""
import json, random, statistics, sys
from eaglespec.bench.simulate_policy import ACCEPT, draw_tokens, ease_trace
from eaglespec.speculative.policy import PLAIN, SpeculationPolicy

d = json.load(open(sys.argv[1]))
worlds = {}
for r in d['rows']:
    worlds.setdefault(r['batch'], {})[r['choice']] = (r['served_ms'], r['seeded_ms'])

def corrected_rate(policy, choice, bucket, greedy):
    """expected_rate, with an unrefreshed seed scaled by the bucket's median drift of refreshed choices."""
    secs = policy._seconds.get((choice, bucket, greedy))
    tokens = policy.expected_tokens(choice, greedy)
    if secs is None or tokens is None:
        return None
    value = secs.value
    if secs.count == 1 and secs.seeded is not None:
        drifts = [a.value / a.seeded for (c, b, g), a in policy._seconds.items()
                  if b == bucket and g == greedy and a.count > 1 and a.seeded]
        if drifts:
            value *= statistics.median(drifts)
    return tokens / value

def run(world, eases, seed, mode):
    served = {c: v[0] for c, v in world.items()}
    seeded = {c: v[0] if mode == 'exact' else v[1] for c, v in world.items()}
    policy = SpeculationPolicy(list(ACCEPT))
    if mode == 'corrected':
        policy.expected_rate = lambda c, b, g: corrected_rate(policy, c, b, g)
    for c in policy.choices:
        policy.seed(c, 1, True, seeded[c])
    rng = random.Random(seed + 1000)
    last, t, n = None, 0.0, 0
    for step, ease in enumerate(eases):
        c = policy.choose(1, True)
        k = draw_tokens(ACCEPT.get(c, []), ease, rng)
        dt = served[c] * rng.uniform(0.95, 1.05) + (0.2 * served[PLAIN] if c != last else 0)
        policy.observe(c, 1, True, dt, k, steady=c == last)
        last, t, n = c, t + dt, n + k
    return n / t * served[PLAIN]

for batch in sorted(worlds):
    world = worlds[batch]
    if set(world) != {PLAIN, *ACCEPT}:
        continue
    for spread, stretch, first, steps in [(0.0, 100, 0.0, 2000), (0.7, 100, 0.0, 2000), (0.7, 100, 0.0, 300)]:
        traces = [ease_trace(s, spread, stretch, first, steps) for s in range(16)]
        res = {m: statistics.mean(run(world, tr, s, m) for s, tr in enumerate(traces)) for m in ('exact', 'seeded', 'corrected')}
        print(f"batch {batch:2d} spread {spread} steps {steps:4d}: " + "  ".join(f"{m} {v:.3f}x" for m, v in res.items()))
