"""Prefill steps leave the head's cache as if every position had come through speculative steps:

- a prompt prefilled in chunks, even where the budget would stop a chunk one token short of the
  prompt's end (the request would be ready with no pending pair of its own: its first
  speculative step then wrote a stale slot's pairs into the head's cache);
- a running request that decodes inside another request's prefill step (a mixed step): its
  pair joins those still pending, as a plain step's does.
"""

from __future__ import annotations

import pytest
import torch

from eaglespec.config import EngineConfig, SamplingParams, SpecConfig
from eaglespec.engine.llm import LLM
from tests.conftest import small_engine
from tests.speculative.test_speculative_greedy import eagle1_head, predictable_target


def _head_cache(model, head, prompt: list[int], budget: int, tokens: int, others: list[list[int]] = ()):
    """Tokens and the head's cached K, [L, positions, Hkv, D], once ``tokens`` are cached; every
    state slot holds junk first, as slots left by finished requests do. ``others``: prompts
    admitted one by one, each after two steps (the request decodes inside their prefills)."""
    llm = LLM.from_model(model, draft=head, spec=SpecConfig(tree="chain:3"),
                         engine=small_engine(prefill_token_budget=budget, block_size=4, overlap_decode=False))
    core, spec = llm.core, llm.core.speculative
    spec.pending_count.fill_(spec.width)
    spec.pending_feat.normal_(generator=torch.Generator().manual_seed(0))
    spec.pending_tok.random_(0, model.config.vocab_size, generator=torch.Generator().manual_seed(1))
    chunks = []
    schedule = core.scheduler.schedule

    def recording():
        step = schedule()
        if step is not None and step.kind == "prefill":
            chunks.append(step.prefill_ends)
        return step

    core.scheduler.schedule = recording
    rid = core.add_request(prompt, SamplingParams(max_tokens=60, ignore_eos=True))
    req = core.requests[rid]
    waiting, steps = list(others), 0
    while req.num_cached < tokens:
        core.step()
        steps += 1
        if waiting and steps % 2 == 0:
            core.add_request(waiting.pop(0), SamplingParams(max_tokens=4, ignore_eos=True))
    cached = req.num_cached - int(spec.pending_count[spec._slot_of[rid]])
    return req.all_ids[:tokens], spec.cache.k[:, torch.tensor(req.blocks)].flatten(1, 2)[:, :cached], chunks


def test_a_chunk_never_stops_one_token_short_and_the_heads_cache_is_a_whole_prefills():
    model = predictable_target(seed=31)
    head = eagle1_head(model, seed=5)
    prompt = torch.randint(0, model.config.vocab_size, (17,), generator=torch.Generator().manual_seed(2)).tolist()
    whole_ids, whole_k, whole_chunks = _head_cache(model, head, prompt, 64, 30)
    chunked_ids, chunked_k, chunks = _head_cache(model, head, prompt, 16, 30)
    assert whole_chunks == [[17]]
    assert chunks == [[15], [17]]  # the budget reached 16, one short of the end: two short instead
    assert chunked_ids == whole_ids
    m = min(whole_k.shape[1], chunked_k.shape[1])
    assert m >= 24
    assert torch.allclose(chunked_k[:, :m], whole_k[:, :m], atol=1e-5)


def test_a_prefill_budget_below_two_tokens_is_refused():
    with pytest.raises(ValueError, match="prefill_token_budget must be >= 2"):
        EngineConfig(prefill_token_budget=1)


def test_a_request_decoding_inside_other_prefills_keeps_every_pair_for_the_head():
    model = predictable_target(seed=31)
    head = eagle1_head(model, seed=5)
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, model.config.vocab_size, (9,), generator=gen).tolist()
    others = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in (40, 12, 25, 30)]
    alone_ids, alone_k, _ = _head_cache(model, head, prompt, 16, 60)
    mixed_ids, mixed_k, chunks = _head_cache(model, head, prompt, 16, 60, others)
    assert sum(len(ends) > 1 for ends in chunks) >= 4  # the request was in other requests' prefill steps
    assert mixed_ids == alone_ids
    m = min(alone_k.shape[1], mixed_k.shape[1])
    assert m >= 50
    assert torch.allclose(mixed_k[:, :m], alone_k[:, :m], atol=1e-5)
