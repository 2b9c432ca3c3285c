"""The processes and process groups of a tensor-parallel engine.

Rank 0 is the process that holds the user's ``LLM``: it schedules, streams and answers. Ranks
1..N-1 are either worker processes started here (torch.multiprocessing, spawn, one host,
rendezvous on 127.0.0.1) or, under ``torchrun``, the job's other processes (RANK / WORLD_SIZE /
MASTER_ADDR set). Every other rank builds the same engine and follows rank 0
(``FollowerControl.serve``, step_control.py).

Two groups: the device group (NCCL on GPUs, gloo on CPUs) for the model's collectives, and a
gloo group on the CPU for rank 0's control messages, so a message never waits on the GPU.

Lifetimes. ``RankGroup.close`` (``LLM.close``, or at interpreter exit) tells the workers to
stop, drains the gloo groups with them (``_drain``), joins them and destroys the groups; a
rank > 0 then leaves without the interpreter's teardown (``leave_after_following``). A worker reports an error through its pipe before it
exits; rank 0 checks its workers before every message and names the rank and its error. A
worker whose rank 0 dies exits too: its control group sees the connection close, and a spawned
worker also watches its parent process (rank 0 may die while the worker waits elsewhere).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any, Callable

import torch
import torch.distributed as dist

from eaglespec.config import EngineConfig, SpecConfig
from eaglespec.engine.step_control import FollowerControl, LeaderControl, StepControl, StepShared
from eaglespec.models.tensor_parallel import TensorParallel

log = logging.getLogger(__name__)

# A follower waits this long for rank 0's next message: an idle server sends none for hours.
CONTROL_TIMEOUT = timedelta(days=365)
RENDEZVOUS_TIMEOUT = timedelta(minutes=5)  # for every rank to join the groups
START_TIMEOUT_S = 600.0  # for every spawned worker to come up (import torch, reach the rendezvous)
JOIN_TIMEOUT_S = 60.0  # for a worker to leave after the stop message
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True, slots=True)
class RankArgs:
    """What every rank builds its engine from (sent to the workers: picklable, paths not modules)."""

    model: str  # the checkpoint path
    draft: str | None  # a head directory, "none" or None (as LLM's ``draft``)
    spec: SpecConfig | None
    dtype: str | torch.dtype | None
    engine: EngineConfig | None
    device_type: str  # "cpu" or "cuda": rank r runs on cuda:r (cuda:LOCAL_RANK under torchrun)
    default_draft: bool  # the checkpoint is the embedded default model (rank 0 decided)


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARS)


def check_tensor_parallel_size(size, device: torch.device) -> int:
    """``size`` as a checked world size (TypeError / ValueError naming the field)."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"tensor_parallel_size must be an int >= 1, got {size!r} ({type(size).__name__})")
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {size}")
    if size == 1:
        return size
    if launched_by_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if world != size:
            raise ValueError(f"tensor_parallel_size is {size} but torchrun started {world} processes "
                             f"(WORLD_SIZE): they must be equal")
    elif device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"device {str(device)!r} with tensor_parallel_size {size}: rank r runs on cuda:r; "
                             f"give device='cuda' and pick the GPUs with CUDA_VISIBLE_DEVICES")
        if size > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size {size} needs {size} GPUs, only {torch.cuda.device_count()} "
                             f"visible")
    return size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(slots=True)
class _Worker:
    rank: int
    process: object  # a spawned multiprocessing Process
    conn: object  # the read end of its pipe: ("hello",), then ("error", summary) if it fails
    error: str | None = None
    said_hello: bool = False

    def read(self) -> None:
        """Take whatever the worker has said so far."""
        try:
            while self.conn.poll():
                message = self.conn.recv()
                if message[0] == "hello":
                    self.said_hello = True
                elif message[0] == "error":
                    self.error = message[1]
        except (EOFError, OSError):  # the worker is gone; its exit code says the rest
            pass


