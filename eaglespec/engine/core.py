"""``EngineCore``: requests in, per-step deltas out; the one engine every front end drives.

``add_request`` queues a request (it may arrive at any time, while others run), ``abort``
ends one at once and frees its KV blocks, ``step`` runs one engine step (a prefill chunk, a
plain decode step or a speculative step) and returns what each touched request gained. The
synchronous ``LLM``, the CLI and the HTTP server are front ends over it. Not thread-safe: one
thread owns a core (the server's engine thread hands it requests through a queue).
"""

from __future__ import annotations

import itertools
import logging
import numbers
import random
import time
from dataclasses import dataclass, field

import torch

from eaglespec.config import EngineConfig, SamplingParams, SpecConfig
from eaglespec.engine.request import Request
from eaglespec.engine.runner import DecodeFlight, ModelRunner
from eaglespec.engine.scheduler import Scheduler, ScheduledStep, is_ready
from eaglespec.engine.step_control import SINGLE_PROCESS, Abort, AddRequest, StepControl, StepShared, step_fingerprint
from eaglespec.models.eagle import EagleHead
from eaglespec.models.llama import LlamaForCausalLM
from eaglespec.speculative.policy import PLAIN
from eaglespec.speculative.step import SpecFlight, SpeculativeRunner
from eaglespec.speculative.tree import parse_tree

log = logging.getLogger(__name__)

MAX_STEP_FAILURES = 2  # a request in this many failing steps fails (alone, see _recover)


@dataclass(slots=True)
class RequestDelta:
    """What one request gained in one engine step."""

    request_id: int
    new_token_ids: list[int]
    new_text: str  # text safe to show (a possible stop string's start is held back)
    finish_reason: str | None  # None while running; "stop", "length", "abort" or "error"
    num_prompt_tokens: int
    num_output_tokens: int  # all output tokens so far
    stats: dict  # when finished, Request.stats(): tau, accept_rate_per_depth, ...; {} while running (host time)
    error: str | None = None
    accepted_per_depth: list[int] = field(default_factory=list)  # counts so far (rates are in stats)
    proposed_per_depth: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class _Observation:
    """A decoding step the policy has not been told about yet (it is, first thing next step,
    with the wall time rank 0 measured: see step_control.py)."""

    choice: str
    reqs: list[Request]
    seconds: float  # this rank's own measurement
    tokens_per_sequence: float
    steady: bool


