"""EngineCore: requests arriving at any time, chunked prefill, preemption, cancellation and a
failing step; every greedy output equals its single-request reference and no block leaks."""

from __future__ import annotations

import pytest
import torch

from eaglespec.config import SamplingParams, SpecConfig
from eaglespec.engine.llm import LLM
from tests.conftest import random_model, small_engine
from tests.speculative.test_speculative_greedy import eagle1_head, predictable_target


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def _engine(model, head=None, **engine):
    spec = SpecConfig(tree="chain:3") if head is not None else None
    return LLM.from_model(model, draft=head, spec=spec, engine=small_engine(**engine)).core


def _references(model, prompts, max_tokens):
    llm = LLM.from_model(model, engine=small_engine())
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return [llm.generate([p], params)[0].token_ids for p in prompts]


def _all_blocks_free(core) -> bool:
    a = core.runner.allocator
    return a.num_free == a.num_blocks - 1 and core.kv_blocks_in_use == 0


def _run(core, arrivals: dict[int, list[tuple[list[int], SamplingParams]]], abort_at: dict[int, int] | None = None,
         max_steps: int = 2000):
    """Drive a core: ``arrivals[step]`` are added before that step; ``abort_at[step]`` is the
    index (in order of arrival) of a request aborted before that step. Returns per request
    the concatenated delta tokens, the finish reason and the deltas' text."""
    ids, got = [], {}
    for step in range(max_steps):
        for prompt, params in arrivals.get(step, []):
            ids.append(core.add_request(prompt, params))
            got[ids[-1]] = [[], None]
        if abort_at and step in abort_at:
            assert core.abort(ids[abort_at[step]])
        if step > max(arrivals) and not core.has_work:
            break
        for d in core.step():
            assert got[d.request_id][1] is None, "delta after the request finished"
            got[d.request_id][0] += d.new_token_ids
            assert d.num_output_tokens == len(got[d.request_id][0])
            if d.finished:
                got[d.request_id][1] = d.finish_reason
    return [got[i] for i in ids]


@pytest.mark.parametrize("speculative", [False, True])
def test_requests_arriving_while_others_run_match_single_references(speculative):
    model = predictable_target(seed=21)
    head = eagle1_head(model, seed=3) if speculative else None
    prompts = _prompts(model.config.vocab_size, [6, 40, 3, 25, 11], seed=1)
    lens = [12, 9, 15, 6, 10]
    refs = [r[:n] for r, n in zip(_references(model, prompts, max(lens)), lens)]
    core = _engine(model, head)
    arrivals = {0: [(prompts[0], SamplingParams(max_tokens=lens[0], ignore_eos=True))],
                2: [(prompts[1], SamplingParams(max_tokens=lens[1], ignore_eos=True)),
                    (prompts[2], SamplingParams(max_tokens=lens[2], ignore_eos=True))],
                5: [(prompts[3], SamplingParams(max_tokens=lens[3], ignore_eos=True))],
                9: [(prompts[4], SamplingParams(max_tokens=lens[4], ignore_eos=True))]}
    results = _run(core, arrivals)
    assert [tokens for tokens, _ in results] == refs
    assert all(reason == "length" for _, reason in results)
    assert _all_blocks_free(core) and not core.requests


@pytest.mark.parametrize("speculative", [False, True])
def test_chunked_prefill_never_stalls_decoding_and_is_exact(speculative):
    """A 70-token prompt under a 16-token budget is prefilled in 5 chunks; the request already
    running keeps decoding meanwhile: inside the chunk steps (mixed steps), and under
    speculation also in speculative steps between them."""
    from eaglespec.engine.scheduler import is_ready

    model = predictable_target(seed=22)
    head = eagle1_head(model, seed=4) if speculative else None
    prompts = _prompts(model.config.vocab_size, [5, 70, 37], seed=2)
    refs = _references(model, prompts, 10)
    core = _engine(model, head, prefill_token_budget=16)
    steps = []  # (kind, tokens left to prefill per request, ready requests in it, ready ones running)
    schedule = core.scheduler.schedule

    def recording():
        running_ready = sum(is_ready(r) for r in core.scheduler.running)
        s = schedule()
        if s is not None:
            left = [len(r.all_ids) - e for r, e in zip(s.requests, s.prefill_ends) if not is_ready(r)]
            steps.append((s.kind, left, sum(is_ready(r) for r in s.requests), running_ready))
        return s

    core.scheduler.schedule = recording
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    results = _run(core, {0: [(prompts[0], params)], 1: [(prompts[1], params), (prompts[2], params)]})
    assert [tokens for tokens, _ in results] == refs
    chunked = [i for i, (kind, left, *_) in enumerate(steps) if kind == "prefill" and any(n > 0 for n in left)]
    assert len(chunked) >= 4  # ceil(70 / 16) - 1 partial chunks at least
    beside_a_stream = [i for i in chunked if steps[i][3] > 0]  # chunks while request 0 was decoding
    assert len(beside_a_stream) >= 2
    for i in beside_a_stream:
        assert steps[i][2] >= 1  # the running request decoded inside the chunk's forward
        if speculative:
            assert steps[i + 1][0] == "decode"  # and its speculative step comes next
    assert _all_blocks_free(core)


