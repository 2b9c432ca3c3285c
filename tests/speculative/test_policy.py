"""The speculation policy: tries every choice, then runs the one with the best measured rate."""

import pytest

from eaglespec.speculative.policy import PLAIN, SpeculationPolicy


def drive(policy: SpeculationPolicy, steps: int, cost: dict, tokens: dict, bucket: int = 1, greedy: bool = True):
    """Run ``steps`` policy steps against a fixed world; returns the choices made. A step after
    one of another choice is not steady (as in the engine: it pays the switch)."""
    chosen = []
    for _ in range(steps):
        c = policy.choose(bucket, greedy)
        policy.observe(c, bucket, greedy, cost[c], tokens[c], steady=bool(chosen) and chosen[-1] == c)
        chosen.append(c)
    return chosen


def test_picks_plain_when_the_draft_never_accepts():
    policy = SpeculationPolicy(["chain:3", "dynamic:5,8,32"], epoch_steps=4, explore_every=16)
    cost = {PLAIN: 1.0, "chain:3": 1.3, "dynamic:5,8,32": 1.6}
    tokens = {PLAIN: 1.0, "chain:3": 1.0, "dynamic:5,8,32": 1.0}  # nothing accepted
    chosen = drive(policy, 2000, cost, tokens)
    assert policy.best(1, True) == PLAIN
    # After the trials, only the exploring epochs run a tree: one short epoch (2 steps) in 16,
    # the other 15 run plain for 4 steps each.
    late = chosen[100:]
    cycle = 15 * 4 + 2
    assert len(late) - late.count(PLAIN) <= 2 * (len(late) / cycle + 1)
    switches = sum(a != b for a, b in zip(late, late[1:]))
    assert switches <= 2 * (len(late) / cycle + 1)  # choices held for whole epochs


def test_picks_the_tree_with_the_best_rate_when_it_pays():
    policy = SpeculationPolicy(["chain:3", "dynamic:5,8,32"], epoch_steps=4, explore_every=16)
    cost = {PLAIN: 1.0, "chain:3": 1.3, "dynamic:5,8,32": 1.6}
    tokens = {PLAIN: 1.0, "chain:3": 2.5, "dynamic:5,8,32": 3.5}  # rates 1.0, 1.92, 2.19
    chosen = drive(policy, 1000, cost, tokens)
    assert policy.best(1, True) == "dynamic:5,8,32"
    late = chosen[100:]
    assert late.count("dynamic:5,8,32") >= len(late) * 15 / 16 - 4


def test_choices_are_per_bucket():
    policy = SpeculationPolicy(["chain:3"], epoch_steps=2, explore_every=10)
    drive(policy, 60, {PLAIN: 1.0, "chain:3": 1.2}, {PLAIN: 1.0, "chain:3": 2.0}, bucket=1)
    drive(policy, 60, {PLAIN: 1.0, "chain:3": 3.0}, {PLAIN: 1.0, "chain:3": 2.0}, bucket=64)
    assert policy.best(1, True) == "chain:3"
    assert policy.best(64, True) == PLAIN
    # Acceptance is shared across buckets: a new bucket still has to time its steps.
    assert policy.expected_rate("chain:3", 16, True) is None


def test_a_step_after_a_switch_is_not_timed():
    policy = SpeculationPolicy(["chain:1"])
    policy.observe("chain:1", 1, True, 100.0, 2.0, steady=False)  # the switch (or a warm-up): only tokens
    assert policy.expected_rate("chain:1", 1, True) is None
    policy.observe("chain:1", 1, True, 1.0, 2.0)
    assert policy.expected_rate("chain:1", 1, True) == pytest.approx(2.0)


def test_exploration_finds_a_choice_that_became_better():
    policy = SpeculationPolicy(["chain:3"], epoch_steps=2, explore_every=4, smoothing=0.5)
    drive(policy, 100, {PLAIN: 1.0, "chain:3": 2.0}, {PLAIN: 1.0, "chain:3": 1.5})
    assert policy.best(1, True) == PLAIN
    drive(policy, 100, {PLAIN: 1.0, "chain:3": 1.0}, {PLAIN: 1.0, "chain:3": 3.0})
    assert policy.best(1, True) == "chain:3"


def test_greedy_and_sampled_are_tracked_apart():
    policy = SpeculationPolicy(["chain:3"], epoch_steps=2, explore_every=10)
    drive(policy, 40, {PLAIN: 1.0, "chain:3": 1.2}, {PLAIN: 1.0, "chain:3": 3.0}, greedy=True)
    drive(policy, 40, {PLAIN: 1.0, "chain:3": 1.2}, {PLAIN: 1.0, "chain:3": 1.05}, greedy=False)
    assert policy.best(1, True) == "chain:3"
    assert policy.best(1, False) == PLAIN
    rows = policy.summary()
    assert {(r["choice"], r["greedy"]) for r in rows} == {(PLAIN, True), ("chain:3", True), (PLAIN, False),
                                                           ("chain:3", False)}


def test_seeded_times_rank_a_new_bucket_and_acceptance_is_tried_once_per_tree():
    policy = SpeculationPolicy(["chain:3"], epoch_steps=1, explore_every=100)
    for bucket in (1, 8):
        policy.seed(PLAIN, bucket, True, 1.0)
        policy.seed("chain:3", bucket, True, 1.5)
    assert policy.choose(1, True) == "chain:3"  # its acceptance is unknown: tried first
    policy.observe("chain:3", 1, True, 1.5, 3.0)
    assert policy.expected_rate("chain:3", 1, True) == pytest.approx(2.0)
    # Acceptance carries over to another bucket, whose seeded times already rank the choices.
    assert policy.choose(8, True) == "chain:3"
    policy.seed("chain:3", 8, True, 4.0)
    assert policy.best(8, True) == PLAIN


@pytest.mark.parametrize("kwargs, field", [({"trees": []}, "tree"), ({"trees": ["plain"]}, "trees"),
                                           ({"trees": ["chain:1"], "smoothing": 0.0}, "smoothing"),
                                           ({"trees": ["chain:1"], "explore_every": 1}, "explore_every"),
                                           ({"trees": ["chain:1"], "epoch_steps": 0}, "epoch_steps"),
                                           ({"trees": ["chain:1"], "trial_steps": 0}, "trial_steps")])
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SpeculationPolicy(**kwargs)


def test_unknown_choice_is_refused():
    with pytest.raises(ValueError, match="unknown choice"):
        SpeculationPolicy(["chain:1"]).observe("chain:9", 1, True, 1.0, 1.0)
