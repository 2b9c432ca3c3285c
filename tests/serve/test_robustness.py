"""Hostile and malformed requests get 4xx with an OpenAI-style error body and the server keeps
serving; clients that go away have their requests aborted and their KV blocks freed; a load of
64 concurrent streams, a quarter dropped mid-stream, leaves correct outputs and a free pool."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx

from eaglespec import SamplingParams


def _cases(model: str, max_len: int) -> list[tuple[str, str, object, int]]:
    """(name, path, body: dict (JSON) or bytes (raw), expected status)."""
    c, ch = "/v1/completions", "/v1/chat/completions"
    ok_chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    ok = {"model": model, "prompt": "hi", "max_tokens": 2}
    return [
        ("not json", c, b"{this is not json", 400),
        ("truncated json", c, b'{"model": "m", "prompt": "hi"', 400),
        ("json array", c, b"[1, 2, 3]", 400),
        ("json string", c, b'"hello"', 400),
        ("empty body", c, b"", 400),
        ("invalid utf-8", c, b'{"model": "' + model.encode() + b'", "prompt": "\xff\xfe\xfa"}', 400),
        ("nan temperature", c, b'{"model": "' + model.encode() + b'", "prompt": "hi", "temperature": NaN}', 400),
        ("deep nesting", c, b"[" * 100000 + b"]" * 100000, 400),
        ("10 MB body", c, b'{"model": "m", "prompt": "' + b"a" * (10 << 20) + b'"}', 413),
        ("missing model", c, {"prompt": "hi"}, 400),
        ("missing prompt", c, {"model": model}, 400),
        ("unknown model", c, {**ok, "model": "gpt-17"}, 404),
        ("unknown model chat", ch, {**ok_chat, "model": "nope"}, 404),
        ("model not a string", c, {**ok, "model": 3}, 400),
        ("prompt wrong type", c, {**ok, "prompt": {"a": 1}}, 400),
        ("prompt empty string", c, {**ok, "prompt": ""}, 400),
        ("prompt empty list", c, {**ok, "prompt": []}, 400),
        ("prompt token out of vocab", c, {**ok, "prompt": [1, 2, 10 ** 9]}, 400),
        ("prompt negative token", c, {**ok, "prompt": [-5]}, 400),
        ("prompt longer than context", c, {**ok, "prompt": [42] * (max_len + 10)}, 400),
        ("max_tokens beyond context", c, {**ok, "max_tokens": max_len * 4}, 400),
        ("max_tokens zero", c, {**ok, "max_tokens": 0}, 400),
        ("max_tokens string", c, {**ok, "max_tokens": "five"}, 400),
        ("max_tokens float", c, {**ok, "max_tokens": 2.5}, 400),
        ("temperature negative", c, {**ok, "temperature": -1}, 400),
        ("temperature absurd", c, {**ok, "temperature": 1e9}, 400),
        ("temperature string", c, {**ok, "temperature": "hot"}, 400),
        ("top_p zero", c, {**ok, "top_p": 0}, 400),
        ("top_p above one", c, {**ok, "top_p": 1.5}, 400),
        ("top_k negative", c, {**ok, "top_k": -7}, 400),
        ("n zero", c, {**ok, "n": 0}, 400),
        ("n huge", c, {**ok, "n": 100000}, 400),
        ("seed too large", c, {**ok, "seed": 2 ** 70}, 400),
        ("stop wrong type", c, {**ok, "stop": 5}, 400),
        ("stop empty string", c, {**ok, "stop": [""]}, 400),
        ("too many stops", c, {**ok, "stop": [str(i) for i in range(100)]}, 400),
        ("stream not bool", c, {**ok, "stream": "yes"}, 400),
        ("empty messages", ch, {**ok_chat, "messages": []}, 400),
        ("messages not a list", ch, {**ok_chat, "messages": "hi"}, 400),
        ("message without role", ch, {**ok_chat, "messages": [{"content": "hi"}]}, 400),
        ("message bad role", ch, {**ok_chat, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
        ("message content wrong type", ch, {**ok_chat, "messages": [{"role": "user", "content": 7}]}, 400),
        ("messages all empty", ch, {**ok_chat, "messages": [{"role": "user", "content": ""}]}, 400),
        ("chat max_tokens beyond context", ch, {**ok_chat, "max_tokens": 10 ** 6}, 400),
        ("unknown route", "/v1/embeddings", ok, 404),
        ("logprobs unsupported", c, {**ok, "logprobs": 5}, 400),
        ("echo unsupported", c, {**ok, "echo": True}, 400),
        ("tools unsupported", ch, {**ok_chat, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400),
        ("best_of unsupported", c, {**ok, "best_of": 3}, 400),
    ]


def test_bad_inputs_get_4xx_with_error_bodies_and_the_server_keeps_serving(served):
    cases = _cases(served.model, served.app.state.served.max_model_len)
    assert len(cases) >= 30 and len({name for name, *_ in cases}) == len(cases)
    with httpx.Client(base_url=served.url, timeout=60) as http:
        for name, path, body, status in cases:
            if isinstance(body, bytes):
                r = http.post(path, content=body, headers={"content-type": "application/json"})
            else:
                r = http.post(path, json=body)
            assert r.status_code == status, (name, r.status_code, r.text[:300])
            err = r.json().get("error")
            assert isinstance(err, dict) and isinstance(err.get("message"), str) and err["message"], (name, r.text)
            assert isinstance(err.get("type"), str), name
        # A method the route does not have is a 4xx too, and the engine was never bothered.
        assert http.get("/v1/completions").status_code == 405
        assert served.wait_idle()
        r = http.post("/v1/completions", json={"model": served.model, "prompt": "Hello", "max_tokens": 3,
                                               "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert http.get("/health").json() == {"status": "ok"}


def test_stream_dropped_by_the_client_frees_its_blocks(served):
    assert served.wait_idle()
    body = {"model": served.model, "prompt": "Tell me a long story.", "max_tokens": 400, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=served.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(3)]
            assert any(line.startswith("data: ") for line in got)
            assert served.core.kv_blocks_in_use > 0
        # the response is closed here, mid-stream
    assert served.wait_idle(60), "the dropped request still holds KV blocks"


def test_non_streaming_request_dropped_by_the_client_is_aborted(served):
    assert served.wait_idle()
    body = json.dumps({"model": served.model, "prompt": "Count to one thousand.", "max_tokens": 400,
                       "temperature": 0, "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", served.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    for _ in range(200):  # wait until it runs
        if served.core.kv_blocks_in_use > 0:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert served.core.kv_blocks_in_use > 0
    sock.close()
    assert served.wait_idle(60), "the abandoned request still holds KV blocks"


def test_64_concurrent_streams_a_quarter_dropped(served, reference):
    prompts = ["One, two, three,", "The sky is", "My favourite food is", "Paris is in"]
    refs = {p: o.text for p, o in zip(prompts, reference.generate(prompts, SamplingParams(max_tokens=6)))}

    async def client(i: int, http: httpx.AsyncClient):
        prompt = prompts[i % len(prompts)]
        body = {"model": served.model, "prompt": prompt, "max_tokens": 6, "temperature": 0, "stream": True}
        text = ""
        async with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if i % 4 == 3 and text:
                    return None  # drop mid-stream after the first piece
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += "".join(c["text"] for c in json.loads(line[6:])["choices"])
        return prompt, text

    async def main():
        limits = httpx.Limits(max_connections=80)
        async with httpx.AsyncClient(base_url=served.url, timeout=300, limits=limits) as http:
            return await asyncio.gather(*(client(i, http) for i in range(64)))

    results = asyncio.run(main())
    finished = [r for r in results if r is not None]
    assert len(finished) >= 48
    for prompt, text in finished:
        assert text == refs[prompt]
    assert served.wait_idle(120)
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}


def test_a_request_failing_inside_the_engine_fails_alone(served, reference):
    poison = [17, 4, 17, 4, 17, 4, 17]
    prefill = served.core.runner.prefill

    def breaking(reqs, *args, **kwargs):
        if any(r.prompt_ids == poison for r in reqs):
            raise RuntimeError("simulated kernel fault")
        return prefill(reqs, *args, **kwargs)

    ref = reference.generate(["The sky is"], SamplingParams(max_tokens=6))[0].text

    async def main(http):
        bad = http.post("/v1/completions", json={"model": served.model, "prompt": poison, "max_tokens": 4})
        good = http.post("/v1/completions", json={"model": served.model, "prompt": "The sky is", "max_tokens": 6,
                                                  "temperature": 0})
        return await asyncio.gather(bad, good)

    async def run():
        async with httpx.AsyncClient(base_url=served.url, timeout=300) as http:
            return await main(http)

    served.core.runner.prefill = breaking
    try:
        bad, good = asyncio.run(run())
    finally:
        del served.core.runner.prefill  # the instance attribute goes; the method is back
    assert bad.status_code == 500 and "simulated kernel fault" in bad.json()["error"]["message"]
    assert good.status_code == 200 and good.json()["choices"][0]["text"] == ref
    assert served.wait_idle()
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}
