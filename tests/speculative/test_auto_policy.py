"""tree="auto" in the engine: plain decoding when the draft cannot pay, a tree when it does, and
outputs equal to plain decoding whatever runs when (plain steps and trees interleaved)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest

import eaglespec

from eaglespec.config import SamplingParams, SpecConfig
from eaglespec.engine.llm import LLM
from eaglespec.models.eagle import load_head, save_head
from eaglespec.speculative.policy import PLAIN, SpeculationPolicy
from tests.conftest import small_engine
from tests.speculative.test_speculative_greedy import _prompts, eagle1_head, predictable_target

TREES = ("chain:1", "chain:3", "dynamic:3,3,8")
# What each step costs, in plain steps: fixed prices instead of the clock, so the choices do not
# depend on how busy the machine is (the policy's arithmetic is what is tested here).
PRICES = {PLAIN: 1.0, "chain:1": 1.5, "chain:3": 1.8, "dynamic:3,3,8": 2.2}


@dataclass
class PricedPolicy(SpeculationPolicy):
    prices: dict = field(default_factory=dict)

    def observe(self, choice, bucket, greedy, seconds, tokens_per_sequence, steady=True):
        super().observe(choice, bucket, greedy, self.prices[choice], tokens_per_sequence, steady)


def _engine(head, target):
    llm = LLM.from_model(target, draft=head, spec=SpecConfig(tree="auto", auto_trees=TREES),
                         engine=small_engine(max_batch_size=4, num_blocks=96))
    llm.speculative.policy = PricedPolicy(list(TREES), epoch_steps=2, explore_every=8, prices=PRICES)
    return llm


def _never_accepting_head(target):
    head = eagle1_head(target, seed=9, oracle=False)
    head.init_random(seed=9, std=2.0)  # loud noise: proposals are nearly never the target's token
    return head


@pytest.mark.parametrize("greedy", [True, False])
def test_auto_picks_plain_when_the_draft_never_pays_and_keeps_outputs(greedy):
    target = predictable_target(seed=31)
    prompts = _prompts(target.config.vocab_size, [9, 14, 5, 21], seed=8)
    params = [SamplingParams(max_tokens=64, ignore_eos=True, temperature=0.0 if greedy else 0.9, seed=i)
              for i in range(4)]
    llm = _engine(_never_accepting_head(target), target)
    outs = llm.generate(prompts, params)
    assert llm.speculative.policy.best(4, greedy) == PLAIN
    steps = {}
    for o in outs:
        for choice, n in o.stats["speculation"].items():
            steps[choice] = steps.get(choice, 0) + n
    assert steps[PLAIN] > sum(n for c, n in steps.items() if c != PLAIN), steps
    # Plain steps and tree steps interleaved: still exactly plain decoding's tokens, greedy or
    # seeded (a tree's draw at depth d is plain sampling's draw d tokens ahead; fp32 here).
    ref = LLM.from_model(target, engine=small_engine()).generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_auto_picks_a_tree_when_the_draft_pays_and_keeps_outputs(temperature):
    target = predictable_target(seed=32)
    prompts = _prompts(target.config.vocab_size, [7, 18, 11, 3], seed=9)
    params = SamplingParams(max_tokens=48, ignore_eos=True, temperature=temperature, seed=5)
    llm = _engine(eagle1_head(target, seed=10), target)
    outs = llm.generate(prompts, params)
    ref = LLM.from_model(target, engine=small_engine()).generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    # Every choice was tried, and the requests report which ran.
    ran = set().union(*(o.stats["speculation"] for o in outs))
    assert ran == {PLAIN, *TREES}
    if temperature == 0:  # the oracle-ish head pays at these prices (sampled: it may not)
        assert llm.speculative.policy.best(4, True) != PLAIN
        assert sum(o.stats["tau"] for o in outs) / len(outs) > 1.3


def test_forced_tree_never_runs_plain_steps():
    target = predictable_target(seed=33)
    llm = LLM.from_model(target, draft=eagle1_head(target, seed=11), spec=SpecConfig(tree="chain:2"),
                         engine=small_engine())
    assert llm.speculative.policy is None
    outs = llm.generate(_prompts(target.config.vocab_size, [6, 12], seed=10), SamplingParams(max_tokens=12))
    assert all(set(o.stats["speculation"]) == {"chain:2"} for o in outs)


def test_a_heads_measured_acceptance_travels_with_it_and_seeds_auto(tmp_path):
    target = predictable_target(seed=31)
    head = eagle1_head(target, seed=9, oracle=False)
    head.acceptance = {"chain:3": [0.7, 0.5, 0.2], "dynamic:3,3,8": [0.9, 0.6, 0.4]}
    save_head(head, str(tmp_path))
    loaded = load_head(str(tmp_path), target)
    assert loaded.acceptance == head.acceptance
    llm = LLM.from_model(target, draft=loaded, spec=SpecConfig(tree="auto", auto_trees=TREES),
                         engine=small_engine(max_batch_size=4, num_blocks=96))
    assert llm.speculative.policy.priors == pytest.approx({"chain:1": 0.7, "chain:3": 1.4, "dynamic:3,3,8": 1.9})
    (tmp_path / "acceptance.json").write_text('{"greedy_accept_rate_per_depth": {"chain:2": [0.5, 0.4, 0.3]}}')
    with pytest.raises(ValueError, match="acceptance.json.*chain:2"):
        load_head(str(tmp_path), target)
    (tmp_path / "acceptance.json").write_text('{"tau": 3}')
    with pytest.raises(ValueError, match="not a head's measured acceptance"):
        load_head(str(tmp_path), target)


def test_the_shipped_head_carries_priors_for_every_default_auto_tree():
    from eaglespec.config import AUTO_TREES
    from eaglespec.models.eagle import load_acceptance
    from eaglespec.speculative.policy import drafts_priors

    shipped = os.path.join(os.path.dirname(eaglespec.__file__), "assets", "smollm2-eagle")
    priors = drafts_priors(load_acceptance(shipped), list(AUTO_TREES))
    assert set(priors) == set(AUTO_TREES)
    assert [priors[t] for t in AUTO_TREES] == sorted(priors.values())  # each tree accepts more than the last


def test_with_overlap_only_steps_queued_behind_another_are_timed():
    """The policy compares choices by their overlapped step time. A step launched fresh (after a
    request finished, or near a limit) also carries the host's scheduling and staging in series
    with the device; timing it for a tree but never for plain decoding made trees look slower."""
    target = predictable_target(seed=33)
    prompts = _prompts(target.config.vocab_size, [7, 18, 11, 3], seed=10)
    llm = _engine(eagle1_head(target, seed=10), target)
    core = llm.core
    followed, timed = {}, {}
    launch, observe = core._launch, core.speculative.observe

    def counting_launch(reqs, choice, follow=None):
        if follow is not None:
            followed[choice] = followed.get(choice, 0) + 1
        return launch(reqs, choice, follow)

    def counting_observe(choice, reqs, seconds, tokens_per_sequence, steady):
        timed[choice] = timed.get(choice, 0) + int(steady)
        observe(choice, reqs, seconds, tokens_per_sequence, steady)

    core._launch, core.speculative.observe = counting_launch, counting_observe
    # Different lengths: requests finish in different steps, so fresh steps follow ones of the same tree.
    llm.generate(prompts, [SamplingParams(max_tokens=n, ignore_eos=True) for n in (20, 33, 41, 48)])
    assert sum(timed.values()) > 0
    for choice, n in timed.items():
        assert n <= followed.get(choice, 0), (choice, timed, followed)


def test_seeded_sampling_drawing_only_at_visited_nodes_keeps_plain_decodings_tokens(monkeypatch):
    """The sampled verify of large batches (design note 52), forced here at every size: a seeded
    request still draws plain decoding's tokens, and drafts do get accepted."""
    from eaglespec.speculative import verifier

    monkeypatch.setattr(verifier, "VISITED_DRAWS_MIN_ROWS", 0)
    target = predictable_target(seed=32)
    prompts = _prompts(target.config.vocab_size, [7, 18, 11, 3], seed=9)
    params = [SamplingParams(max_tokens=40, ignore_eos=True, temperature=t, top_p=p, seed=i)
              for i, (t, p) in enumerate([(0.8, 1.0), (1.0, 0.9), (0.0, 1.0), (0.6, 0.8)])]
    llm = LLM.from_model(target, draft=eagle1_head(target, seed=10), spec=SpecConfig(tree="dynamic:3,3,8"),
                         engine=small_engine(max_batch_size=4, num_blocks=96))
    outs = llm.generate(prompts, params)
    ref = LLM.from_model(target, engine=small_engine()).generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    assert sum(o.stats["tau"] for o in outs) / len(outs) > 1.3
