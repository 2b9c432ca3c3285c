"""What the ranks of a tensor-parallel engine agree on, step by step (SPMD stepping).

Every rank runs the same ``EngineCore`` on the same inputs, so every rank schedules the same
batches, launches the same graphs (collectives included) in the same order and keeps the same
host state, without shipping tensors. What could differ per rank comes from rank 0 only:

- the commands that arrived since the last step (``AddRequest`` with the seed rank 0 drew for
  an unseeded request, ``Abort``), applied by the other ranks before they run the step;
- the wall time of the previous decoding step, the one clock input of the speculation policy
  (speculative/policy.py): every rank's policy is fed rank 0's measurements, so every rank's
  policy makes rank 0's choices;
- start-up values: calibration times (``leader_value``) and the KV pool size (the minimum over
  ranks, so every rank has the same number of blocks).

One message per step goes over the control group (gloo, on the CPU: it never waits on the GPU).
It also carries a fingerprint of rank 0's previous step (its tokens, choice, KV use), which every
other rank compares with its own: a rank that diverged stops with an error instead of deadlocking
on a mismatched collective later.

``StepControl`` itself is the single-process engine's: every value is its own, nothing is sent.
"""

from __future__ import annotations

import pickle
import time
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from eaglespec.config import SamplingParams


@dataclass(frozen=True, slots=True)
class AddRequest:
    """A request rank 0 queued, as the other ranks queue it (the same id and seed)."""

    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # rank 0's: its own draw when the request gave none
    request_id: int  # what rank 0's core answered (the others check they answer the same)


@dataclass(frozen=True, slots=True)
class Abort:
    request_id: int


@dataclass(frozen=True, slots=True)
class StepShared:
    """What a step takes from rank 0. Each rank offers its own; rank 0's wins."""

    seconds: float | None  # wall time of the previous decoding step (the policy's clock), None: none to observe
    fingerprint: int | None  # of the previous step's outcome (see step_fingerprint), None: not checked


@dataclass(frozen=True, slots=True)
class ControlMessage:
    """Rank 0 to the others: commands to apply, then one action ("step", "logits" or "stop")."""

    commands: list
    action: str
    payload: object = None  # "step": StepShared; "logits": token ids; "stop": the last StepShared


def step_fingerprint(kind: str, choice: str, kv_blocks_in_use: int, deltas) -> int:
    """A checksum of one step's outcome that is equal on ranks in step (ints and strings only:
    repr is the same in every process, whatever its hash seed)."""
    rows = [(d.request_id, d.new_token_ids, d.finish_reason) for d in deltas]
    return zlib.crc32(repr((kind, choice, kv_blocks_in_use, rows)).encode())


class StepControl:
    """A single-process engine: its own values, no one to tell."""

    checks_steps = False  # whether the core computes step fingerprints for the control

    def record(self, command: AddRequest | Abort) -> None:
        """A command rank 0's core just applied (the others apply it before the next action)."""

    def begin_step(self, own: StepShared) -> StepShared:
        """Called first in every ``EngineCore.step``: the values this step runs with."""
        return own

    def before_logits(self, token_ids: list[int]) -> None:
        """Called before a full-sequence forward outside the steps (``LLM.logits``)."""

    def leader_value(self, value):
        """Rank 0's ``value`` (start-up measurements every rank must use alike)."""
        return value

    def min_over_ranks(self, value: int) -> int:
        """The smallest ``value`` of any rank (the KV pool size: every rank holds the same blocks)."""
        return value


SINGLE_PROCESS = StepControl()


class ObjectChannel:
    """Pickled objects from rank 0 to every rank over a (gloo) group: one broadcast of a
    fixed-size buffer per object, a second only for an object that does not fit in it."""

    def __init__(self, group, rank: int, capacity: int = 1 << 14):
        self.group = group
        self.rank = rank
        self.capacity = capacity
        self._buffer = torch.zeros(capacity, dtype=torch.uint8)
        self._bytes = self._buffer.numpy()  # the same memory

    def send(self, obj) -> None:
        import torch.distributed as dist

        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        head = self.capacity - 8
        self._bytes[:8] = np.frombuffer(len(data).to_bytes(8, "little"), dtype=np.uint8)
        first = data[:head]
        self._bytes[8:8 + len(first)] = np.frombuffer(first, dtype=np.uint8)
        dist.broadcast(self._buffer, 0, group=self.group)
        if len(data) > head:
            dist.broadcast(torch.frombuffer(bytearray(data[head:]), dtype=torch.uint8), 0, group=self.group)

    def wait_released(self, timeout_s: float) -> None:
        """Until no collective's work holds the buffer any more (its use count is back to Python's
        own reference): a gloo thread lets go of a finished work after the caller has moved on
        (``RankGroup._drain`` says why that matters)."""
        deadline = time.monotonic() + timeout_s
        while self._buffer._use_count() > 1 and time.monotonic() < deadline:
            time.sleep(0.001)

    def receive(self):
        import torch.distributed as dist

        dist.broadcast(self._buffer, 0, group=self.group)
        size = int.from_bytes(self._bytes[:8].tobytes(), "little")
        head = self.capacity - 8
        data = self._bytes[8:8 + min(size, head)].tobytes()
        if size > head:
            rest = torch.empty(size - head, dtype=torch.uint8)
            dist.broadcast(rest, 0, group=self.group)
            data += rest.numpy().tobytes()
        return pickle.loads(data)


