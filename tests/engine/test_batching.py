"""Continuous batching: batched greedy generation equals generating each prompt alone."""

from __future__ import annotations

import torch

from eaglespec.config import SamplingParams, SpecConfig
from eaglespec.engine.llm import LLM
from eaglespec.engine.runner import prefill_bucket_sizes
from tests.conftest import random_model, small_engine, tiny_config
from tests.speculative.test_speculative_greedy import eagle1_head


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def test_batched_greedy_equals_single():
    model = random_model(tiny_config(), seed=11)
    prompts = _prompts(model.config.vocab_size, [5, 33, 17, 1, 48])
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    batched = LLM.from_model(model, engine=small_engine()).generate(prompts, params)
    for prompt, out in zip(prompts, batched):
        alone = LLM.from_model(model, engine=small_engine()).generate([prompt], params)[0]
        assert out.token_ids == alone.token_ids
        assert len(out.token_ids) == 24


def test_same_seed_same_sample_regardless_of_batch():
    model = random_model(tiny_config(), seed=12)
    prompts = _prompts(model.config.vocab_size, [9, 21, 4], seed=1)
    params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=16, seed=1234, ignore_eos=True)
    llm = LLM.from_model(model, engine=small_engine())
    together = llm.generate(prompts, params)
    alone = llm.generate([prompts[1]], params)[0]
    assert together[1].token_ids == alone.token_ids
    again = llm.generate([prompts[1]], SamplingParams(temperature=0.9, top_p=0.95, max_tokens=16, seed=99,
                                                      ignore_eos=True))[0]
    assert again.token_ids != alone.token_ids


def test_preemption_when_pool_is_small_keeps_outputs_exact():
    model = random_model(tiny_config(), seed=13)
    prompts = _prompts(model.config.vocab_size, [30, 30, 30, 30], seed=2)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    roomy = LLM.from_model(model, engine=small_engine(num_blocks=64)).generate(prompts, params)
    # 4 sequences of up to 70 tokens need 20 blocks; 12 forces preemption and recomputation.
    tight = LLM.from_model(model, engine=small_engine(num_blocks=12)).generate(prompts, params)
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]


def test_request_larger_than_pool_fails_cleanly_and_engine_survives():
    model = random_model(tiny_config(), seed=14)
    llm = LLM.from_model(model, engine=small_engine(num_blocks=4))
    too_long = _prompts(model.config.vocab_size, [100], seed=3)[0]
    ok = _prompts(model.config.vocab_size, [10], seed=4)[0]
    outs = llm.generate([too_long, ok], SamplingParams(max_tokens=5, ignore_eos=True))
    assert outs[0].finish_reason == "error" and "KV blocks" in outs[0].error
    assert outs[1].finish_reason == "length" and len(outs[1].token_ids) == 5


