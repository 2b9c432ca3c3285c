"""Per-request state: tokens, KV blocks, text, stop checks and statistics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from eaglespec.config import SamplingParams


@dataclass(slots=True)
class Output:
    """What ``LLM.generate`` returns for one prompt."""

    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or stop string), "length", or "error"
    stats: dict
    error: str | None = None


@dataclass(slots=True, eq=False)  # identity comparison: the scheduler's lists hold requests
class Request:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    detokenizer: object | None = None  # IncrementalDetokenizer, or None when no tokenizer
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    blocks: list[int] = field(default_factory=list)  # target KV blocks
    num_cached: int = 0  # tokens whose K/V are in the target cache
    finish_reason: str | None = None
    error: str | None = None
    prefill_forwards: int = 0  # target forwards that prefilled this request (more than 1 after preemption)
    decode_forwards: int = 0  # plain decode or speculative steps whose tokens this request took
    prefill_tokens: int = 0  # output tokens sampled by prefill forwards
    accepted_per_depth: list[int] = field(default_factory=list)  # drafts accepted at depth d
    proposed_per_depth: list[int] = field(default_factory=list)  # steps that proposed depth d
    steps_by_choice: dict[str, int] = field(default_factory=dict)  # decoding steps per tree (or "plain")
    started: float = field(default_factory=time.perf_counter)  # when the request was added
    scheduled_at: float | None = None  # when its first prefill was scheduled
    first_token_at: float | None = None
    finished_at: float | None = None
    failures: int = 0  # engine steps that raised while this request was in the batch
    reported_tokens: int = 0  # output tokens already handed out in deltas
    reported_chars: int = 0  # characters of ``text`` already handed out in deltas

    @property
    def seed_int64(self) -> int:
        """The seed as the signed 64-bit value the device-side hash reads."""
        s = self.seed & ((1 << 64) - 1)
        return s - (1 << 64) if s >= 1 << 63 else s

    @property
    def target_forwards(self) -> int:
        return self.prefill_forwards + self.decode_forwards

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        """len(all_ids), without building it (the scheduler asks every row, every step)."""
        return len(self.prompt_ids) + len(self.output_ids)

    def token_at(self, i: int) -> int:
        """all_ids[i], without building it."""
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def record_step(self, tokens: list[int], eos_ids: tuple[int, ...], prefill: bool) -> None:
        """Take the tokens of one target forward (a prefill, or a decode / speculative step) and
        count that forward. A step that ran after the request had stopped (the overlapped
        decode step queued before the stop was seen) is not its work and is not counted."""
        if self.finished:
            return
        before = len(self.output_ids)
        self.append_tokens(tokens, eos_ids)
        if prefill:
            self.prefill_forwards += 1
            self.prefill_tokens += len(self.output_ids) - before
        else:
            self.decode_forwards += 1

    def append_tokens(self, tokens: list[int], eos_ids: tuple[int, ...]) -> None:
        """Add sampled tokens in order, stopping at EOS, max_tokens or a stop string."""
        for tok in tokens:
            if self.finished:
                return
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            is_eos = tok in eos_ids and not self.params.ignore_eos
            self.output_ids.append(tok)
            if is_eos:
                self.finish("stop")
                return
            if self.detokenizer is not None:
                piece = self.detokenizer.add(tok)
                self.text += piece
                if self._hit_stop_string(len(piece)):
                    return
            if len(self.output_ids) >= self.params.max_tokens:
                self.finish("length")

    def _hit_stop_string(self, new_chars: int) -> bool:
        for stop in self.params.stop:
            start = max(0, len(self.text) - new_chars - len(stop))
            idx = self.text.find(stop, start)
            if idx >= 0:
                self.text = self.text[:idx]
                self.finish("stop")
                return True
        return False

    def text_safe_to_show(self) -> int:
        """How much of ``text`` can be streamed now: all of it once finished, else all but
        the tail that could still turn out to be the start of a stop string."""
        if self.finished or not self.params.stop:
            return len(self.text)
        return max(len(self.text) - max(len(s) for s in self.params.stop) + 1, self.reported_chars)

    def fail(self, message: str) -> None:
        self.error = message
        self.finish("error")

    def finish(self, reason: str) -> None:
        """End the request (stop, length or error) and stamp the time."""
        self.finish_reason = reason
        self.finished_at = time.perf_counter()

    def stats(self) -> dict:
        """Prefill and decoding reported apart: tau, ms_per_token and tokens_per_s cover the
        decoding forwards only (plain decoding has tau exactly 1), ttft_ms runs from the request's
        arrival to its first token, prefill_ms from its first scheduled prefill to that token."""
        new = len(self.output_ids)
        decode_tokens = new - self.prefill_tokens
        now = time.perf_counter()
        first = self.first_token_at
        decode_s = ((self.finished_at or now) - first) if first is not None else 0.0
        rates = [a / p if p else 0.0 for a, p in zip(self.accepted_per_depth, self.proposed_per_depth)]
        return {
            "tau": decode_tokens / self.decode_forwards if self.decode_forwards else 0.0,
            "accept_rate_per_depth": rates,
            "target_forwards": self.target_forwards,
            "new_tokens": new,
            "ms_per_token": 1000.0 * decode_s / decode_tokens if decode_tokens else 0.0,
            "prompt_tokens": len(self.prompt_ids),
            "ttft_ms": 1000.0 * (first - self.started) if first is not None else 0.0,
            "prefill_ms": 1000.0 * (first - self.scheduled_at) if first is not None and self.scheduled_at else 0.0,
            "decode_ms": 1000.0 * decode_s,
            "prefill_forwards": self.prefill_forwards,
            "decode_forwards": self.decode_forwards,
            "decode_tokens": decode_tokens,
            "tokens_per_s": decode_tokens / decode_s if decode_tokens and decode_s > 0 else 0.0,
            "speculation": dict(self.steps_by_choice),  # which tree (or plain) ran each decoding step
            # Draft counts: every speculative step proposes depth 0, and a step that accepts n
            # drafts counts one at each of depths 0 .. n-1. ``pooled_speculation`` reads them.
            "accepted_per_depth": list(self.accepted_per_depth),
            "proposed_per_depth": list(self.proposed_per_depth),
        }

    def to_output(self) -> Output:
        return Output(self.request_id, list(self.prompt_ids), list(self.output_ids), self.text,
                      self.finish_reason or "length", self.stats(), self.error)


def pooled_speculation(stats: list[dict]) -> dict:
    """A draft head's figures over several requests' ``stats()``: tau = tokens per speculative
    step (accepted drafts + the target's token), acceptance per depth (accepted over proposed
    drafts at that depth) and the speculative steps. Unlike each request's ``tau``, no plain
    forward counts: neither plain steps of ``tree="auto"`` nor the plain token a running request
    decodes beside another's prefill (design note 63)."""
    accepted: list[int] = []
    proposed: list[int] = []
    for s in stats:
        for total, counts in ((accepted, s["accepted_per_depth"]), (proposed, s["proposed_per_depth"])):
            total += [0] * (len(counts) - len(total))
            for d, c in enumerate(counts):
                total[d] += c
    steps = proposed[0] if proposed else 0
    return {"tau": (steps + sum(accepted)) / steps if steps else 0.0,
            "accept_rate_per_depth": [a / p if p else 0.0 for a, p in zip(accepted, proposed)],
            "speculative_steps": steps}
