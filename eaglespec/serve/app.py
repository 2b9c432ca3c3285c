"""The FastAPI app: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics.

Every request body is read, decoded (strict UTF-8), parsed (strict JSON: no NaN) and validated
here, before anything reaches the engine; whatever is wrong gets a 4xx with an OpenAI-style
error body. A client that goes away (closed stream, dropped connection) has its requests
aborted, which frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from eaglespec.config import SamplingParams
from eaglespec.serve.engine_thread import EngineThread, RequestHandle
from eaglespec.serve.metrics import ServerMetrics
from eaglespec.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DISCONNECT_POLL_S = 0.2


@dataclass(slots=True)
class ServedModel:
    """What the app needs to know about the engine behind it."""

    name: str
    tokenizer: object
    vocab_size: int
    max_model_len: int  # prompt + generated tokens
    aliases: tuple[str, ...] = ()


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` gets 413 before the app has read it."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._reject(send)
        seen = 0
        started = False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send):
        err = APIError(413, f"request body larger than {self.max_bytes} bytes", code="request_too_large")
        body = json.dumps(err.body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def _parse(request: Request, model_cls):
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"request body is not valid UTF-8 (byte {exc.start})", code="invalid_utf8") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param,
                       code="invalid_value") from None


def build_app(engine: EngineThread, served: ServedModel, metrics: ServerMetrics,
              max_body_bytes: int = 1 << 20) -> FastAPI:
    app = FastAPI(title="eaglespec", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.served = served
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        if 400 <= exc.status < 500:
            metrics.reject()
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), kind=kind).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_request, exc: Exception):
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                                     kind="internal_error").body(), status_code=500)

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "error", "error": repr(engine.error)}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": created,
                                            "owned_by": "eaglespec", "max_model_len": served.max_model_len}]}

    def check_model(name: str) -> None:
        if name != served.name and name not in served.aliases:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {served.name!r}",
                           param="model", code="model_not_found")

    def sampling(req, prompt_len: int, default_max: int | None, index: int) -> SamplingParams:
        room = served.max_model_len - prompt_len
        if prompt_len >= served.max_model_len:
            raise APIError(400, f"this model's maximum context length is {served.max_model_len} tokens; the "
                           f"prompt has {prompt_len}, leaving no room to generate",
                           param="prompt", code="context_length_exceeded")
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens or default_max or room
        if max_tokens > room:
            raise APIError(400, f"max_tokens={max_tokens} plus the prompt's {prompt_len} tokens exceeds this "
                           f"model's maximum context length of {served.max_model_len}", param="max_tokens",
                           code="context_length_exceeded")
        seed = None if req.seed is None else req.seed + index
        return SamplingParams(temperature=1.0 if req.temperature is None else float(req.temperature),
                              top_p=1.0 if req.top_p is None else float(req.top_p),
                              top_k=max(req.top_k or 0, 0), max_tokens=max_tokens, seed=seed,
                              stop=tuple(req.stop or ()), ignore_eos=req.ignore_eos)

    def encode_text(text: str, param: str) -> list[int]:
        ids = served.tokenizer.encode(text)
        if not ids:
            raise APIError(400, f"{param} is empty", param=param, code="invalid_value")
        return ids

    def completion_prompts(req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            return [encode_text(p, "prompt")]
        if not p:
            raise APIError(400, "prompt is empty", param="prompt", code="invalid_value")
        if isinstance(p[0], int):
            prompts = [list(p)]
        elif isinstance(p[0], str):
            prompts = [encode_text(s, f"prompt.{i}") for i, s in enumerate(p)]
        else:
            prompts = [list(ids) for ids in p]
        for i, ids in enumerate(prompts):
            if not ids:
                raise APIError(400, f"prompt {i} is empty", param="prompt", code="invalid_value")
            bad = [t for t in ids if not 0 <= t < served.vocab_size]
            if bad:
                raise APIError(400, f"prompt token ids must be in [0, {served.vocab_size}), got {bad[:3]}",
                               param="prompt", code="invalid_value")
        if len(prompts) * req.n > 64:
            raise APIError(400, f"{len(prompts)} prompts x n={req.n} choices is more than 64", param="n")
        return prompts

    def chat_prompt(req: ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        if not any(m["content"] for m in messages):
            raise APIError(400, "messages have no content", param="messages", code="invalid_value")
        try:
            text = served.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - the template rejected the conversation
            raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages") from None
        return encode_text(text, "messages")

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await _parse(request, CompletionRequest)
        check_model(req.model)
        prompts = completion_prompts(req)
        params = [[sampling(req, len(ids), DEFAULT_COMPLETION_MAX_TOKENS, i) for i in range(req.n)] for ids in prompts]
        return await run(request, req, prompts, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await _parse(request, ChatCompletionRequest)
        check_model(req.model)
        ids = chat_prompt(req)
        params = [[sampling(req, len(ids), None, i) for i in range(req.n)]]
        return await run(request, req, [ids], params, chat=True)

    async def run(request: Request, req, prompts: list[list[int]], params: list[list[SamplingParams]], chat: bool):
        shared: asyncio.Queue = asyncio.Queue()
        handles: list[RequestHandle] = []
        for ids, plist in zip(prompts, params):
            for p in plist:
                handle = engine.submit(ids, p)
                handle.deltas = shared
                handles.append(handle)
        reply = _Reply(served.name, chat, handles, [len(ids) for ids in prompts for _ in range(req.n)])
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(reply.stream(engine, shared, include_usage), media_type="text/event-stream")
        try:
            await reply.collect(request, shared)
        except _ClientGone:
            return Response(status_code=499)  # nobody reads it; the requests are aborted below
        finally:
            for h in handles:
                engine.abort(h)
        return reply.body()

    return app


class _ClientGone(Exception):
    pass


class _Reply:
    """The choices of one HTTP request as their deltas arrive."""

    def __init__(self, model: str, chat: bool, handles: list[RequestHandle], prompt_lens: list[int]):
        self.model, self.chat, self.handles = model, chat, handles
        self.index = {id(h): i for i, h in enumerate(handles)}
        self.texts = [""] * len(handles)
        self.tokens = [0] * len(handles)
        self.reasons: list[str | None] = [None] * len(handles)
        self.prompt_lens = prompt_lens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _take(self, handle: RequestHandle, item) -> tuple[int, str, str | None]:
        """Record one queue item; returns (choice, new text, finish reason or None)."""
        i = self.index[id(handle)]
        if item is None:
            raise APIError(503, "the engine stopped", kind="internal_error")
        if isinstance(item, Exception):
            raise APIError(400, str(item), code="invalid_value")
        if item.finish_reason == "error":
            engine_fault = (item.error or "").startswith("engine error")
            raise APIError(500 if engine_fault else 400, item.error or "request failed",
                           kind="internal_error" if engine_fault else "invalid_request_error")
        self.texts[i] += item.new_text
        self.tokens[i] = item.num_output_tokens
        reason = None
        if item.finished:
            reason = self.reasons[i] = "length" if item.finish_reason == "length" else "stop"
        return i, item.new_text, reason

    def usage(self) -> dict:
        # Each prompt counts once whatever n (OpenAI's convention); its n handles share its ids.
        prompts = {id(h.prompt_ids): n for h, n in zip(self.handles, self.prompt_lens)}
        prompt, completion = sum(prompts.values()), sum(self.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def collect(self, request: Request, queue: asyncio.Queue) -> None:
        remaining = len(self.handles)
        while remaining:
            try:
                handle, item = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise _ClientGone() from None
                continue
            _, _, reason = self._take(handle, item)
            remaining -= reason is not None

    def body(self) -> dict:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": r} for i, (t, r) in enumerate(zip(self.texts, self.reasons))]
            kind = "chat.completion"
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(self.texts, self.reasons))]
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                "usage": self.usage()}

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def _choice(self, i: int, text: str, reason: str | None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"index": i, "text": text, "logprobs": None, "finish_reason": reason}

    async def stream(self, engine: EngineThread, queue: asyncio.Queue, include_usage: bool):
        try:
            if self.chat:
                yield self._chunk([self._choice(i, "", None, first=True) for i in range(len(self.handles))])
            remaining = len(self.handles)
            while remaining:
                handle, item = await queue.get()
                try:
                    i, text, reason = self._take(handle, item)
                except APIError as exc:
                    yield f"data: {json.dumps(exc.body())}\n\n"
                    break
                remaining -= reason is not None
                if text or reason:
                    yield self._chunk([self._choice(i, text, reason)])
            else:
                if include_usage:
                    yield self._chunk([], self.usage())
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away and the stream was closed early
            for h in self.handles:
                engine.abort(h)
