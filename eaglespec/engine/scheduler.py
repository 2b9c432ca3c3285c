"""Continuous batching: admission by KV blocks, chunked prefill, preemption on a full pool.

Invariant for every running request that is *ready* (fully prefilled): all of its tokens but
the last are in the KV cache (``num_cached == len(all_ids) - 1`` between steps); one forward
over the uncached tokens yields the next token. A request whose prompt is longer than one
step's prefill budget is prefilled in chunks; it runs (holds blocks) but is not ready until its
last chunk. A preempted request loses its blocks and is prefilled again later (prompt and
output so far), which yields exactly the token a decode step would have.

Prefill never stalls the streams already running: the ready requests decode their next token
inside the prefill step's forward (a mixed step: each is a one-token "prefill"). Under
speculation (``alternate``) a speculative step also follows every prefill step while requests
are ready: it yields several tokens a request where a mixed step yields one, so while
admissions last the running requests still get a speculative step in every two steps.

The context limit: a sequence holds at most ``max_model_len`` tokens. A step writes up to
``lookahead`` cache positions from its last cached token (a speculative tree's accepted path),
so near the limit a step may compute positions past it: those tokens are dropped and the
request finishes with "length". Blocks therefore cover ``max_model_len - 1 + lookahead``
positions (``ModelRunner.max_blocks_per_seq``).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from eaglespec.engine.request import Request
from eaglespec.kv_cache import BlockAllocator


@dataclass(slots=True)
class ScheduledStep:
    kind: str  # "prefill" or "decode"
    requests: list[Request]
    # prefill only: the position each request's prefill stops at this step (len(all_ids) when
    # it completes the prompt; less for a chunk of a long prompt, which then samples nothing)
    prefill_ends: list[int] = field(default_factory=list)


def is_ready(req: Request) -> bool:
    """Whether a running request is fully prefilled (its next step is a decode step)."""
    return req.num_cached >= req.num_tokens - 1 and req.num_cached > 0


class Scheduler:
    def __init__(self, allocator: BlockAllocator, max_batch: int, max_model_len: int,
                 prefill_token_budget: int, lookahead: int = 1, alternate: bool = False):
        self.allocator = allocator
        self.max_batch = max_batch
        self.max_model_len = max_model_len
        self.prefill_token_budget = prefill_token_budget
        self.lookahead = lookahead  # cache slots a decode step may write past num_cached
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.alternate = alternate  # a decode step after every prefill step while requests are ready
        self._last_kind = "decode"

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
        # The draft head's cache uses the same block ids (see speculative/step.py).
        self.allocator.release(req.blocks)

    def schedule(self) -> ScheduledStep | None:
        """Pick the next step: a prefill step (chunks of running requests, then waiting
        requests admitted by free KV blocks, mixed with the ready requests' decoding) or a
        decode step of the ready requests (after every prefill step when ``alternate``)."""
        ready = [r for r in self.running if is_ready(r)]
        if not (self.alternate and ready and self._last_kind == "prefill"):
            step = self.schedule_prefill()
            if step is not None:
                self._last_kind = "prefill"
                return step
        self._last_kind = "decode"
        if not self.running:
            if self.waiting:  # nothing runs and the head cannot fit: the pool is too small for it
                req = self.waiting.popleft()
                req.fail("KV pool exhausted: the request does not fit in the free KV blocks")
                return ScheduledStep("decode", [])
            return None
        # Make room for this step's writes, preempting the newest requests if the pool is full.
        # A preempted request is no longer ready (nothing cached): a cheap test where `in
        # self.running` would scan the batch for every row.
        batch: list[Request] = []
        for req in ready:
            if not is_ready(req):
                continue  # preempted for an older request this step
            need = req.num_cached + self.lookahead
            while not self._fits(req, need):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    break
            if is_ready(req):
                self._grow(req, need)
                batch.append(req)
        return ScheduledStep("decode", batch)

    def schedule_prefill(self, mixed: bool = True) -> ScheduledStep | None:
        """A prefill step, or None when nothing is left to prefill or admit. ``mixed``: the
        ready requests decode in it too (the engine's steps); False serves a benchmark that
        prefills every row before it times a step."""
        step = self._prefill_work()
        if step is None or not mixed or any(r.failures for r in step.requests):
            return step
        # Mixed: the ready requests that have room take their next token in the same forward.
        decodes, ends = [], []
        prefilling = {id(r) for r in step.requests}
        for req in self.running:
            if is_ready(req) and id(req) not in prefilling and self._fits(req, req.num_cached + self.lookahead):
                self._grow(req, req.num_cached + self.lookahead)
                decodes.append(req)
                ends.append(req.num_tokens)
        return ScheduledStep("prefill", decodes + step.requests, ends + step.prefill_ends)

    def _prefill_work(self) -> ScheduledStep | None:
        budget = self.prefill_token_budget
        reqs, ends = [], []
        # Requests part-way through a chunked prefill go first (their blocks are already held).
        for req in self.running:
            if budget <= 0:
                break
            if is_ready(req):
                continue
            end = self._chunk_end(req, budget)
            if end > req.num_cached:
                reqs.append(req)
                ends.append(end)
                budget -= end - req.num_cached
        while budget > 0 and self.waiting and len(self.running) < self.max_batch:
            req = self.waiting[0]
            total = req.num_tokens
            if req.failures and reqs:
                break  # a request that was in a failing step runs alone
            # Blocks for the whole sequence plus a step's writes are taken at admission, so a
            # request admitted always gets to finish its prefill.
            end = self._chunk_end(req, budget)
            if not self._fits(req, total + self.lookahead) or end == req.num_cached:
                break
            self.waiting.popleft()
            self._grow(req, total + self.lookahead)
            if req.scheduled_at is None:
                req.scheduled_at = time.perf_counter()
            self.running.append(req)
            reqs.append(req)
            ends.append(end)
            budget -= end - req.num_cached
            if req.failures:
                break
        return ScheduledStep("prefill", reqs, ends) if reqs else None

    @staticmethod
    def _chunk_end(req: Request, budget: int) -> int:
        """Where this step's prefill of ``req`` stops: the end of its tokens, or as far as the
        budget goes, but never one token short of the end (then two short; or nowhere, which
        leaves the request to the next step). A request with only its last token uncached is
        ready, so that token would go to a decode step; under speculation the head would start
        it with no pending pair of its own (a chunk caches every pair it knows the next token
        of) and write a stale slot's pairs into its cache."""
        end = min(req.num_tokens, req.num_cached + budget)
        return end - 1 if end == req.num_tokens - 1 else end

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.release(req)
        req.num_cached = 0
        self.waiting.appendleft(req)

    def preempt(self, req: Request) -> None:
        """Give back a running request's blocks and queue it to be prefilled again (recompute)."""
        if req in self.running:
            self._preempt(req)

    def remove(self, req: Request) -> None:
        """Take a request out (finished or aborted) and free its blocks at once."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.release(req)

    def retire(self, req: Request) -> None:
        """Remove a finished request and free its blocks."""
        self.remove(req)