def test_stop_conditions_eos_and_max_tokens():
    model = random_model(tiny_config(), seed=15)
    prompt = _prompts(model.config.vocab_size, [12], seed=5)[0]
    llm = LLM.from_model(model, engine=small_engine())
    free = llm.generate([prompt], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    eos = free.token_ids[3]
    llm_eos = LLM.from_model(model, engine=small_engine(), eos_ids=(eos,))
    stopped = llm_eos.generate([prompt], SamplingParams(max_tokens=10))[0]
    first = free.token_ids.index(eos)
    assert stopped.token_ids == free.token_ids[:first + 1]
    assert stopped.finish_reason == "stop"


def test_overlapped_decode_equals_step_by_step_decode(monkeypatch):
    """Queueing the next decode step before reading the current one changes no output: greedy
    and seeded sampling, requests stopping at different times (EOS, max_tokens, stop limits),
    a request admitted while others decode."""
    model = random_model(tiny_config(), seed=16)
    vocab = model.config.vocab_size
    prompts = _prompts(vocab, [7, 19, 3, 11], seed=6)
    free = LLM.from_model(model, engine=small_engine()).generate(prompts[0], SamplingParams(max_tokens=12,
                                                                                           ignore_eos=True))[0]
    eos = free.token_ids[5]  # request 0 stops at its 6th token; the others may too
    params = [SamplingParams(max_tokens=12), SamplingParams(max_tokens=3, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=20, max_tokens=15, seed=7, ignore_eos=True),
              SamplingParams(temperature=1.0, top_p=0.9, max_tokens=9, seed=8)]

    def run(overlap: bool):
        llm = LLM.from_model(model, engine=small_engine(overlap_decode=overlap), eos_ids=(eos,))
        follows = [0]
        launch = llm.runner.launch_decode

        def counting(reqs, follow=None):
            follows[0] += follow is not None
            return launch(reqs, follow)

        monkeypatch.setattr(llm.runner, "launch_decode", counting)
        first = [llm.add_request(p, sp) for p, sp in zip(prompts[:3], params[:3])]
        for _ in range(4):
            llm.step()
        late = llm.add_request(prompts[3], params[3])  # admitted while the others decode
        llm._drain()
        outs = [llm.collect(i) for i in first + [late]]
        assert llm.runner.allocator.num_free == llm.runner.allocator.num_blocks - 1  # every block back
        return [(o.token_ids, o.finish_reason) for o in outs], follows[0]

    overlapped, follows = run(True)
    stepwise, no_follows = run(False)
    assert overlapped == stepwise
    assert follows > 5 and no_follows == 0
    assert overlapped[0][1] == "stop" and overlapped[1] == (overlapped[1][0], "length")
    assert len(overlapped[1][0]) == 3 and len(overlapped[2][0]) == 15


def test_kv_pool_holds_a_full_batch_of_the_longest_sequences_and_no_more():
    """Blocks beyond what max_batch_size sequences of max_model_len can hold are never used (no
    prefix cache): the pool stops there and leaves the memory to graphs. Block 0 is scratch."""
    model = random_model(tiny_config(), seed=15)
    engine = dict(num_blocks=0, kv_cache_tokens=100_000, block_size=4, max_batch_size=3, max_model_len=40)
    plain = LLM.from_model(model, engine=small_engine(**engine))
    assert plain.runner.allocator.num_blocks == 3 * 10 + 1  # 40 positions: 10 blocks a sequence
    spec = LLM.from_model(model, draft=eagle1_head(model, seed=2), spec=SpecConfig(tree="chain:3"),
                          engine=small_engine(**engine))
    assert spec.runner.allocator.num_blocks == 3 * 11 + 1  # a step of 4 writes past the last token
    small = LLM.from_model(model, engine=small_engine(**{**engine, "kv_cache_tokens": 40}))
    assert small.runner.allocator.num_blocks == 40 // 4 + 1  # a smaller budget is kept
    given = LLM.from_model(model, engine=small_engine(**{**engine, "num_blocks": 500}))
    assert given.runner.allocator.num_blocks == 500  # a pool size asked for is kept
    prompts = _prompts(model.config.vocab_size, [30, 12, 25], seed=5)
    outs = plain.generate(prompts, SamplingParams(max_tokens=10, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [10, 10, 10]  # three near-full sequences fit at once


def test_speculative_prefill_projects_only_each_requests_last_token():
    """The draft needs the hidden state of every prefilled token, the sampler only the logits of
    each request's last one: a prefill never runs the output projection on more rows than its
    sequences (padded to max_batch_size, as a prefill graph's are), never on every token."""
    model = random_model(tiny_config(), seed=16)
    llm = LLM.from_model(model, draft=eagle1_head(model, seed=4), spec=SpecConfig(tree="chain:3"),
                         engine=small_engine())
    rows, prefilling = [], [False]
    runner_prefill, local_logits = llm.runner.prefill, llm.runner.model.local_logits

    def prefill(*args, **kwargs):
        prefilling[0] = True
        try:
            return runner_prefill(*args, **kwargs)
        finally:
            prefilling[0] = False

    def logits(hidden):
        if prefilling[0]:
            rows.append(hidden.shape[0])
        return local_logits(hidden)

    llm.runner.prefill, llm.runner.model.local_logits = prefill, logits
    prompts = _prompts(model.config.vocab_size, [30, 12, 25], seed=6)
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    plain = LLM.from_model(model, engine=small_engine()).generate(prompts, SamplingParams(max_tokens=6,
                                                                                        ignore_eos=True))
    assert rows and max(rows) <= small_engine().max_batch_size < 12  # the shortest prompt alone has 12 tokens
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]


def test_padded_prefill_equals_an_exact_one_plain_and_speculative():
    """A prefill of at most prefill_graph_tokens tokens runs padded (tokens to a power of two,
    sequences to max_batch_size, as its CUDA graph on a GPU); a longer one eagerly at its exact
    size. Both give the same tokens, greedy and seeded sampling, through the target alone and
    with the head's prefill (its cache and pending pairs), chunked prompts included."""
    model = random_model(tiny_config(), seed=17)
    prompts = _prompts(model.config.vocab_size, [30, 12, 45, 3], seed=8)
    padded_engine = small_engine(prefill_token_budget=40)  # the 45-token prompt comes in two chunks
    exact_engine = small_engine(prefill_token_budget=40, prefill_graph_tokens=0)
    head = eagle1_head(model, seed=5)
    runs = []
    for engine in (padded_engine, exact_engine):
        plain = LLM.from_model(model, engine=engine)
        spec = LLM.from_model(model, draft=head, spec=SpecConfig(tree="chain:3"), engine=engine)
        assert bool(plain.runner.prefill_buckets) == (engine is padded_engine)
        outs = []
        for params in (SamplingParams(max_tokens=12, ignore_eos=True),
                       SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=12, ignore_eos=True)):
            for llm in (plain, spec):
                outs.append([o.token_ids for o in llm.generate(prompts, params)])
        runs.append(outs)
    assert runs[0] == runs[1]
    assert runs[0][0] == runs[0][1]  # greedy: speculation changes nothing


def test_prefill_buckets_are_powers_of_two_up_to_the_limit():
    assert prefill_bucket_sizes(0) == []
    assert prefill_bucket_sizes(100) == [16, 32, 64, 100]
    assert prefill_bucket_sizes(2048) == [16, 32, 64, 128, 256, 512, 1024, 2048]
