"""Which speculation (a tree, or none) pays for the batch at hand.

Speculation trades one target forward per token for a costlier step that yields several tokens.
Whether that pays depends on the batch size (a big batch leaves no idle compute to verify
trees with) and on how much the draft is accepted (the prompts, the sampling settings), so it is
chosen per step from measurements, not fixed:

- the wall time of a step, per (choice, batch bucket, greedy or sampled), as an exponential
  moving average of the steps that choice ran (the first run of a graph is warm-up, ignored);
- the tokens one step yields per sequence, per (choice, greedy or sampled): acceptance does not
  depend on the batch size, so what a tree earns at batch 1 predicts it at batch 16. One step's
  count is noisy (1 to depth + 1 tokens at batch 1), so this is a mean over the last
  ``token_memory`` steps, with its variance.

Step times may be seeded at start-up (``seed``: on a GPU, the replay time of every captured
graph, see SpeculativeRunner.calibrate); the engine's wall clock then refines them, from steady
steps only (a step that follows one of the same choice: a plain step overlapped with the one
before it, not the first plain step after a tree, which pays the switch).

The best choice runs for an epoch of ``epoch_steps`` steps of its bucket: switches are rare
(each costs a step without overlap) and the per-step decision is a lookup. Each epoch runs the
choice with the highest tokens per second, a tree's tokens per step counted ``optimism``
standard errors above its mean (a tree known from few steps gets the benefit of the doubt, so
an unlucky trial does not shut it out); a choice with no timing yet in this bucket,
or a tree whose acceptance was never seen, is tried first (a short epoch of ``trial_steps``
each, in order); after that, one epoch in every ``explore_every`` is a short one re-measuring
the choice measured longest ago, so a choice that became better (other prompts, other
acceptance) is found again. Plain decoding is one of the choices, so a draft that never accepts
ends with plain decoding and loses only the exploring steps (about trial_steps / (epoch_steps x
explore_every) of them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

PLAIN = "plain"
# Variance assumed for a tree's tokens per step at least (its first observations may agree by chance).
MIN_TOKEN_VARIANCE = 0.25


@dataclass(slots=True)
class _Average:
    """Exponential moving average; ``count`` observations so far."""

    value: float = 0.0
    count: int = 0
    last_step: int = -1  # the policy step of the last observation

    def update(self, x: float, smoothing: float, step: int) -> None:
        self.value = x if self.count == 0 else (1 - smoothing) * self.value + smoothing * x
        self.count += 1
        self.last_step = step


@dataclass(slots=True)
class _Mean:
    """Mean and variance of the tokens a step yields: a plain running mean over the first
    ``memory`` observations, then exponentially weighted with weight 1 / memory."""

    value: float = 0.0
    variance: float = 0.0
    count: int = 0

    def update(self, x: float, memory: int) -> None:
        self.count += 1
        w = max(1.0 / self.count, 1.0 / memory)
        delta = x - self.value
        self.value += w * delta
        self.variance = (1 - w) * (self.variance + w * delta * delta)

    def upper(self, optimism: float, memory: int, floor_variance: float) -> float:
        """The mean plus ``optimism`` standard errors (of at most ``memory`` observations)."""
        n = min(self.count, memory)
        return self.value + optimism * (max(self.variance, floor_variance) / n) ** 0.5


@dataclass(slots=True)
class _Epoch:
    choice: str
    steps_left: int  # steps of this epoch still to run after the current one


@dataclass
class SpeculationPolicy:
    """Picks, per step, plain decoding or one of ``trees`` (tree spec strings)."""

    trees: list[str]
    smoothing: float = 0.2  # weight of the newest observation in the step-time averages
    token_memory: int = 64  # observations the tokens-per-step mean spans (one step's count is noisy)
    optimism: float = 0.5  # standard errors added to a tree's tokens per step when choosing
    epoch_steps: int = 8  # steps the best choice runs for before the next decision, per bucket
    trial_steps: int = 2  # steps of a trial or an exploring epoch (the first pays the switch, the next is timed)
    explore_every: int = 32  # one exploring epoch in this many, per bucket
    _seconds: dict[tuple, _Average] = field(default_factory=dict)  # (choice, bucket, greedy) -> step time
    _tokens: dict[tuple, _Mean] = field(default_factory=dict)  # (choice, greedy) -> tokens / sequence / step
    _epochs: dict[tuple, int] = field(default_factory=dict)  # (bucket, greedy) -> epochs started
    _current: dict[tuple, _Epoch] = field(default_factory=dict)  # (bucket, greedy) -> the running epoch
    _observed: int = 0  # observations so far (the clock of ``last_step``)

    def __post_init__(self) -> None:
        if not self.trees:
            raise ValueError("SpeculationPolicy needs at least one tree to choose from")
        if len(set(self.trees)) != len(self.trees) or PLAIN in self.trees:
            raise ValueError(f"SpeculationPolicy.trees must be distinct tree specs, got {self.trees}")
        if not 0.0 < self.smoothing <= 1.0:
            raise ValueError(f"SpeculationPolicy.smoothing must be in (0, 1], got {self.smoothing}")
        if self.token_memory < 1 or self.optimism < 0:
            raise ValueError(f"SpeculationPolicy.token_memory must be >= 1 and optimism >= 0, got "
                             f"{self.token_memory} and {self.optimism}")
        if self.explore_every < 2:
            raise ValueError(f"SpeculationPolicy.explore_every must be >= 2, got {self.explore_every}")
        if self.epoch_steps < 1 or self.trial_steps < 1:
            raise ValueError(f"SpeculationPolicy.epoch_steps and trial_steps must be >= 1, got "
                             f"{self.epoch_steps} and {self.trial_steps}")

    @property
    def choices(self) -> list[str]:
        return [PLAIN, *self.trees]

    def choose(self, bucket: int, greedy: bool) -> str:
        """The choice to run for a step of this batch bucket."""
        key = (bucket, greedy)
        epoch = self._current.get(key)
        if epoch is not None and epoch.steps_left > 0:
            epoch.steps_left -= 1
            return epoch.choice
        n = self._epochs.get(key, 0)
        self._epochs[key] = n + 1
        untried = [c for c in self.choices if (c, bucket, greedy) not in self._seconds
                   or (c != PLAIN and (c, greedy) not in self._tokens)]
        steps = self.trial_steps
        if untried:
            choice = untried[0]
        elif n % self.explore_every == self.explore_every - 1:
            choice = min(self.choices, key=lambda c: self._seconds[(c, bucket, greedy)].last_step)
        else:
            choice, steps = self.best(bucket, greedy), self.epoch_steps
        self._current[key] = _Epoch(choice, steps - 1)
        return choice

    def observe(self, choice: str, bucket: int, greedy: bool, seconds: float, tokens_per_sequence: float,
                steady: bool = True) -> None:
        """Record one step that ran ``choice``: its wall time and mean tokens per sequence.
        ``steady``: the step followed one of the same choice; otherwise its time (a switch, a
        warm-up) is not taken, only its tokens."""
        if choice not in self.choices:
            raise ValueError(f"unknown choice {choice!r}: expected one of {self.choices}")
        self._observed += 1
        if choice != PLAIN:
            self._tokens.setdefault((choice, greedy), _Mean()).update(tokens_per_sequence, self.token_memory)
        if steady:
            self._seconds.setdefault((choice, bucket, greedy), _Average()).update(seconds, self.smoothing,
                                                                                  self._observed)

    def seed(self, choice: str, bucket: int, greedy: bool, seconds: float) -> None:
        """A step time measured before serving (graph replay): the starting value of the average."""
        if choice not in self.choices:
            raise ValueError(f"unknown choice {choice!r}: expected one of {self.choices}")
        self._seconds[(choice, bucket, greedy)] = _Average(seconds, 1, -1)

    def expected_rate(self, choice: str, bucket: int, greedy: bool) -> float | None:
        """Expected tokens per second per sequence of ``choice`` (None until measured)."""
        return self._rate(choice, bucket, greedy, 0.0)

    def _rate(self, choice: str, bucket: int, greedy: bool, optimism: float) -> float | None:
        """Tokens per second per sequence, a tree's tokens per step ``optimism`` standard errors
        above their mean (None until measured)."""
        seconds = self._seconds.get((choice, bucket, greedy))
        if seconds is None or seconds.value <= 0:
            return None
        if choice == PLAIN:
            return 1.0 / seconds.value
        tokens = self._tokens.get((choice, greedy))
        if tokens is None:
            return None
        return tokens.upper(optimism, self.token_memory, MIN_TOKEN_VARIANCE) / seconds.value

    def best(self, bucket: int, greedy: bool) -> str:
        """The measured choice with the highest rate, a tree's tokens per step taken ``optimism``
        standard errors above their mean (plain until something is measured). A tree seen on a
        few unlucky steps keeps a margin and is run again until its mean is known; ranked by a
        short moving average alone, a few short steps could shut out the best tree for thousands
        of steps (H200, SmolLM2, batch 1: auto 0.98x where dynamic:5,8,32 alone ran 1.22x)."""
        rates = {c: self._rate(c, bucket, greedy, self.optimism) for c in self.choices}
        rates = {c: r for c, r in rates.items() if r is not None}
        return max(rates, key=rates.get) if rates else PLAIN

    def summary(self) -> list[dict]:
        """One row per measured (choice, bucket, greedy): step ms, tokens per sequence, rate."""
        rows = []
        for (choice, bucket, greedy), seconds in sorted(self._seconds.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
            tokens = self._tokens.get((choice, greedy))
            rows.append({"choice": choice, "bucket": bucket, "greedy": greedy, "step_ms": 1000 * seconds.value,
                         "tokens_per_sequence": 1.0 if choice == PLAIN else (tokens.value if tokens else None),
                         "tokens_per_s_per_sequence": self.expected_rate(choice, bucket, greedy),
                         "steps_timed": seconds.count})
        return rows
