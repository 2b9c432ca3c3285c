"""The engine loop in a background thread, and the handles requests wait on from asyncio.

The thread owns the ``EngineCore`` (which is not thread-safe): request handlers send it
``add`` / ``abort`` commands through a queue, and it hands each request's deltas back to the
handler's event loop. Metrics are updated here, where every delta passes.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from eaglespec.config import SamplingParams
from eaglespec.engine.core import EngineCore, RequestDelta
from eaglespec.serve.metrics import ServerMetrics

log = logging.getLogger(__name__)


@dataclass(eq=False)
class RequestHandle:
    """One engine request as the HTTP side sees it: ``(handle, delta)`` pairs arrive on ``deltas``
    (several handles may share one queue); an exception or None (engine stopped) ends it."""

    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    deltas: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.perf_counter)
    request_id: int | None = None  # set by the engine thread
    first_token_at: float | None = None
    finished: bool = False


class EngineThread:
    def __init__(self, core: EngineCore, metrics: ServerMetrics, idle_wait_s: float = 0.05):
        self.core = core
        self.metrics = metrics
        self.idle_wait_s = idle_wait_s
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._handles: dict[int, RequestHandle] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="eaglespec-engine", daemon=True)
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ asyncio side

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._commands.put(("wake", None))
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestHandle:
        handle = RequestHandle(prompt_ids, params, asyncio.get_running_loop())
        self._commands.put(("add", handle))
        return handle

    def abort(self, handle: RequestHandle) -> None:
        if not handle.finished:
            self._commands.put(("abort", handle))

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._take_commands(block=not self.core.has_work)
                seconds = None
                if self.core.has_work:
                    started = time.perf_counter()
                    deltas = self.core.step()
                    seconds = time.perf_counter() - started
                    self._dispatch(deltas)
                self.metrics.observe_engine(self.core, seconds)
        except BaseException as exc:  # the loop itself broke: /health reports it
            log.exception("engine thread stopped")
            self.error = exc
            for handle in list(self._handles.values()):
                self._send(handle, None)

    def _take_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=self.idle_wait_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, handle = cmd
            if kind == "add":
                try:
                    handle.request_id = self.core.add_request(handle.prompt_ids, handle.params)
                    self._handles[handle.request_id] = handle
                except Exception as exc:  # noqa: BLE001 - a bad request fails alone
                    handle.finished = True
                    self._send(handle, exc)
            elif kind == "abort" and handle.request_id is not None:
                self.core.abort(handle.request_id)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _dispatch(self, deltas: list[RequestDelta]) -> None:
        now = time.perf_counter()
        # One wake-up of the event loop per step, not one per request: at 64 streams the
        # per-call self-pipe write and GIL hand-over dominated the step.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, RequestDelta]]] = {}
        for delta in deltas:
            handle = self._handles.get(delta.request_id)
            if handle is None:
                continue
            if delta.new_token_ids and handle.first_token_at is None:
                handle.first_token_at = now
                self.metrics.ttft.observe(now - handle.arrival)
            self.metrics.generation_tokens.inc(len(delta.new_token_ids))
            if delta.finished:
                del self._handles[delta.request_id]
                handle.finished = True
                self.metrics.observe_finished(delta, handle, now)
            by_loop.setdefault(handle.loop, []).append((handle, delta))
        for loop, items in by_loop.items():
            self._post(loop, items)

    @staticmethod
    def _deliver(items: list[tuple[RequestHandle, object]]) -> None:
        for handle, item in items:
            handle.deltas.put_nowait((handle, item))

    def _send(self, handle: RequestHandle, item) -> None:
        self._post(handle.loop, [(handle, item)])

    def _post(self, loop: asyncio.AbstractEventLoop, items: list) -> None:
        try:
            loop.call_soon_threadsafe(self._deliver, items)
        except RuntimeError:  # the handlers' loop is gone (server shutting down)
            pass