class RankGroup:
    """This process's rank, its groups and (on rank 0 of a spawned group) the worker processes."""

    def __init__(self, rank: int, world_size: int, device: torch.device, workers: list[_Worker]):
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.workers = workers
        self.device_group = None
        self.control_group = None
        self.control: StepControl | None = None
        self.last_fingerprint: Callable[[], int | None] = lambda: None  # set by the LLM (the final check)
        self._owns_default_group = False
        self._closed = False

    @property
    def tensor_parallel(self) -> TensorParallel:
        return TensorParallel(self.rank, self.world_size, self.device_group)

    # ------------------------------------------------------------------ start

    @classmethod
    def start(cls, args: RankArgs, world_size: int,
              build_engine: Callable[[RankArgs, "RankGroup"], Any]) -> "RankGroup":
        """Rank 0 starts its workers and joins the groups with them; under torchrun this process
        joins the job's group with the rank torchrun gave it. ``build_engine(args, group)`` (a
        picklable top-level callable) builds a worker's engine, whose ``core`` it then follows."""
        if launched_by_torchrun():
            rank = int(os.environ["RANK"])
            local_rank = int(os.environ.get("LOCAL_RANK", rank))
            group = cls(rank, world_size, _device(args.device_type, local_rank), [])
            group._join("env://")
            atexit.register(group.close)
            return group
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a torch.distributed group: close the other "
                               "tensor-parallel LLM first (or launch with torchrun)")
        import torch.multiprocessing as mp

        port = _free_port()
        ctx = mp.get_context("spawn")
        workers = []
        group = cls(0, world_size, _device(args.device_type, 0), workers)
        try:
            for rank in range(1, world_size):
                read, write = ctx.Pipe(duplex=False)
                process = ctx.Process(target=_worker_main, args=(rank, world_size, port, args, build_engine, write),
                                      name=f"eaglespec-tp-rank{rank}", daemon=False)
                with _sigint_ignored():
                    process.start()
                write.close()
                workers.append(_Worker(rank, process, read))
            group._await_workers()
            group._join(f"tcp://127.0.0.1:{port}")
        except BaseException:
            group.close(force=True)
            raise
        atexit.register(group.close)
        return group

    def _await_workers(self) -> None:
        """Wait until every worker is up and about to join (or raise naming one that failed)."""
        waiting = {w.rank: w for w in self.workers}
        while waiting:
            ready = wait([w.conn for w in waiting.values()] + [w.process.sentinel for w in waiting.values()],
                         timeout=START_TIMEOUT_S)
            if not ready:
                raise RuntimeError(f"tensor-parallel ranks {sorted(waiting)} did not start within {START_TIMEOUT_S} s")
            for w in list(waiting.values()):
                w.read()
                if w.error is not None or w.process.exitcode is not None:
                    w.process.join(5)
                    raise self._worker_failure(w, "failed to start")
                if w.said_hello:
                    del waiting[w.rank]

    def _join(self, init_method: str) -> None:
        """Join the device group (the default group) and make the control group."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if dist.is_initialized():  # under torchrun, made by the user's script
            if dist.get_world_size() != self.world_size:
                raise ValueError(f"the torch.distributed group has {dist.get_world_size()} ranks, "
                                 f"tensor_parallel_size is {self.world_size}")
        else:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, init_method=init_method, rank=self.rank, world_size=self.world_size,
                                    timeout=RENDEZVOUS_TIMEOUT if backend == "gloo" else None,
                                    device_id=self.device if self.device.type == "cuda" else None)
            self._owns_default_group = True
        self.device_group = dist.group.WORLD
        self.control_group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        if self.rank == 0:
            self.control = LeaderControl(self.control_group, self.check_workers)
        else:
            self.control = FollowerControl(self.control_group, self.rank)

    # ------------------------------------------------------------------ health

    def check_workers(self, grace_s: float = 0.0, what: str = "stopped") -> None:
        """Raise naming the first worker that failed (it reported an error, or it exited), with
        its error. ``grace_s``: how long to wait for a report (after a failed message: the
        socket may close before the report is read)."""
        if grace_s > 0 and self.workers:
            wait([w.conn for w in self.workers] + [w.process.sentinel for w in self.workers], timeout=grace_s)
        for w in self.workers:
            w.read()
            if w.error is not None or w.process.exitcode is not None:
                raise self._worker_failure(w, what)

    @staticmethod
    def _worker_failure(w: _Worker, what: str) -> RuntimeError:
        code = w.process.exitcode
        why = w.error.strip() if w.error else f"no error was reported (exit code {code})"
        return RuntimeError(f"tensor-parallel rank {w.rank} {what}: {why}")

    def abandon(self, exc: BaseException) -> None:
        """Rank 0 failed to build its engine: stop everything. When rank 0's error is a failed
        collective (a RuntimeError) and a worker reported one, the worker's error is raised: the
        collective failed because that worker had stopped."""
        failure = None
        if isinstance(exc, RuntimeError):
            try:
                self.check_workers(grace_s=2.0 if self.workers else 0.0, what="failed to start")
            except RuntimeError as err:
                failure = err
        self.close(force=True)
        if failure is not None:
            raise failure from exc

    # ------------------------------------------------------------------ follow (ranks > 0)

    def follow(self, core) -> None:
        """Run rank 0's steps on ``core`` until it stops; then leave the groups."""
        assert isinstance(self.control, FollowerControl)
        self.control.serve(core, lambda: core.last_fingerprint)
        self._drain()
        self.close()

    # ------------------------------------------------------------------ stop

    def _drain(self) -> None:
        """Every rank, after the stop message: let the groups' gloo threads finish with every
        work. Such a thread drops a finished collective's work after the caller has moved on;
        when that drop frees a tensor Python made, it takes the GIL, and if the interpreter has
        begun to finalize by then, Python ends the thread inside a C++ destructor and the
        process aborts ("terminate called without an active exception", seen under torchrun
        after correct output). A barrier on each gloo group: its enqueue waits for the group's
        lock, under which earlier works are dropped (with the GIL released, so they can be).
        The barrier holds the works still in flight when it started (the stop message's), so
        then wait until the control channel's buffer is released: the barrier's work is gone."""
        groups = [self.control_group]
        if self.device.type != "cuda":
            groups.append(self.device_group)
        opts = dist.BarrierOptions()
        opts.device = torch.device("cpu")  # the gloo backend, whatever device dist.barrier would pick
        for group in groups:
            if group is not None:
                group.barrier(opts).wait()
        self.control.channel.wait_released(JOIN_TIMEOUT_S)

    def close(self, force: bool = False) -> None:
        """Stop the other ranks (rank 0) and leave the groups. Raises when a worker had failed;
        ``force``: terminate the workers without a stop message (start-up failed)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        failure = None
        terminate = force  # without a stop message
        control = self.control
        if isinstance(control, LeaderControl):
            if control.broken is not None:
                # Its error was raised where it happened; the workers may be mid-message (an
                # interrupted send) or gone: they are terminated, not told.
                terminate = True
            elif not force:
                try:
                    control.stop(StepShared(None, self.last_fingerprint()))
                except Exception as exc:  # noqa: BLE001 - a worker is gone (LeaderControl names it)
                    failure, terminate = exc, True
                else:
                    try:
                        self._drain()
                    except Exception as exc:  # noqa: BLE001 - a worker left instead (its own error names why)
                        try:
                            self.check_workers(grace_s=5.0, what="failed")
                        except RuntimeError as why:
                            exc = why
                        failure, terminate = exc, True
            control.broken = control.broken or RuntimeError("it was closed (LLM.close)")
        for w in self.workers:
            w.process.join(0 if terminate else JOIN_TIMEOUT_S)
            if w.process.is_alive():
                w.process.terminate()
                w.process.join(5)
            if w.process.is_alive():
                w.process.kill()
                w.process.join(5)
            w.read()
            if failure is None and not terminate and (w.error or w.process.exitcode):
                failure = self._worker_failure(w, "failed")
            w.conn.close()
        if self.control_group is not None:
            dist.destroy_process_group(self.control_group)
            self.control_group = None
        if self._owns_default_group and dist.is_initialized():
            dist.destroy_process_group()
        if failure is not None and not force:
            raise failure


@contextlib.contextmanager
def _sigint_ignored():
    """Ctrl-C in a terminal reaches every process of its group: a worker is born ignoring it
    (an ignored signal survives exec, and Python keeps it ignored) and rank 0 alone handles it,
    closing the workers."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: no handler to change
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _device(device_type: str, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")


def _exit_with_parent() -> None:
    """A spawned worker leaves when its rank 0 process is gone, whatever it is waiting on."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os._exit(1)

    threading.Thread(target=watch, name="eaglespec-parent-watch", daemon=True).start()


def _worker_main(rank: int, world_size: int, port: int, args: RankArgs, build_engine, conn) -> None:
    """A spawned rank: join the groups, build the same engine as rank 0, follow it until stop."""
    try:
        from tqdm import tqdm

        # tqdm's default lock is a multiprocessing semaphore, which a worker that rank 0 has to
        # terminate would leak (a warning at rank 0's exit); progress bars are rank 0's anyway.
        tqdm.set_lock(threading.RLock())
        if args.device_type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        _exit_with_parent()
        conn.send(("hello",))
        group = RankGroup(rank, world_size, _device(args.device_type, rank), [])
        group._join(f"tcp://127.0.0.1:{port}")
        group.follow(build_engine(args, group).core)
    except BaseException as exc:  # noqa: BLE001 - said to rank 0, which raises it
        log.error("tensor-parallel rank %d failed:\n%s", rank, traceback.format_exc())
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
        conn.close()
        sys.exit(1)
    conn.close()
    leave_after_following()


def leave_after_following() -> None:
    """End a rank > 0 that has followed rank 0 to its stop: exit 0 without the interpreter's
    teardown. It has nothing left to do, and the teardown can still abort the process (a C++
    thread of a group reaching for the GIL mid-finalization, see ``RankGroup._drain``): the
    launcher would then report a failed job after a good run."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
