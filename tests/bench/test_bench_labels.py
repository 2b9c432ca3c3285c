"""Benchmarks measure what their labels say: every row of a timed batch is a real, prefilled
sequence, and a batch of N prompts really runs N at once."""

from __future__ import annotations

import pytest
import torch

from eaglespec.bench.e2e import run_batch
from eaglespec.bench.spec_step import prefill_all
from eaglespec.config import SamplingParams, SpecConfig
from eaglespec.engine.llm import LLM
from tests.conftest import random_model, small_engine, tiny_config
from tests.speculative.test_speculative_greedy import eagle1_head


def _llm(prefill_budget: int, draft: bool = True) -> LLM:
    target = random_model(tiny_config(), seed=3)
    head = eagle1_head(target, seed=4) if draft else None
    return LLM.from_model(target, draft=head, spec=SpecConfig(tree="chain:2") if draft else None,
                          engine=small_engine(num_blocks=128, prefill_token_budget=prefill_budget))


def test_spec_step_prefills_every_row_past_the_prefill_budget():
    llm = _llm(prefill_budget=64)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):  # 6 x 40 tokens: one schedule() admits only one prompt at a time
        llm.add_request(torch.randint(0, 97, (40,), generator=gen).tolist(), SamplingParams(max_tokens=4))
    reqs = prefill_all(llm, 6)
    assert len(reqs) == 6
    assert all(r.num_cached == len(r.all_ids) - 1 == 40 for r in reqs)


def test_spec_step_refuses_a_batch_it_did_not_prefill():
    llm = _llm(prefill_budget=64)
    llm.add_request(list(range(1, 30)), SamplingParams(max_tokens=4))
    with pytest.raises(RuntimeError, match="expected 2 prefilled sequences"):
        prefill_all(llm, 2)


@pytest.mark.parametrize("draft", [False, True])
def test_e2e_batches_run_at_the_labelled_size(draft):
    llm = _llm(prefill_budget=4096, draft=draft)
    prompts = [[1 + i, 2 + i, 3 + i] for i in range(5)]
    params = [SamplingParams(max_tokens=6, ignore_eos=True, seed=i) for i in range(5)]
    row = run_batch(llm, prompts, 4, params)  # groups of 4 and 1
    assert row["tokens"] == 30
    # The head's tokens per speculative step: at least its target token each, none without a head.
    assert row["tokens_per_speculative_step"] >= 1.0 if draft else row["tokens_per_speculative_step"] == 0.0
    # Every engine step is counted once, under the requests left running after it (0 after a
    # group's last step), and the steps' host time is within the run's.
    by_running = row["steps_by_running"]
    assert set(by_running) <= {0, 1, 2, 3, 4} and 4 in by_running and by_running[0]["steps"] >= 2
    assert 0 < sum(v["seconds"] for v in by_running.values()) <= row["seconds"]
    # A batch the engine cannot run at once (max_batch_size 2) is reported, not mislabelled.
    small = LLM.from_model(llm.model, draft=None, engine=small_engine(max_batch_size=2))
    with pytest.raises(RuntimeError, match="ran at most 2 at once"):
        run_batch(small, prompts, 4, params)
    # Fewer prompts than the batch: the whole run would be one smaller batch.
    with pytest.raises(ValueError, match="batch 8 needs at least 8 prompts, got 5"):
        run_batch(llm, prompts, 8, params)


def test_e2e_heads_option_names_each_head_or_says_what_is_wrong():
    from eaglespec.bench.e2e import parse_heads

    assert parse_heads("a=/x; b=/y") == {"a": "/x", "b": "/y"}
    assert list(parse_heads("")) == ["shipped"]
    with pytest.raises(ValueError, match="expected NAME=DIR"):
        parse_heads("just-a-dir")


def test_batch_one_prompts_cover_every_mtbench_category():
    from eaglespec.bench.e2e import spread_indices

    chosen = spread_indices(80, 16)  # MT-bench: 8 categories of 10 questions, in order
    assert len(set(chosen)) == 16 and all(0 <= i < 80 for i in chosen)
    assert sorted(i // 10 for i in chosen) == [c for c in range(8) for _ in range(2)]
    assert spread_indices(5, 16) == [0, 1, 2, 3, 4]