@pytest.mark.parametrize("speculative", [False, True])
def test_preemption_by_a_tiny_pool_loses_and_duplicates_nothing(speculative):
    model = predictable_target(seed=23)
    head = eagle1_head(model, seed=5) if speculative else None
    prompts = _prompts(model.config.vocab_size, [30, 30, 30, 30], seed=3)
    refs = _references(model, prompts, 40)
    core = _engine(model, head, num_blocks=13)  # 4 x up to 74 tokens would need 20 blocks
    preempted = [0]
    preempt = core.scheduler._preempt

    def counting(req):
        preempted[0] += 1
        preempt(req)

    core.scheduler._preempt = counting
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    results = _run(core, {0: [(p, params) for p in prompts[:2]], 3: [(p, params) for p in prompts[2:]]})
    assert preempted[0] > 0
    assert [tokens for tokens, _ in results] == refs
    assert _all_blocks_free(core)


@pytest.mark.parametrize("speculative", [False, True])
def test_abort_mid_run_frees_blocks_at_once_and_others_are_unaffected(speculative):
    model = predictable_target(seed=24)
    head = eagle1_head(model, seed=6) if speculative else None
    prompts = _prompts(model.config.vocab_size, [9, 20, 14], seed=4)
    refs = _references(model, prompts, 20)
    core = _engine(model, head)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    ids = [core.add_request(p, params) for p in prompts]
    for _ in range(3):
        core.step()
    victim = core.requests[ids[1]]
    assert victim.blocks and victim.output_ids
    in_use = core.kv_blocks_in_use
    held = len(victim.blocks)
    assert core.abort(ids[1])
    assert core.kv_blocks_in_use == in_use - held and not victim.blocks  # freed at once
    assert not core.abort(ids[1])  # a second abort is a no-op
    got = {i: list(core.requests[i].output_ids) for i in (ids[0], ids[2])}
    reasons = {}
    while core.has_work:
        for d in core.step():
            if d.request_id in got:
                got[d.request_id] += d.new_token_ids
            reasons[d.request_id] = d.finish_reason
    assert reasons[ids[1]] == "abort"
    assert got[ids[0]] == refs[0] and got[ids[2]] == refs[2]
    assert _all_blocks_free(core)


def test_abort_of_a_waiting_request_and_with_a_decode_step_in_flight():
    model = random_model(predictable_target(seed=25).config, seed=25)
    prompts = _prompts(model.config.vocab_size, [8, 8, 8], seed=5)
    refs = _references(model, prompts, 12)
    core = _engine(model, max_batch_size=2)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    ids = [core.add_request(p, params) for p in prompts]
    for _ in range(3):
        core.step()
    assert core._in_flight is not None and core.num_waiting == 1  # overlapped decode queued
    assert core.abort(ids[2])  # still waiting: never ran
    assert core.abort(ids[0])  # its next token is being computed right now
    out = {ids[1]: list(core.requests[ids[1]].output_ids)}
    while core.has_work:
        for d in core.step():
            if d.request_id == ids[1]:
                out[ids[1]] += d.new_token_ids
    assert out[ids[1]] == refs[1]
    assert _all_blocks_free(core)


def test_decoding_on_a_cpu_is_not_overlapped_by_default():
    """overlap_decode None (the default) overlaps only on CUDA devices: on a CPU a queued step
    would run at once and its time be charged to the step before (misleading tree=auto)."""
    model = random_model(predictable_target(seed=27).config, seed=27)
    prompt = _prompts(model.config.vocab_size, [8], seed=7)[0]
    ref = _references(model, [prompt], 6)[0]
    core = _engine(model, overlap_decode=None)
    rid = core.add_request(prompt, SamplingParams(max_tokens=6, ignore_eos=True))
    out = []
    while core.has_work:
        out += [t for d in core.step() if d.request_id == rid for t in d.new_token_ids]
        assert core._in_flight is None
    assert out == ref


def test_a_request_that_breaks_a_step_fails_alone():
    model = predictable_target(seed=26)
    prompts = _prompts(model.config.vocab_size, [7, 12, 9], seed=6)
    refs = _references(model, prompts, 8)
    core = _engine(model)
    poison = prompts[1]
    prefill = core.runner.prefill

    def breaking(reqs, *args, **kwargs):
        if any(r.prompt_ids == poison for r in reqs):
            raise RuntimeError("kernel fault")
        return prefill(reqs, *args, **kwargs)

    core.runner.prefill = breaking
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    results = _run(core, {0: [(p, params) for p in prompts]})
    assert results[1][1] == "error"
    assert results[0] == [refs[0], "length"] and results[2] == [refs[2], "length"]
    assert _all_blocks_free(core)


def test_deltas_carry_text_and_hold_back_a_possible_stop_string():
    from eaglespec.engine.request import Request

    class Chars:  # a tokenizer whose token i is the character chr(97 + i % 26)
        eos_ids = ()

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(97 + i % 26) for i in ids)

    from eaglespec.tokenizer import IncrementalDetokenizer

    req = Request(0, [1], SamplingParams(max_tokens=20, stop=("cde",)), 0, IncrementalDetokenizer(Chars()))
    req.append_tokens([0, 1], ())  # "ab": the last len("cde") - 1 characters are held back
    assert req.text == "ab" and req.text_safe_to_show() == 0
    req.append_tokens([2, 3], ())  # "abcd"
    assert req.text_safe_to_show() == 2
    req.append_tokens([4, 5], ())  # "abcde" hits the stop string
    assert req.finished and req.text == "ab" and req.text_safe_to_show() == 2
