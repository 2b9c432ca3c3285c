"""A real server driven by the official openai client: completions and chat, streaming and
not, n > 1, stop strings, greedy outputs equal LLM.generate, /metrics counts what was sent."""

from __future__ import annotations

import concurrent.futures

import httpx

from eaglespec import SamplingParams

PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "Water boils at a temperature of"]
CHAT = [{"role": "user", "content": "Name three colours."}]


def test_models_and_health(served):
    models = served.client().models.list()
    assert [m.id for m in models.data] == [served.model]
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}


def test_completions_greedy_equal_llm_generate(served, reference):
    refs = reference.generate(PROMPTS, SamplingParams(max_tokens=10))
    client = served.client()
    for prompt, ref in zip(PROMPTS, refs):
        r = client.completions.create(model=served.model, prompt=prompt, max_tokens=10, temperature=0)
        assert r.choices[0].text == ref.text
        assert r.usage.completion_tokens == len(ref.token_ids)
        assert r.usage.prompt_tokens == len(reference.tokenizer.encode(prompt))
        assert r.choices[0].finish_reason == ("length" if ref.finish_reason == "length" else "stop")
    # A batch of prompts in one request: one choice per prompt, in order.
    r = client.completions.create(model=served.model, prompt=PROMPTS, max_tokens=10, temperature=0)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [o.text for o in refs]


def test_concurrent_requests_equal_their_references(served, reference):
    refs = reference.generate(PROMPTS, SamplingParams(max_tokens=8))
    client = served.client()

    def ask(prompt):
        return client.completions.create(model=served.model, prompt=prompt, max_tokens=8, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        got = list(pool.map(ask, PROMPTS * 2))
    assert got == [o.text for o in refs] * 2
    assert served.wait_idle()


def test_chat_streaming_and_not_equal_llm_chat(served, reference):
    ref = reference.chat(CHAT, SamplingParams(max_tokens=12))
    client = served.client()
    r = client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == ref.text and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == len(ref.token_ids)
    pieces, usage, reasons = [], None, []
    for chunk in client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=12, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            reasons.append(c.finish_reason)
    assert "".join(pieces) == ref.text
    assert len(pieces) > 2  # it really streamed
    assert reasons[-1] in ("length", "stop") and all(r is None for r in reasons[:-1])
    assert usage.completion_tokens == len(ref.token_ids) and usage.prompt_tokens == r.usage.prompt_tokens


def test_completion_streaming_equals_non_streaming(served):
    client = served.client()
    whole = client.completions.create(model=served.model, prompt=PROMPTS[1], max_tokens=12, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=served.model, prompt=PROMPTS[1], max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == whole.choices[0].text


def test_n_choices(served, reference):
    client = served.client()
    ref = reference.chat(CHAT, SamplingParams(max_tokens=6))
    r = client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=6, temperature=0, n=3)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert all(c.message.content == ref.text for c in r.choices)
    assert r.usage.completion_tokens == 3 * len(ref.token_ids)
    # Sampled with a seed: reproducible per choice; streamed choices carry their index.
    kw = dict(model=served.model, prompt=PROMPTS[0], max_tokens=8, temperature=1.0, seed=7, n=2)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    texts = {0: "", 1: ""}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert [texts[0], texts[1]] == [c.text for c in sorted(a.choices, key=lambda c: c.index)]


def test_stop_strings(served, reference):
    ref = reference.generate([PROMPTS[2]], SamplingParams(max_tokens=16))[0].text
    stop = ref[len(ref) // 2:len(ref) // 2 + 3]
    assert stop.strip() and ref.index(stop) > 0
    expected = ref[:ref.index(stop)]
    client = served.client()
    r = client.completions.create(model=served.model, prompt=PROMPTS[2], max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=served.model, prompt=PROMPTS[2], max_tokens=16, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == expected  # the stop string's start was held back, never streamed


def _scrape(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_what_was_sent(served):
    assert served.wait_idle()
    before = _scrape(served.url)
    client = served.client()
    rs = [client.completions.create(model=served.model, prompt=p, max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True}) for p in PROMPTS]
    bad = httpx.post(served.url + "/v1/completions", json={"model": served.model, "prompt": "x", "max_tokens": 0})
    assert bad.status_code == 400
    assert served.wait_idle()
    after = _scrape(served.url)

    def d(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert d("eaglespec_requests_total", status="length") == len(PROMPTS)
    assert d("eaglespec_requests_total", status="rejected") == 1
    assert d("eaglespec_prompt_tokens_total") == sum(r.usage.prompt_tokens for r in rs)
    assert d("eaglespec_generation_tokens_total") == sum(r.usage.completion_tokens for r in rs) == 5 * len(PROMPTS)
    assert d("eaglespec_time_to_first_token_seconds_count") == len(PROMPTS)
    assert d("eaglespec_time_per_output_token_seconds_count") == len(PROMPTS)
    assert after[("eaglespec_kv_blocks_in_use", ())] == 0
    assert after[("eaglespec_num_requests_running", ())] == 0
    assert after[("eaglespec_kv_blocks_total", ())] == served.core.runner.allocator.num_blocks - 1
    tree = served.llm.spec_config.tree
    assert after[("eaglespec_speculation_info", (("model", served.model), ("tree", tree)))] == 1
    forwards = d("eaglespec_decode_forwards_total")
    assert 0 < forwards < 5 * len(PROMPTS)  # the first token of each comes from its prefill
    assert after[("eaglespec_tau", ())] >= 1.0
    assert d("eaglespec_spec_proposed_total", depth="1") > 0
    assert d("eaglespec_engine_steps_total", kind="speculative") > 0
    # Every step the engine ran was timed, under its kind (and its tree for speculative steps).
    timed = sum(v for (name, labels), v in after.items() if name == "eaglespec_engine_step_seconds_count") - sum(
        v for (name, labels), v in before.items() if name == "eaglespec_engine_step_seconds_count")
    assert timed == sum(d("eaglespec_engine_steps_total", kind=k) for k in ("prefill", "mixed", "decode", "speculative"))
    assert d("eaglespec_engine_step_seconds_count", kind="speculative", choice=tree) > 0


def test_cli_chat_over_http(served, reference, monkeypatch, capsys):
    from eaglespec.cli import main

    answers = iter(["Name three colours.", ""])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(answers))
    assert main(["chat", "--url", served.url, "--max-tokens", "12"]) == 0
    ref = reference.chat(CHAT, SamplingParams(max_tokens=12))
    assert capsys.readouterr().out == ref.text + "\n"
