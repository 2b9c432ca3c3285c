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
    target_forwards: int = 0
    accepted_per_depth: list[int] = field(default_factory=list)  # drafts accepted at depth d
    proposed_per_depth: list[int] = field(default_factory=list)  # steps that proposed depth d
    started: float = field(default_factory=time.perf_counter)
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
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

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
        new = len(self.output_ids)
        elapsed = (self.finished_at or time.perf_counter()) - self.started
        rates = [a / p if p else 0.0 for a, p in zip(self.accepted_per_depth, self.proposed_per_depth)]
        return {
            "tau": new / self.target_forwards if self.target_forwards else 0.0,
            "accept_rate_per_depth": rates,
            "target_forwards": self.target_forwards,
            "new_tokens": new,
            "ms_per_token": 1000.0 * elapsed / new if new else 0.0,
        }

    def to_output(self) -> Output:
        return Output(self.request_id, list(self.prompt_ids), list(self.output_ids), self.text,
                      self.finish_reason or "length", self.stats(), self.error)
