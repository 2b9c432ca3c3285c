"""The context limit (max_model_len): requests that reach it finish with "length", never crash.

A speculative step may emit up to ``lookahead`` tokens at once, so the band of prompt lengths
from ``max_model_len - 2 * lookahead`` up to ``max_model_len`` covers every way a request can
run into the limit: mid-step, at a step boundary, at prefill, and with no room at all.
"""

from __future__ import annotations

import pytest
import torch

from eaglespec.config import SamplingParams, SpecConfig
from eaglespec.engine.llm import LLM
from tests.conftest import random_model, small_engine, tiny_config
from tests.speculative.test_speculative_greedy import eagle1_head, predictable_target

MAX_LEN = 40
TREE = "chain:3"  # lookahead 4: a step emits up to 4 tokens


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 61, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _llm(target, speculative: bool) -> LLM:
    engine = small_engine(max_model_len=MAX_LEN, block_size=4, num_blocks=80)
    head = eagle1_head(target, seed=5) if speculative else None
    return LLM.from_model(target, draft=head, spec=SpecConfig(tree=TREE) if speculative else None, engine=engine)


@pytest.fixture(scope="module")
def target():
    return predictable_target(seed=21)


@pytest.fixture(scope="module")
def plain_reference(target):
    """Greedy plain decoding with a limit far away: the tokens every run must reproduce."""
    llm = LLM.from_model(target, engine=small_engine(max_model_len=4 * MAX_LEN, block_size=4, num_blocks=80))

    def run(prompt: list[int], max_tokens: int) -> list[int]:
        return llm.generate([prompt], SamplingParams(max_tokens=max_tokens, ignore_eos=True))[0].token_ids
    return run


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
@pytest.mark.parametrize("batch", [1, 4])
def test_every_prompt_length_of_the_band_finishes_with_length(target, plain_reference, speculative, batch):
    llm = _llm(target, speculative)
    lookahead = llm.scheduler.lookahead
    assert lookahead == (4 if speculative else 1)
    total_free = llm.runner.allocator.num_free
    params = SamplingParams(max_tokens=1000, ignore_eos=True)
    for n in range(MAX_LEN - 2 * 4, MAX_LEN + 1):
        at_limit = _prompt(n, seed=n)
        # Requests that go on after the one at the limit ends (short prompts, more tokens to make).
        others = [_prompt(3 + i, seed=100 + i) for i in range(batch - 1)]
        other_params = [SamplingParams(max_tokens=MAX_LEN - 10, ignore_eos=True) for _ in others]
        outs = llm.generate([at_limit] + others, [params] + other_params)
        first = outs[0]
        assert first.finish_reason == "length", (n, first.error)
        assert first.error is None
        assert len(first.prompt_token_ids) + len(first.token_ids) == MAX_LEN, n
        assert first.token_ids == (plain_reference(at_limit, MAX_LEN - n) if n < MAX_LEN else []), n
        for prompt, out in zip(others, outs[1:]):
            assert out.finish_reason == "length" and len(out.token_ids) == MAX_LEN - 10
            assert out.token_ids == plain_reference(prompt, MAX_LEN - 10)
        assert llm.runner.allocator.num_free == total_free, f"blocks leaked at prompt length {n}"
        assert not llm.scheduler.running and not llm.scheduler.waiting
        if speculative:
            assert len(llm.speculative._slot_of) == 0


def test_prompt_at_the_limit_ends_with_no_tokens(target):
    llm = _llm(target, speculative=True)
    out = llm.generate([_prompt(MAX_LEN, seed=1)], SamplingParams(max_tokens=5))[0]
    assert out.token_ids == [] and out.finish_reason == "length" and out.error is None
    pieces = list(llm.stream(_prompt(MAX_LEN, seed=2), SamplingParams(max_tokens=5)))
    assert "".join(pieces) == ""


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_prompt_past_the_limit_raises_naming_the_lengths(target, speculative):
    llm = _llm(target, speculative)
    free = llm.runner.allocator.num_free
    with pytest.raises(ValueError, match=rf"prompt of {MAX_LEN + 1} tokens.*max_model_len {MAX_LEN}"):
        llm.generate([_prompt(3, seed=0), _prompt(MAX_LEN + 1, seed=1)], SamplingParams(max_tokens=4))
    # Nothing of the refused batch is left queued: the next call runs as if it never happened.
    assert not llm.scheduler.has_work and llm.runner.allocator.num_free == free
    out = llm.generate([_prompt(3, seed=0)], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4


def test_max_model_len_defaults_to_the_models_context():
    target = random_model(tiny_config(max_position_embeddings=96))
    llm = LLM.from_model(target, engine=small_engine(max_model_len=0))
    assert llm.engine_config.max_model_len == 96