def _min_over(group, value: int) -> int:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return int(t.item())


class LeaderControl(StepControl):
    """Rank 0: queues the commands its core applies and sends them with each action.

    ``health(grace_s)`` raises a clear error when another rank has stopped (it is called before
    every send, and with a grace period when a send fails); once the ranks are out of step the
    engine is unusable, so every later call raises the same error."""

    checks_steps = True

    def __init__(self, group, health: Callable[[float], None] = lambda grace_s: None):
        self.channel = ObjectChannel(group, 0)
        self.group = group
        self.health = health
        self._commands: list = []
        self.broken: BaseException | None = None

    def _send(self, message) -> None:
        if self.broken is not None:
            raise RuntimeError(f"the tensor-parallel engine takes no more work: {self.broken}") from self.broken
        try:
            self.health(0.0)
            self.channel.send(message)
        except Exception as exc:
            try:
                self.health(5.0)  # a rank that stopped says why
            except Exception as why:  # noqa: BLE001
                exc = why
            self.broken = exc
            raise exc
        except BaseException as exc:  # interrupted: the message may be half sent
            self.broken = exc
            raise
        self._commands = []

    def record(self, command) -> None:
        self._commands.append(command)

    def begin_step(self, own: StepShared) -> StepShared:
        self._send(ControlMessage(self._commands, "step", own))
        return own

    def before_logits(self, token_ids: list[int]) -> None:
        self._send(ControlMessage(self._commands, "logits", list(token_ids)))

    def leader_value(self, value):
        self._send(value)
        return value

    def min_over_ranks(self, value: int) -> int:
        return _min_over(self.group, value)

    def stop(self, last: StepShared) -> None:
        """Tell the other ranks to leave their loops (``last``: the final step's fingerprint)."""
        self._send(ControlMessage(self._commands, "stop", last))


class RanksDiverged(RuntimeError):
    pass


class FollowerControl(StepControl):
    """Rank r > 0: takes rank 0's messages and replays them on its own core (``serve``)."""

    checks_steps = True

    def __init__(self, group, rank: int):
        self.channel = ObjectChannel(group, rank)
        self.group = group
        self.rank = rank
        self._shared: StepShared | None = None  # rank 0's values for the step being run
        self.steps = 0

    def begin_step(self, own: StepShared) -> StepShared:
        leader, self._shared = self._shared, None
        if leader is None:
            raise RuntimeError("a follower rank's core stepped outside FollowerControl.serve")
        self._check(own, leader)
        return leader

    def _check(self, own: StepShared, leader: StepShared) -> None:
        if own.fingerprint != leader.fingerprint:
            raise RanksDiverged(f"rank {self.rank} is out of step with rank 0 after {self.steps} steps: its step "
                                f"fingerprint {own.fingerprint} differs from rank 0's {leader.fingerprint}")

    def leader_value(self, value):
        return self.channel.receive()

    def min_over_ranks(self, value: int) -> int:
        return _min_over(self.group, value)

    def serve(self, core, last_fingerprint: Callable[[], int | None]) -> None:
        """Run rank 0's commands and steps on ``core`` until rank 0 says stop; deltas are dropped
        (rank 0 alone answers the user)."""
        while True:
            message: ControlMessage = self.channel.receive()
            for command in message.commands:
                if isinstance(command, AddRequest):
                    rid = core.add_encoded(command.prompt_ids, command.params, command.seed)
                    if rid != command.request_id:
                        raise RanksDiverged(f"rank {self.rank} numbered a request {rid}, rank 0 "
                                            f"{command.request_id}")
                else:
                    core.abort(command.request_id)
            if message.action == "stop":
                if message.payload.fingerprint is not None:  # None: rank 0's last step was interrupted
                    self._check(StepShared(None, last_fingerprint()), message.payload)
                return
            if message.action == "logits":
                core.full_logits(message.payload)
            elif message.action == "step":
                self._shared = message.payload
                core.step()
                self.steps += 1
            else:
                raise ValueError(f"unknown control action {message.action!r}")
