"""Which speculation (a tree, or none) pays for the batch at hand.

Speculation trades one target forward per token for a costlier step that yields several tokens.
Whether that pays depends on the batch size (a big batch leaves no idle compute to verify
trees with) and on how much the draft is accepted (the prompts, the sampling settings), so it is
chosen per step from measurements, not fixed:

- the wall time of a step, per (choice, batch bucket, greedy or sampled), as an exponential
  moving average of the steps that choice ran (the first run of a graph is warm-up, ignored;
  a stalled step counts at most ``step_time_clip`` times the average);
- the tokens a tree's step yields per sequence, as two factors, per greedy or sampled (not per
  batch size: acceptance does not depend on it):
  - what the tree earns on text of usual ease: the mean of its accepted drafts per step over
    its last ``token_memory`` steps, each divided by the ease of the text it ran on;
  - how well the text at hand suits the draft (the *ease*): over the last ``ease_memory``
    steps of any tree, the drafts accepted over what those trees accept on their priors (their
    means where a tree has none), relative to the same ratio over the last ``ease_level_memory``
    steps (which starts at 1: the priors' scale).
  A tree's expected tokens per step is 1 + its mean drafts x the ease (at most its depth + 1).
  Acceptance changes with the text (MT-bench's first prompt accepts far less than most), so
  the ease follows it quickly, and every tree step updates every tree's expectation. With each
  tree's own recent mean instead, a tree that ran during a hard stretch kept that stretch's low
  mean until it happened to run again, which the policy then never chose (H200, SmolLM2,
  batch 1: auto 1.01x where dynamic:5,8,32 alone ran 1.25x; it believed 2.3-2.6 tokens per
  step for trees that yield 2.9-3.2). With means of raw drafts and the ease measured against
  them, the tree that had run through a hard stretch was still remembered low, and the ease
  that brought its expectation back up lifted every other tree's by as much: the end-to-end
  benchmark's warm-up on MT-bench's hard writing prompts left auto 1.2-1.9 % under the best
  fixed tree on average and single runs up to 13 % under, replayed on MT-bench's real
  acceptance with seven GPU runs' step times (design note 71). The ease is measured against
  the priors, not the means it normalises: against the means, a mean that drifted low raised
  the ease, which pushed the mean lower still. A tree without a prior learns from its raw
  drafts (the ease then compares with its mean, so dividing by it would feed the mean's errors
  back into itself).

A tree's mean may start from a prior (``priors``: accepted drafts per greedy step as the head's
own evaluation measured them, see ``drafts_priors``), worth ``prior_steps`` steps. Without one,
the first steps a tree runs fix its mean, and where they fall on hard text (a trial on a prompt
that accepts little) the tree looks worse than it is for hundreds of steps (H100, SmolLM2,
batch 1: auto believed 2.9-3.3 tokens per step for dynamic:5,8,32, which alone yields 4.0).
Sampled steps start from the same greedy priors and measure their ease against them. Sampling
accepts less, by about the same factor for every tree: the ease (its own for sampled steps)
learns that factor within a few steps of any tree, and its long-run level within about
``ease_level_memory`` steps, while mean x ease stays what each tree yields. Without the
priors a tree's sampled mean came from its first trials alone (H200, SmolLM2, batch 1,
temperature 0.7: auto believed 2.26 tokens per step for dynamic:4,6,15, which alone yields 2.84,
and ran 1.10-1.22x where that tree ran 1.24-1.27x).

Step times may be seeded at start-up (``seed``: on a GPU, the replay time of every captured
graph, see SpeculativeRunner.calibrate); the engine's wall clock then refines them, from steady
steps only (a step that follows one of the same choice: a plain step overlapped with the one
before it, not the first plain step after a tree, which pays the switch).

The best choice runs for an epoch of ``epoch_steps`` steps of its bucket: switches are rare
(each costs a step without overlap) and the per-step decision is a lookup. Each epoch runs the
choice with the highest expected tokens per second; a choice with no timing yet in this bucket,
or a tree whose acceptance was never seen, is tried first (a short epoch of ``trial_steps``
each, in order). One epoch in every ``explore_every`` is a short one that measures again: while
plain decoding leads, every other one runs the best tree (the ease is only seen through trees,
so plain decoding must look at it now and then, and between looks the ease drifts back to 1
over ``ease_revert`` steps); the others run the choice measured longest ago. Exploring that
leaves the leader as it was comes less and less often (the gap doubles, down to one epoch in
``explore_every`` x ``explore_backoff``), so where speculation never pays, as on a CPU or for
sampled batch-1 requests on the H200, exploring costs little; exploring that changes the
leader brings it back to one in ``explore_every``. Plain decoding is one of the choices, so a
draft that never accepts ends with plain decoding and loses only the exploring steps (about
trial_steps / (epoch_steps x explore_every x explore_backoff) of them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from eaglespec.speculative.tree import parse_tree

PLAIN = "plain"
_MIN_EASE = 0.05  # a step's drafts count at most 20 times over into its tree's mean (then capped at the depth)


@dataclass(slots=True)
class _Average:
    """Exponential moving average; ``count`` observations so far."""

    value: float = 0.0
    count: int = 0
    last_step: int = -1  # the policy step of the last observation
    seeded: float | None = None  # the value measured before serving, where one was (see SpeculationPolicy.seed)

    def update(self, x: float, smoothing: float, step: int, clip: float = math.inf) -> None:
        """Take ``x``, from the third observation on at most ``clip`` times the average."""
        if self.count >= 2:
            x = min(x, clip * self.value)
        self.value = x if self.count == 0 else (1 - smoothing) * self.value + smoothing * x
        self.count += 1
        self.last_step = step


@dataclass(slots=True)
class _Mean:
    """A plain running mean over the first ``memory`` observations, then exponentially weighted
    with weight 1 / memory."""

    value: float = 0.0
    count: int = 0

    def update(self, x: float, memory: int) -> None:
        self.count += 1
        self.value += max(1.0 / self.count, 1.0 / memory) * (x - self.value)


def drafts_priors(measured: dict[str, list[float]], trees: list[str]) -> dict[str, float]:
    """Accepted drafts per greedy step for those of ``trees`` a head's evaluation tells about.
    ``measured``: tree -> the fraction of steps that accepted at least d drafts, d = 1, 2, ...
    (``acceptance.json``, as ``train eval`` measures them); their sum is the mean accepted drafts. A
    chain of k agrees with any longer greedy chain up to depth k, so it takes the first k rates of
    the longest chain measured; other trees only their own."""
    chains = {parse_tree(t).depth: rates for t, rates in measured.items() if t.startswith("chain:")}
    priors = {}
    for tree in trees:
        if tree in measured:
            priors[tree] = float(sum(measured[tree]))
        elif tree.startswith("chain:") and chains and max(chains) >= parse_tree(tree).depth:
            priors[tree] = float(sum(chains[max(chains)][:parse_tree(tree).depth]))
    return priors


@dataclass(slots=True)
class _Ease:
    """Drafts accepted over drafts expected (the running trees' priors, or their means where a
    tree has none), both exponentially weighted. The policy keeps two: one over the last few
    steps (the text at hand) and one over the long run, which starts at 1 (the priors' scale, as
    if a long history had been there); the ease is the first over the second (see
    SpeculationPolicy.ease)."""

    accepted: float = 0.0
    expected: float = 0.0
    last_step: int = 0  # the policy step of the last observation

    def update(self, accepted: float, expected: float, memory: int, step: int) -> None:
        w = 1.0 / memory
        self.accepted += w * (accepted - self.accepted)
        self.expected += w * (expected - self.expected)
        self.last_step = step


@dataclass(slots=True)
class _Epoch:
    choice: str
    steps_left: int  # steps of this epoch still to run after the current one


@dataclass(slots=True)
class _Exploring:
    """When a bucket explores next. Exploring that does not change the leader backs off (the
    gap doubles, up to ``explore_backoff`` times ``explore_every``); one that does resets it."""

    next_epoch: int  # the epoch that explores next
    gap: int  # epochs from one exploring epoch to the next
    count: int = 0  # exploring epochs so far
    leader: str | None = None  # the best choice when the last exploring epoch began, until judged


@dataclass
class SpeculationPolicy:
    """Picks, per step, plain decoding or one of ``trees`` (tree spec strings)."""

    trees: list[str]
    smoothing: float = 0.2  # weight of the newest observation in the step-time averages
    # A step counts at most this many times its choice's average: one step stalled by the host (a
    # garbage collection, a late wake-up) would otherwise add smoothing x the stall to one choice's
    # time and could shut the best tree out until it is explored again.
    step_time_clip: float = 1.5
    token_memory: int = 256  # steps a tree's mean accepted drafts spans (what it earns on text of usual ease)
    ease_memory: int = 8  # steps of any tree the ease spans (how fast it follows the text)
    ease_level_memory: int = 1024  # steps the ease's long-run level spans (the ease is relative to it)
    ease_revert: int = 32  # steps without a tree over which the ease returns 63 % of the way to 1 (1 - 1/e)
    epoch_steps: int = 8  # steps the best choice runs for before the next decision, per bucket
    trial_steps: int = 4  # steps of a trial or an exploring epoch (the first pays the switch; 2 were too few to
    # judge a tree by: one unlucky pair shut dynamic trees out for a whole run)
    explore_every: int = 8  # one exploring epoch in this many, per bucket, while exploring changes the leader
    explore_backoff: int = 2  # at most this many times fewer while it does not
    priors: dict[str, float] = field(default_factory=dict)  # tree -> accepted drafts per greedy step, measured offline
    # (the starting mean of greedy and sampled steps alike)
    prior_steps: int = 32  # steps of a tree's own that a prior weighs as much as
    _seconds: dict[tuple, _Average] = field(default_factory=dict)  # (choice, bucket, greedy) -> step time
    _drafts: dict[tuple, _Mean] = field(default_factory=dict)  # (tree, greedy) -> accepted drafts / sequence / step
    _ease: dict[bool, _Ease] = field(default_factory=dict)  # greedy -> the ease of the text at hand
    _ease_level: dict[bool, _Ease] = field(default_factory=dict)  # greedy -> the ease over the long run
    _epochs: dict[tuple, int] = field(default_factory=dict)  # (bucket, greedy) -> epochs started
    _current: dict[tuple, _Epoch] = field(default_factory=dict)  # (bucket, greedy) -> the running epoch
    _exploring: dict[tuple, _Exploring] = field(default_factory=dict)  # (bucket, greedy) -> its schedule
    _observed: int = 0  # observations so far (the clock of ``last_step``)
    _depth: dict[str, int] = field(default_factory=dict)  # tree -> draft depth (its most drafts per step)

    def __post_init__(self) -> None:
        if not self.trees:
            raise ValueError("SpeculationPolicy needs at least one tree to choose from")
        if len(set(self.trees)) != len(self.trees) or PLAIN in self.trees:
            raise ValueError(f"SpeculationPolicy.trees must be distinct tree specs, got {self.trees}")
        if not 0.0 < self.smoothing <= 1.0:
            raise ValueError(f"SpeculationPolicy.smoothing must be in (0, 1], got {self.smoothing}")
        if not self.step_time_clip > 1.0:
            raise ValueError(f"SpeculationPolicy.step_time_clip must be > 1, got {self.step_time_clip}")
        if min(self.token_memory, self.ease_memory, self.ease_level_memory, self.ease_revert) < 1:
            raise ValueError(f"SpeculationPolicy.token_memory, ease_memory, ease_level_memory and ease_revert must "
                             f"be >= 1, got {self.token_memory}, {self.ease_memory}, {self.ease_level_memory} "
                             f"and {self.ease_revert}")
        if self.explore_every < 2 or self.explore_backoff < 1:
            raise ValueError(f"SpeculationPolicy.explore_every must be >= 2 and explore_backoff >= 1, got "
                             f"{self.explore_every} and {self.explore_backoff}")
        if self.epoch_steps < 1 or self.trial_steps < 1:
            raise ValueError(f"SpeculationPolicy.epoch_steps and trial_steps must be >= 1, got "
                             f"{self.epoch_steps} and {self.trial_steps}")
        self._depth = {tree: parse_tree(tree).depth for tree in self.trees}
        unknown = set(self.priors) - set(self.trees)
        if unknown or any(not 0.0 <= d <= self._depth[t] for t, d in self.priors.items()):
            raise ValueError(f"SpeculationPolicy.priors must map its trees to accepted drafts in [0, depth], "
                             f"got {self.priors}")
        if self.prior_steps < 1:
            raise ValueError(f"SpeculationPolicy.prior_steps must be >= 1, got {self.prior_steps}")
        for tree, drafts in self.priors.items():  # greedy and sampled steps alike (see the module docstring)
            for greedy in (True, False):
                self._drafts[(tree, greedy)] = _Mean(drafts, self.prior_steps)

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
                   or (c != PLAIN and (c, greedy) not in self._drafts)]
        explore = self._exploring.setdefault(key, _Exploring(self.explore_every - 1, self.explore_every))
        steps = self.trial_steps
        if untried:
            choice = untried[0]
        elif n >= explore.next_epoch:
            # Every other exploring epoch while plain decoding leads: its best tree (is the text
            # easier now?); else the choice measured longest ago (is it better now?).
            explore.leader = self.best(bucket, greedy)
            if explore.leader == PLAIN and explore.count % 2 == 0:
                choice = self._best_of(self.trees, bucket, greedy)
            else:
                choice = min(self.choices, key=lambda c: self._seconds[(c, bucket, greedy)].last_step)
            explore.count += 1
            explore.next_epoch = n + explore.gap  # until the next epoch judges this one
        else:
            choice, steps = self.best(bucket, greedy), self.epoch_steps
            if explore.leader is not None:  # the first epoch after exploring: did it change the leader?
                changed = choice != explore.leader
                explore.gap = self.explore_every if changed else min(2 * explore.gap,
                                                                     self.explore_every * self.explore_backoff)
                explore.next_epoch, explore.leader = n + explore.gap - 1, None
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
            drafts = tokens_per_sequence - 1.0
            mean = self._drafts.setdefault((choice, greedy), _Mean())
            ease = self.ease(greedy)  # the text's, before this step
            # The ease compares with the tree's prior, else with what it earned before this step.
            reference = self.priors.get(choice, mean.value if mean.count else None)
            if reference is not None:
                self._ease.setdefault(greedy, _Ease()).update(drafts, reference, self.ease_memory, self._observed)
                self._ease_level.setdefault(greedy, _Ease(1.0, 1.0)).update(drafts, reference,
                                                                            self.ease_level_memory, self._observed)
            if choice in self.priors:  # what the tree would have accepted on text of usual ease (at most its depth)
                drafts = min(drafts / max(ease, _MIN_EASE), self._depth[choice])
            mean.update(drafts, self.token_memory)
        if steady:
            self._seconds.setdefault((choice, bucket, greedy), _Average()).update(seconds, self.smoothing,
                                                                                  self._observed, self.step_time_clip)

    def seed(self, choice: str, bucket: int, greedy: bool, seconds: float) -> None:
        """A step time measured before serving (graph replay): the starting value of the average."""
        if choice not in self.choices:
            raise ValueError(f"unknown choice {choice!r}: expected one of {self.choices}")
        self._seconds[(choice, bucket, greedy)] = _Average(seconds, count=1, last_step=-1, seeded=seconds)

    def expected_tokens(self, choice: str, greedy: bool) -> float | None:
        """Tokens per sequence one step of ``choice`` is expected to yield now (None until seen)."""
        if choice == PLAIN:
            return 1.0
        mean = self._drafts.get((choice, greedy))
        if mean is None:
            return None
        ease = self.ease(greedy)
        return 1.0 + min(mean.value * ease, self._depth[choice])

    def ease(self, greedy: bool) -> float:
        """How the text at hand suits the draft now, against the long run (1: as usual, see _Ease)."""
        fast, level = self._ease.get(greedy), self._ease_level.get(greedy)
        if fast is None or level is None or fast.expected <= 0 or level.accepted <= 0:
            return 1.0
        relative = (fast.accepted / fast.expected) / (level.accepted / level.expected)
        return 1.0 + (relative - 1.0) * math.exp(-(self._observed - fast.last_step) / self.ease_revert)

    def expected_rate(self, choice: str, bucket: int, greedy: bool) -> float | None:
        """Expected tokens per second per sequence of ``choice`` (None until measured)."""
        seconds = self._seconds.get((choice, bucket, greedy))
        tokens = self.expected_tokens(choice, greedy)
        if seconds is None or seconds.value <= 0 or tokens is None:
            return None
        return tokens / seconds.value

    def _best_of(self, choices: list[str], bucket: int, greedy: bool) -> str:
        rates = {c: self.expected_rate(c, bucket, greedy) for c in choices}
        rates = {c: r for c, r in rates.items() if r is not None}
        return max(rates, key=rates.get) if rates else PLAIN

    def best(self, bucket: int, greedy: bool) -> str:
        """The measured choice with the highest expected rate (plain until something is measured)."""
        return self._best_of(self.choices, bucket, greedy)

    def summary(self) -> list[dict]:
        """One row per measured (choice, bucket, greedy): step ms, expected tokens per sequence now
        and rate, and the ease of the text at hand. ``seeded_ms``: the step time measured before
        serving (None where there was none), beside which ``step_ms`` shows how far serving moved it."""
        rows = []
        for (choice, bucket, greedy), seconds in sorted(self._seconds.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
            rows.append({"choice": choice, "bucket": bucket, "greedy": greedy, "step_ms": 1000 * seconds.value,
                         "tokens_per_sequence": self.expected_tokens(choice, greedy),
                         "tokens_per_s_per_sequence": self.expected_rate(choice, bucket, greedy),
                         "ease": self.ease(greedy), "steps_timed": seconds.count,
                         "seeded_ms": None if seconds.seeded is None else 1000 * seconds.seeded})
        return rows