class EngineCore:
    """Continuous batching over a target (and an optional draft head) on one device."""

    def __init__(self, target: LlamaForCausalLM, tokenizer, eos_ids: tuple[int, ...], head: EagleHead | None,
                 spec: SpecConfig | None, engine: EngineConfig, device: torch.device, no_tokenizer_reason: str = "",
                 control: StepControl = SINGLE_PROCESS):
        """control: what this rank takes from rank 0 under tensor parallelism (step_control.py);
        the default is the single-process engine's."""
        self.model = target
        self.control = control
        self.tokenizer = tokenizer
        self.no_tokenizer_reason = no_tokenizer_reason or "no tokenizer was given"  # said when text comes
        self.eos_ids = tuple(eos_ids)
        self.config = engine
        self.device = device
        lookahead = max(parse_tree(t).depth for t in spec.trees) + 1 if head is not None else 1
        self.runner = ModelRunner(target, engine, device, lookahead, pool_size=control.min_over_ranks)
        self.speculative = SpeculativeRunner(self.runner, head, spec) if head is not None else None
        if self.speculative is not None:
            self.speculative.calibrate(share=control.leader_value)
        self.runner.warm_prefill_graphs(None if self.speculative is None else self.speculative.prefill_program)
        self.spec_config = spec if head is not None else None
        self.scheduler = Scheduler(self.runner.allocator, engine.max_batch_size, engine.max_model_len,
                                   engine.prefill_token_budget, lookahead=lookahead,
                                   alternate=self.speculative is not None)
        self._ids = itertools.count()
        self.requests: dict[int, Request] = {}  # live requests (finished ones leave after their last delta)
        self._in_flight: DecodeFlight | SpecFlight | None = None  # a step queued but not read yet
        self._touched: list[Request] = []  # finished outside a step (failed at admission, aborted)
        self.last_step_kind = ""  # "prefill", "mixed", "decode", "speculative" (for metrics)
        self.last_step_size = 0  # requests in the last step (for metrics: how many really ran at once)
        self.last_choice = ""  # the tree (or "plain") the last decoding step ran (for metrics)
        # The choice made for the step after an overlapped one, with its (bucket) key.
        self._planned: tuple[int, bool, str] | None = None
        self._unobserved: _Observation | None = None  # the last decoding step, for the policy
        self.last_fingerprint: int | None = None  # of the last step, when the control checks steps

    # ------------------------------------------------------------------ requests

    def encode(self, prompt: str | list[int], what: str = "prompt") -> list[int]:
        """Token ids of a prompt given as text or ids (ids are checked against the vocabulary).
        Anything else raises TypeError / ValueError naming ``what`` and what was expected."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{what} is text but this model has no tokenizer ({self.no_tokenizer_reason}): "
                                 f"give it as a list of token ids")
            ids = self.tokenizer.encode(prompt)
            if not ids:
                raise ValueError(f"{what} is empty: it must hold at least one token")
            return ids
        if isinstance(prompt, torch.Tensor) and prompt.dim() == 1 and not prompt.dtype.is_floating_point:
            prompt = prompt.tolist()
        if isinstance(prompt, (bytes, bytearray)):
            raise TypeError(f"{what} is {type(prompt).__name__}: decode it to str, or give a list of token ids")
        if not isinstance(prompt, (list, tuple)):
            raise TypeError(f"{what} must be a string or a list of int token ids, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError(f"{what} is empty: it must hold at least one token")
        vocab = self.model.config.vocab_size
        for i, t in enumerate(prompt):
            if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                raise TypeError(f"{what}: token ids must be ints, got {t!r} ({type(t).__name__}) at position {i}")
            if not 0 <= t < vocab:
                raise ValueError(f"{what}: token id {t} at position {i} is out of range [0, {vocab})")
        return [int(t) for t in prompt]

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, what: str = "prompt") -> int:
        """Queue a request; it joins the running batch as soon as KV blocks allow. A request
        that can never run (empty, longer than the context) finishes with an error delta."""
        if params is not None and not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams or None, got {type(params).__name__}")
        params = params or SamplingParams()
        ids = self.encode(prompt, what)
        self.scheduler.check_prompt(len(ids))
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        request_id = self.add_encoded(ids, params, seed)
        self.control.record(AddRequest(ids, params, seed, request_id))
        return request_id

    def add_encoded(self, ids: list[int], params: SamplingParams, seed: int) -> int:
        """Queue a request of checked token ids with its resolved seed (``add_request``'s second
        half; the other ranks of a tensor-parallel engine replay rank 0's requests through it)."""
        from eaglespec.tokenizer import IncrementalDetokenizer

        req = Request(next(self._ids), ids, params, seed,
                      IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None and params.detokenize
                      else None)
        self.requests[req.request_id] = req
        self.scheduler.add(req)
        if req.finished:
            self._touched.append(req)
        return req.request_id

    def abort(self, request_id: int) -> bool:
        """End a request now and free its KV blocks (its last delta comes with the next step).
        False when it is unknown or already finished."""
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return False
        req.finish("abort")
        self._retire(req)
        self._touched.append(req)
        self.control.record(Abort(request_id))
        return True

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._in_flight is not None or bool(self._touched)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def kv_blocks_in_use(self) -> int:
        a = self.runner.allocator
        return a.num_blocks - 1 - a.num_free

    # ------------------------------------------------------------------ the step

    def step(self) -> list[RequestDelta]:
        """Run one engine step; return a delta for every request that gained tokens or ended."""
        self._observe_last_step()
        self.last_fingerprint = None  # until this step completes (an interrupted one is not compared)
        try:
            reqs = self._run_step()
        except Exception as exc:  # noqa: BLE001 - a failing step must not take the engine down
            reqs = self._recover(exc)
        touched, self._touched = self._touched, []
        seen: set[int] = set()
        deltas = []
        for req in touched + reqs:
            if req.request_id in seen:
                continue
            seen.add(req.request_id)
            delta = self._delta(req)
            if delta is not None:
                deltas.append(delta)
        if self.control.checks_steps:
            self.last_fingerprint = step_fingerprint(self.last_step_kind, self.last_choice, self.kv_blocks_in_use,
                                                     deltas)
        return deltas

    def _observe_last_step(self) -> None:
        """Tell the policy about the last decoding step. Its wall time is rank 0's under tensor
        parallelism (the one message of the step brings it, with the commands), so every rank's
        policy holds the same numbers and makes the same choices."""
        last, self._unobserved = self._unobserved, None
        shared = self.control.begin_step(StepShared(last.seconds if last is not None else None,
                                                    self.last_fingerprint))
        if last is not None:
            self.speculative.observe(last.choice, last.reqs, shared.seconds, last.tokens_per_sequence, last.steady)

    def full_logits(self, token_ids: list[int]) -> torch.Tensor:
        """The target's [T, vocab] logits of a whole sequence (every rank runs the forward)."""
        self.control.before_logits(token_ids)
        return self.runner.full_logits(token_ids)

    def _delta(self, req: Request) -> RequestDelta | None:
        tokens = req.output_ids[req.reported_tokens:]
        safe = req.text_safe_to_show()
        text = req.text[req.reported_chars:safe]
        if not tokens and not text and not req.finished:
            return None
        req.reported_tokens = len(req.output_ids)
        req.reported_chars = max(safe, req.reported_chars)
        if req.finished:
            self.requests.pop(req.request_id, None)
        return RequestDelta(req.request_id, tokens, text, req.finish_reason, len(req.prompt_ids),
                            len(req.output_ids), req.stats() if req.finished else {}, req.error,
                            list(req.accepted_per_depth),
                            list(req.proposed_per_depth))

    def _run_step(self) -> list[Request]:
        """Run one step; return the requests that made progress (finished ones included).

        Decoding, plain or speculative, overlaps the host with the device: while a step runs,
        the next one (the same choice) is queued with its inputs taken on the device, and only
        then are the first step's tokens read and checked. That needs the batch to go on
        unchanged (nothing to admit, nothing finished or preempted, no limit reachable by the
        step in flight, KV room); otherwise the step ends without a successor. A request that
        stops while its successor runs wastes that successor's tokens, which are dropped.
        """
        started = time.perf_counter()
        flight, self._in_flight = self._in_flight, None
        followed = flight is not None  # queued behind the previous step (overlapped)
        if flight is None:
            scheduled = self.scheduler.schedule()
            if scheduled is None:
                return []
            reqs = scheduled.requests
            self._current = reqs
            self.last_step_size = len(reqs)
            if scheduled.kind == "prefill" or not reqs:
                prefilling = [not is_ready(r) for r in reqs]  # the others decode in this forward
                emitted = self._prefill(scheduled) if reqs else []
                self.last_step_kind = "prefill" if all(prefilling) else "mixed"
                self._apply(reqs, emitted, prefilling)
                return reqs
            flight = self._launch(reqs, self._choose(reqs))
        self._current = flight.reqs
        choice = flight.tree if isinstance(flight, SpecFlight) else PLAIN
        self.last_step_size = len(flight.reqs)
        overlap = self.config.overlap_decode
        if overlap is None:
            overlap = self.device.type == "cuda"
        # Steady: a step queued behind one of the same choice (what the policy compares). With
        # overlap, a step launched fresh (a switch, a finished request, a limit in reach) also
        # carries scheduling and staging in series with the device, so it is not timed, whatever
        # the choice (timing fresh tree steps but never fresh plain ones made trees look up to 2x
        # slower, design note 43). Without overlap, every step after one of the same choice.
        steady = followed or (not overlap and self.last_choice == choice)
        if (overlap and self._can_follow(flight)
                and self._choose(flight.reqs, plan=True) == choice):
            self._in_flight = self._launch(flight.reqs, choice, follow=flight)
        live = [r for r in flight.reqs if not r.finished]
        if choice == PLAIN:
            self.last_step_kind = "decode"
            emitted = [[t] for t in flight.wait()]  # the one host read of the step
        else:
            self.last_step_kind = "speculative"
            emitted = flight.wait()  # the one host read of the step
            self._count_speculative(flight.reqs, emitted, choice)
        self.last_choice = choice
        for r in flight.reqs:
            if not r.finished:
                r.steps_by_choice[choice] = r.steps_by_choice.get(choice, 0) + 1
        self._apply(flight.reqs, emitted, [False] * len(flight.reqs))
        if self.speculative is not None:
            tokens = [len(row) for row in emitted]
            self._unobserved = _Observation(choice, flight.reqs, time.perf_counter() - started,
                                            sum(tokens) / len(tokens), steady)
        return live

    def _choose(self, reqs: list[Request], plan: bool = False) -> str:
        """Plain decoding or a tree for this batch (always plain without a draft). With ``plan``
        the choice is for the next step and is kept for it: a step is queued behind the running
        one only when the next step makes the same choice."""
        if self.speculative is None:
            return PLAIN
        key = (len(reqs), all(r.params.temperature == 0 for r in reqs))
        planned, self._planned = self._planned, None
        if planned is not None and planned[:2] == key and not plan:
            return planned[2]
        choice = self.speculative.choose(reqs)
        if plan:
            self._planned = (*key, choice)
        return choice

    def _launch(self, reqs: list[Request], choice: str, follow=None) -> DecodeFlight | SpecFlight:
        """Queue a plain decode step or a speculative step of the tree ``choice``."""
        if self.speculative is None:
            return self.runner.launch_decode(reqs, follow)
        if choice == PLAIN:
            return self.speculative.launch_plain(reqs, follow)
        return self.speculative.launch(reqs, choice, follow)

    def _recover(self, exc: Exception) -> list[Request]:
        """A step raised. Its requests are preempted (recomputed later, nothing lost) and
        counted; one that was alone in the failing step, or in too many, fails with the
        message, so a request that breaks the engine fails alone and the others go on."""
        reqs = [r for r in getattr(self, "_current", []) if not r.finished]
        self._current = []
        self._in_flight = None
        log.exception("engine step failed for requests %s", [r.request_id for r in reqs])
        failed = []
        for req in reqs:
            req.failures += 1
            if len(reqs) == 1 or req.failures >= MAX_STEP_FAILURES:
                req.fail(f"engine error: {type(exc).__name__}: {exc}")
                self._retire(req)
                failed.append(req)
            else:
                self._reset(req)
                self.scheduler.preempt(req)
        # Requests outside the step may have had device work queued with it: recompute them too.
        for req in list(self.scheduler.running):
            self._reset(req)
            self.scheduler.preempt(req)
        return failed

    def _reset(self, req: Request) -> None:
        if self.speculative is not None:
            self.speculative.release(req)

    def _retire(self, req: Request) -> None:
        self.scheduler.remove(req)
        if self.speculative is not None:
            self.speculative.release(req)

    def _can_follow(self, flight: DecodeFlight | SpecFlight) -> bool:
        """Whether the next decoding step may be queued before this one's tokens are known: the
        same requests, none finished, nobody waiting for a free row, no limit reachable by the
        tokens in flight, and KV room without preemption (the room is taken here)."""
        reqs = flight.reqs
        # Tokens the step in flight may emit; a plain step counted its one in num_cached at launch,
        # a speculative step's accepted path is counted when it is read.
        emit = self.speculative.programs[flight.tree].shape.depth + 1 if isinstance(flight, SpecFlight) else 1
        unread = emit if isinstance(flight, SpecFlight) else 0
        sched = self.scheduler
        if sched.waiting and len(sched.running) < sched.max_batch:
            return False
        if len(sched.running) != len(reqs) or any(a is not b for a, b in zip(sched.running, reqs)):
            return False
        allocator, new_blocks = self.runner.allocator, 0
        for r in reqs:
            if (r.finished or len(r.output_ids) + emit >= r.params.max_tokens
                    or r.num_tokens + emit >= self.config.max_model_len):
                return False
            new_blocks += max(0, allocator.blocks_needed(r.num_cached + unread + sched.lookahead) - len(r.blocks))
        if new_blocks > allocator.num_free:
            return False
        for r in reqs:
            allocator.grow(r.blocks, r.num_cached + unread + sched.lookahead)
        return True

    def _apply(self, reqs: list[Request], emitted: list[list[int]], prefilling: list[bool]) -> None:
        """Append each request's new tokens (stop checks included) and retire finished ones;
        ``prefilling[i]``: request i's forward was (part of) its prefill, not a decoding step."""
        limit = self.config.max_model_len
        for req, toks, prefill in zip(reqs, emitted, prefilling):
            # A step near the limit may have computed tokens past it (see scheduler.py): dropped.
            req.record_step(toks[:max(limit - req.num_tokens, 0)], self.eos_ids, prefill)
            if not req.finished and req.num_tokens >= limit:
                req.finish("length")
        for req in list(self.scheduler.running):
            if req.finished:
                self._retire(req)

    def _prefill(self, scheduled: ScheduledStep) -> list[list[int]]:
        reqs, ends = scheduled.requests, scheduled.prefill_ends
        complete = [end == r.num_tokens for r, end in zip(reqs, ends)]
        prefill = self.runner.prefill if self.speculative is None else self.speculative.prefill
        tokens, _ = prefill(reqs, ends)
        # A chunk's sampled token is not the next token of the sequence: dropped.
        return [[t] if whole else [] for t, whole in zip(tokens.tolist(), complete)]

    def _count_speculative(self, reqs: list[Request], emitted: list[list[int]], tree: str) -> None:
        """Advance each request past its accepted path and count acceptance per depth; a request
        that had stopped before this step was read (an overlapped successor) is left alone."""
        depth = self.speculative.programs[tree].shape.depth
        for req, row in zip(reqs, emitted):
            if req.finished:
                continue
            n = len(row)
            req.num_cached += n
            if len(req.proposed_per_depth) < self.speculative.depth:
                req.proposed_per_depth += [0] * (self.speculative.depth - len(req.proposed_per_depth))
                req.accepted_per_depth += [0] * (self.speculative.depth - len(req.accepted_per_depth))
            for d in range(depth):
                req.proposed_per_depth[d] += 1
                req.accepted_per_depth[d] += int(n - 1 > d)
