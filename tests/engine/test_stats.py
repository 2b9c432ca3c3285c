"""Output.stats reports prefill and decoding apart; tau is over decoding forwards only."""

from __future__ import annotations

import time

import pytest
import torch

from eaglespec.config import SamplingParams, SpecConfig
from eaglespec.engine.llm import LLM
from eaglespec.engine.request import pooled_speculation
from tests.conftest import small_engine
from tests.speculative.test_speculative_greedy import eagle1_head, predictable_target

KEYS = ("tau", "accept_rate_per_depth", "target_forwards", "new_tokens", "ms_per_token", "prompt_tokens",
        "ttft_ms", "prefill_ms", "decode_ms", "prefill_forwards", "decode_forwards", "decode_tokens",
        "tokens_per_s", "accepted_per_depth", "proposed_per_depth")


@pytest.fixture(scope="module")
def target():
    return predictable_target(seed=21)


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 61, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _check_timing(stats: dict, wall_ms: float) -> None:
    assert stats["ttft_ms"] >= stats["prefill_ms"] > 0
    assert stats["decode_ms"] > 0
    assert stats["ttft_ms"] + stats["decode_ms"] <= wall_ms
    assert stats["ms_per_token"] == pytest.approx(stats["decode_ms"] / stats["decode_tokens"])
    assert stats["tokens_per_s"] == pytest.approx(1000.0 / stats["ms_per_token"])


@pytest.mark.parametrize("batch", [1, 3])
def test_plain_decoding_has_tau_exactly_one(target, batch):
    llm = LLM.from_model(target, engine=small_engine())
    t0 = time.perf_counter()
    outs = llm.generate([_prompt(5 + i, seed=i) for i in range(batch)], SamplingParams(max_tokens=10, ignore_eos=True))
    wall_ms = 1000 * (time.perf_counter() - t0)
    for out in outs:
        s = out.stats
        assert set(KEYS) <= set(s)
        assert s["tau"] == 1.0
        assert (s["new_tokens"], s["prefill_forwards"], s["decode_forwards"], s["decode_tokens"]) == (10, 1, 9, 9)
        assert s["target_forwards"] == 10 and s["prompt_tokens"] == len(out.prompt_token_ids)
        assert s["accept_rate_per_depth"] == s["accepted_per_depth"] == s["proposed_per_depth"] == []
        assert pooled_speculation([s]) == {"tau": 0.0, "accept_rate_per_depth": [], "speculative_steps": 0}
        _check_timing(s, wall_ms)


def test_plain_tau_stays_one_when_eos_stops_an_overlapped_step(target):
    """The decode step queued before the EOS was read is wasted work, not this request's forward."""
    prompt = _prompt(6, seed=3)
    free_run = LLM.from_model(target, engine=small_engine()).generate([prompt], SamplingParams(max_tokens=12))[0]
    eos = free_run.token_ids[6]
    assert eos not in free_run.token_ids[:6]
    llm = LLM.from_model(target, engine=small_engine(overlap_decode=True), eos_ids=(eos,))
    out = llm.generate([prompt], SamplingParams(max_tokens=12))[0]
    assert out.finish_reason == "stop" and out.token_ids == free_run.token_ids[:7]
    assert out.stats["tau"] == 1.0 and out.stats["decode_forwards"] == 6 and out.stats["target_forwards"] == 7


def test_speculative_tau_counts_decoding_forwards_only(target):
    llm = LLM.from_model(target, draft=eagle1_head(target, seed=5), spec=SpecConfig(tree="chain:3"),
                         engine=small_engine())
    t0 = time.perf_counter()
    out = llm.generate([_prompt(7, seed=9)], SamplingParams(max_tokens=40, ignore_eos=True))[0]
    wall_ms = 1000 * (time.perf_counter() - t0)
    s = out.stats
    assert s["prefill_forwards"] == 1 and s["decode_tokens"] == s["new_tokens"] - 1 == 39
    assert s["tau"] == pytest.approx(39 / s["decode_forwards"])
    assert s["target_forwards"] == s["decode_forwards"] + 1
    assert s["tau"] > 1.5  # the oracle head is accepted: fewer decoding forwards than tokens
    assert len(s["accept_rate_per_depth"]) == 3
    _check_timing(s, wall_ms)


def test_one_token_has_no_decoding(target):
    out = LLM.from_model(target, engine=small_engine()).generate([_prompt(4, seed=1)], SamplingParams(max_tokens=1))[0]
    s = out.stats
    assert (s["new_tokens"], s["decode_forwards"], s["decode_tokens"], s["tau"], s["ms_per_token"]) == (1, 0, 0, 0.0, 0.0)
    assert s["ttft_ms"] > 0


def test_a_head_tau_counts_speculative_steps_only(target):
    """Two rows for four requests: the short one's successor is prefilled while the long one runs,
    and in that forward the long one decodes one plain token. ``tau`` counts that forward;
    ``pooled_speculation`` (a head's tau, evaluate_tau's) does not."""
    llm = LLM.from_model(target, draft=eagle1_head(target, seed=5), spec=SpecConfig(tree="chain:3"),
                         engine=small_engine(max_batch_size=2))
    lengths = [8, 40, 30, 12]
    outs = llm.generate([_prompt(6 + i, seed=20 + i) for i in range(4)],
                        [SamplingParams(max_tokens=n, ignore_eos=True) for n in lengths])
    assert [len(o.token_ids) for o in outs] == lengths
    plain_beside_a_prefill = 0
    for o in outs:
        s = o.stats
        head = pooled_speculation([s])
        steps = head["speculative_steps"]
        assert s["speculation"] == {"chain:3": steps} and s["proposed_per_depth"] == [steps] * 3
        assert steps <= s["decode_forwards"]
        plain_beside_a_prefill += s["decode_forwards"] - steps
        # Each speculative step yields its accepted drafts and the target's token.
        assert head["tau"] == pytest.approx(1 + sum(s["accept_rate_per_depth"]))
        assert head["accept_rate_per_depth"] == pytest.approx(s["accept_rate_per_depth"])
        assert head["tau"] * steps >= s["decode_tokens"] - (s["decode_forwards"] - steps)
    assert plain_beside_a_prefill >= 1
    pooled = pooled_speculation([o.stats for o in outs])
    assert pooled["speculative_steps"] == sum(o.stats["proposed_per_depth"][0] for o in outs)
    assert min(pooled_speculation([o.stats])["tau"] for o in outs) <= pooled["tau"] \
        <= max(pooled_speculation([o.stats])["tau"] for o in outs)
