"""Continuous batching: admission by KV blocks, prefill before decode, preemption on a full pool.

Invariant for every running request: all of its tokens but the last are in the KV cache
(``num_cached == len(all_ids) - 1`` between steps); one forward over the uncached tokens yields
the next token. A preempted request loses its blocks and is prefilled again later (prompt and
output so far), which yields exactly the token a decode step would have.

The context limit: a sequence holds at most ``max_model_len`` tokens. A step writes up to
``lookahead`` cache positions from its last cached token (a speculative tree's accepted path),
so near the limit a step may compute positions past it: those tokens are dropped and the
request finishes with "length". Blocks therefore cover ``max_model_len - 1 + lookahead``
positions (``ModelRunner.max_blocks_per_seq``).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from eaglespec.engine.request import Request
from eaglespec.kv_cache import BlockAllocator


@dataclass(slots=True)
class ScheduledStep:
    kind: str  # "prefill" or "decode"
    requests: list[Request]


class Scheduler:
    def __init__(self, allocator: BlockAllocator, max_batch: int, max_model_len: int,
                 prefill_token_budget: int, lookahead: int = 1):
        self.allocator = allocator
        self.max_batch = max_batch
        self.max_model_len = max_model_len
        self.prefill_token_budget = prefill_token_budget
        self.lookahead = lookahead  # cache slots a decode step may write past num_cached
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        """Queue a request; one whose prompt fills the context ends at once with "length" (no
        tokens); one that can never run fails with a message. A prompt longer than
        ``max_model_len`` is the caller's mistake: ValueError (see ``check_prompt``)."""
        self.check_prompt(len(req.prompt_ids))
        need = len(req.prompt_ids) + self.lookahead
        if not req.prompt_ids:
            req.fail("empty prompt: give at least one token")
        elif len(req.prompt_ids) == self.max_model_len:
            req.finish("length")
        elif self.allocator.blocks_needed(need) > self.allocator.num_blocks - 1:
            req.fail(f"prompt of {len(req.prompt_ids)} tokens needs more KV blocks than the whole pool "
                     f"({self.allocator.num_blocks - 1} blocks of {self.allocator.block_size})")
        else:
            self.waiting.append(req)

    def check_prompt(self, num_tokens: int) -> None:
        """Raise ValueError for a prompt longer than the context limit."""
        if num_tokens > self.max_model_len:
            raise ValueError(f"prompt of {num_tokens} tokens is longer than max_model_len {self.max_model_len} "
                             f"(the most tokens a sequence may hold, prompt and output together)")

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _fits(self, req: Request, num_tokens: int) -> bool:
        return self.allocator.can_hold(req.blocks, num_tokens)

    def _grow(self, req: Request, num_tokens: int) -> None:
        self.allocator.grow(req.blocks, num_tokens)

    def release(self, req: Request) -> None:
        # The draft head's cache uses the same block ids (see engine/speculative.py).
        self.allocator.release(req.blocks)

    def schedule(self) -> ScheduledStep | None:
        """Pick the next step: admit waiting requests first (prefill), else decode the running ones."""
        admitted, budget = [], self.prefill_token_budget
        while self.waiting and len(self.running) + len(admitted) < self.max_batch:
            req = self.waiting[0]
            total = len(req.all_ids)
            uncached = total - req.num_cached
            if admitted and uncached > budget:
                break
            if not self._fits(req, total + self.lookahead):
                break
            self.waiting.popleft()
            self._grow(req, total + self.lookahead)
            if req.scheduled_at is None:
                req.scheduled_at = time.perf_counter()
            admitted.append(req)
            budget -= uncached
        if admitted:
            self.running += admitted
            return ScheduledStep("prefill", admitted)
        if not self.running:
            if self.waiting:  # nothing runs and the head cannot fit: the pool is too small for it
                req = self.waiting.popleft()
                req.fail("KV pool exhausted: the request does not fit in the free KV blocks")
                return ScheduledStep("decode", [])
            return None
        # Make room for this step's writes, preempting the newest requests if the pool is full.
        ready: list[Request] = []
        for req in list(self.running):
            if req not in self.running:
                continue  # preempted for an older request this step
            need = req.num_cached + self.lookahead
            while not self._fits(req, need):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    break
            if req in self.running:
                self._grow(req, need)
                ready.append(req)
        return ScheduledStep("decode", ready)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.release(req)
        req.num_cached = 0
        self.waiting.appendleft(req)

    def retire(self, req: Request) -> None:
        """Remove a finished request and free its blocks."""
        if req in self.running:
            self.running.remove(req)
        self.release(req)
