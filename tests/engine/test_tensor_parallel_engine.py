"""The tensor-parallel engine on the CPU: ranks spawned by the engine (gloo), rank 0 leading.

Every rank holds its shard of the target (and the replicated head) and runs the same engine on
rank 0's commands and clock; each step's outcome is checked against rank 0's on every other
rank (a rank out of step stops, and ``close`` raises its error). So these tests check what rank
0 answers (the single-process engine's tokens, fp32) and that the other ranks stayed in step
(``close`` succeeds and every worker exits with 0).
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import torch

from eaglespec.config import EngineConfig, SamplingParams, SpecConfig
from eaglespec.engine.llm import LLM
from eaglespec.models.eagle import save_head
from tests.conftest import small_engine
from tests.models.test_loading import write_hf_dir
from tests.speculative.test_speculative_greedy import _prompts, eagle1_head, predictable_target
from tests.test_cli import tiny_dirs  # noqa: F401 - a fixture: a tiny model with a real tokenizer, and a head

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEST_TIMEOUT_S = 300  # a hang (ranks out of step in a collective) kills the run with every thread's stack
PROMPT_LENGTHS = [1, 6, 17, 33]
TREES_AUTO = ("chain:2", "dynamic:3,2,6")


@pytest.fixture(autouse=True)
def _hang_guard():
    faulthandler.dump_traceback_later(TEST_TIMEOUT_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(model dir, head dir): a small predictable Llama (fp32) and an EAGLE-1 head that it accepts often."""
    root = tmp_path_factory.mktemp("tp")
    target = predictable_target(seed=21)
    model_dir = write_hf_dir(root / "model", target.config, dict(target.hf_state_dict()))
    head_dir = str(root / "head")
    save_head(eagle1_head(target, seed=5), head_dir)
    return model_dir, head_dir


def engine_config() -> EngineConfig:
    return small_engine(max_batch_size=4, num_blocks=96)


def prompts(vocab: int = 61) -> list[list[int]]:
    return _prompts(vocab, PROMPT_LENGTHS, seed=3)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The single-process engine (no processes, no groups), plain decoding."""
    return LLM(checkpoint[0], draft="none", device="cpu", engine=engine_config())


def closed_cleanly(llm: LLM) -> None:
    """Close a tensor-parallel LLM; every worker must have stayed in step and left with 0."""
    workers = list(llm._ranks.workers)
    llm.close()
    assert [w.process.exitcode for w in workers] == [0] * len(workers)
    assert not any(w.process.is_alive() for w in workers)


@pytest.fixture(scope="module")
def tp2_plain(checkpoint):
    llm = LLM(checkpoint[0], draft="none", device="cpu", engine=engine_config(), tensor_parallel_size=2)
    yield llm
    llm.close()


GREEDY = SamplingParams(max_tokens=20, ignore_eos=True)


def test_greedy_plain_output_equals_the_single_process_engine(tp2_plain, reference):
    assert tp2_plain.tensor_parallel_size == 2
    outs = tp2_plain.generate(prompts(), GREEDY)
    ref = reference.generate(prompts(), GREEDY)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    assert all(len(o.token_ids) == 20 for o in outs)


def test_seeded_sampling_equals_the_single_process_engine(tp2_plain, reference):
    params = [SamplingParams(max_tokens=16, ignore_eos=True, temperature=0.9, top_p=0.95, top_k=20, seed=s)
              for s in range(len(PROMPT_LENGTHS))]
    outs = tp2_plain.generate(prompts(), params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in reference.generate(prompts(), params)]


def test_unseeded_sampling_uses_rank_0s_seeds(tp2_plain):
    """Unseeded requests draw their seed on rank 0; a rank drawing its own would sample other
    tokens, and the step checks would stop it (the fixture's close raises then)."""
    outs = tp2_plain.generate(prompts(), SamplingParams(max_tokens=12, ignore_eos=True, temperature=1.0))
    assert all(len(o.token_ids) == 12 for o in outs)
    # Still in step: a greedy batch after it matches the reference's first prompt.
    again = tp2_plain.generate(prompts()[:1], GREEDY)
    assert len(again[0].token_ids) == 20


def test_logits_equal_the_single_process_engine(tp2_plain, reference):
    ids = prompts()[2]
    # The shards sum their partial products in another order: equal to rounding (fp32).
    torch.testing.assert_close(tp2_plain.logits(ids), reference.logits(ids), rtol=1e-5, atol=1e-5)


def test_requests_arriving_and_aborted_mid_generation_keep_the_ranks_in_step(tp2_plain, reference):
    ps = prompts()
    first = [tp2_plain.add_request(p, GREEDY) for p in ps[:2]]
    for _ in range(3):
        tp2_plain.step()
    late = tp2_plain.add_request(ps[2], GREEDY)  # joins the running batch
    tp2_plain.step()
    tp2_plain.core.abort(first[0])
    gone_before_start = tp2_plain.add_request(ps[3], GREEDY)
    tp2_plain.core.abort(gone_before_start)  # aborted while waiting
    while tp2_plain.has_work:
        tp2_plain.step()
    outs = {rid: tp2_plain.collect(rid) for rid in first + [late, gone_before_start]}
    ref = reference.generate(ps, GREEDY)
    assert outs[first[0]].finish_reason == "abort" and outs[gone_before_start].finish_reason == "abort"
    assert outs[first[1]].token_ids == ref[1].token_ids
    assert outs[late].token_ids == ref[2].token_ids
    assert 0 < len(outs[first[0]].token_ids) < 20


def test_close_finds_every_rank_in_step_and_stops_them(tp2_plain, reference):
    """The engine of the tests above, closed here (one tensor-parallel engine per process at a
    time: the ones below start their own): the final step check passes, the worker exits with 0."""
    outs = tp2_plain.generate(prompts(), [GREEDY, SamplingParams(max_tokens=9, temperature=0.7)] * 2)
    assert outs[0].token_ids == reference.generate(prompts()[:1], GREEDY)[0].token_ids
    closed_cleanly(tp2_plain)
    with pytest.raises(RuntimeError, match="closed"):
        tp2_plain.generate(prompts()[:1], GREEDY)


def test_a_rank_out_of_step_at_close_is_named_with_its_error(checkpoint):
    """The final step check fails on the worker (rank 0's fingerprint is made wrong): close names
    the rank and its error, not the closed connection that rank 0's drain then meets."""
    llm = LLM(checkpoint[0], draft="none", device="cpu", engine=engine_config(), tensor_parallel_size=2)
    llm.generate(prompts()[:1], GREEDY)
    llm._ranks.last_fingerprint = lambda: 12345
    with pytest.raises(RuntimeError, match="tensor-parallel rank 1 failed: RanksDiverged"):
        llm.close()
    assert not any(w.process.is_alive() for w in llm._ranks.workers)


def assert_two_ranks_speculate_like_one_process(model_dir: str, head_dir: str, spec: SpecConfig, reference) -> None:
    """Greedy output of a 2-rank speculative engine equals the single-process plain output,
    with drafts accepted, and the ranks close cleanly."""
    llm = LLM(model_dir, draft=head_dir, spec=spec, device="cpu", engine=engine_config(), tensor_parallel_size=2)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    outs = llm.generate(prompts(), params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in reference.generate(prompts(), params)]
    assert sum(o.stats["tau"] for o in outs) / len(outs) > 1.0  # drafts were accepted
    closed_cleanly(llm)


@pytest.mark.parametrize("tree", ["chain:2", "dynamic:3,2,6", "auto"])
def test_greedy_speculative_output_equals_plain_single_process_output(checkpoint, reference, tree):
    """tree="auto" chooses by wall time: every rank must run rank 0's choice, on rank 0's clock."""
    spec = SpecConfig(tree=tree, auto_trees=TREES_AUTO) if tree == "auto" else SpecConfig(tree=tree)
    assert_two_ranks_speculate_like_one_process(checkpoint[0], checkpoint[1], spec, reference)


@dataclass(slots=True)
class ClocksThatDisagree(EngineConfig):
    """Rank 0's clock says trees pay, the workers' clocks say they do not: on rank 0 every plain
    decoding step takes 0.3 s longer, on the spawned workers every speculative step does (the
    engine reads ``overlap_decode`` once per decoding step, inside the timed part)."""

    def __getattribute__(self, name):
        if name == "overlap_decode":
            choice = sys._getframe(1).f_locals.get("choice")
            on_worker = multiprocessing.parent_process() is not None
            if choice is not None and (choice != "plain") == on_worker:
                time.sleep(0.3)
        return object.__getattribute__(self, name)


def test_auto_runs_rank_0s_choices_whatever_the_other_clocks_say(checkpoint, reference):
    """Each rank timing its own steps would choose plain decoding on the workers and trees on
    rank 0: the step check would stop the worker, and ``close`` raise."""
    engine = ClocksThatDisagree(**{f: getattr(engine_config(), f) for f in EngineConfig.__slots__})
    llm = LLM(checkpoint[0], draft=checkpoint[1], spec=SpecConfig(tree="auto", auto_trees=TREES_AUTO),
              device="cpu", engine=engine, tensor_parallel_size=2)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    outs = llm.generate(prompts(), params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in reference.generate(prompts(), params)]
    ran = {}
    for o in outs:
        for choice, n in o.stats["speculation"].items():
            ran[choice] = ran.get(choice, 0) + n
    assert sum(n for c, n in ran.items() if c != "plain") > ran.get("plain", 0), ran  # rank 0 chose trees
    closed_cleanly(llm)


def test_four_ranks_plain_and_speculative_steps(checkpoint, reference):
    llm = LLM(checkpoint[0], draft=checkpoint[1], spec=SpecConfig(tree="auto", auto_trees=TREES_AUTO),
              device="cpu", engine=engine_config(), tensor_parallel_size=4)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    outs = llm.generate(prompts()[:3], params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in reference.generate(prompts()[:3], params)]
    seeded = SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.8, seed=4)
    assert llm.generate(prompts()[:2], seeded)[1].token_ids == reference.generate(prompts()[:2], seeded)[1].token_ids
    closed_cleanly(llm)


# ------------------------------------------------------------------------------------------------
# Failures and lifetimes.
# ------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class BrokenOnWorkers(EngineConfig):
    """An engine config that cannot be read in a spawned worker (a stand-in for a rank that
    cannot load: no memory, a missing file on its host)."""

    def __getattribute__(self, name):
        if name == "attention_backend" and multiprocessing.parent_process() is not None:
            raise MemoryError("this rank has no room for the model")
        return object.__getattribute__(self, name)


@dataclass(slots=True)
class BrokenOnRank0(EngineConfig):
    """The same on rank 0 (while it loads its model, the workers' loading under way)."""

    def __getattribute__(self, name):
        if (name == "attention_backend" and multiprocessing.parent_process() is None
                and sys._getframe(1).f_code.co_name == "_load"):
            raise MemoryError("rank 0 has no room for the model")
        return object.__getattribute__(self, name)


def test_a_worker_that_fails_to_start_is_named_with_its_error(checkpoint):
    engine = BrokenOnWorkers(**{f: getattr(engine_config(), f) for f in EngineConfig.__slots__})
    before = set(multiprocessing.active_children())
    with pytest.raises(RuntimeError, match=r"^tensor-parallel rank 1 failed to start: MemoryError: this rank has no "
                                           r"room for the model$"):
        LLM(checkpoint[0], draft="none", device="cpu", engine=engine, tensor_parallel_size=2)
    assert set(multiprocessing.active_children()) <= before  # the worker is gone


def test_rank_0_failing_to_start_stops_the_workers(checkpoint):
    engine = BrokenOnRank0(**{f: getattr(engine_config(), f) for f in EngineConfig.__slots__})
    before = set(multiprocessing.active_children())
    with pytest.raises(MemoryError, match="rank 0 has no room"):
        LLM(checkpoint[0], draft="none", device="cpu", engine=engine, tensor_parallel_size=2)
    assert set(multiprocessing.active_children()) <= before


def test_a_world_size_the_model_cannot_be_split_by(checkpoint):
    before = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match=r"num_heads \(4\) must be divisible by the world size \(3\)"):
        LLM(checkpoint[0], draft="none", device="cpu", engine=engine_config(), tensor_parallel_size=3)
    assert set(multiprocessing.active_children()) <= before


def test_arguments(checkpoint):
    before = set(multiprocessing.active_children())
    target = predictable_target(seed=21)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        LLM(checkpoint[0], draft="none", device="cpu", tensor_parallel_size=0)
    for bad in ("2", 2.0, True):
        with pytest.raises(TypeError, match="tensor_parallel_size must be an int"):
            LLM(checkpoint[0], draft="none", device="cpu", tensor_parallel_size=bad)
    with pytest.raises(ValueError, match="needs a checkpoint path"):
        LLM.from_model(target, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="give the head's directory"):
        LLM(checkpoint[0], draft=eagle1_head(target, seed=5), device="cpu", tensor_parallel_size=2)
    assert LLM.from_model(target, engine=engine_config()).tensor_parallel_size == 1
    assert set(multiprocessing.active_children()) <= before  # nothing was started


RANK0_ENDS = """
import os, sys
from eaglespec import LLM, SamplingParams
from eaglespec.config import EngineConfig
if __name__ == "__main__":
    llm = LLM(sys.argv[1], draft="none", device="cpu", tensor_parallel_size=2,
              engine=EngineConfig(num_blocks=32, max_batch_size=2, max_model_len=128, attention_backend="torch"))
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3))
    print(llm._ranks.workers[0].process.pid, flush=True)
    if sys.argv[2] == "dies":
        os._exit(7)  # no close, no atexit: the worker must notice and leave on its own
    # "exits": the script ends without close(); the interpreter's exit closes the engine
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("how", ["exits", "dies"])
def test_workers_leave_when_rank_0_ends(checkpoint, tmp_path, how):
    script = tmp_path / "rank0.py"
    script.write_text(RANK0_ENDS)
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), checkpoint[0], how], capture_output=True, text=True,
                          env=env, timeout=240)
    assert proc.returncode == (7 if how == "dies" else 0), proc.stderr[-3000:]
    if how == "exits":
        assert "Traceback" not in proc.stderr and "leaked" not in proc.stderr, proc.stderr[-3000:]
    pid = int(proc.stdout.split()[-1])
    deadline = time.monotonic() + 60
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(pid), f"worker {pid} outlived its rank 0"


# ------------------------------------------------------------------------------------------------
# Front ends: the command line and the server take --tp.
# ------------------------------------------------------------------------------------------------


def test_generate_and_serve_with_tp(tiny_dirs, capsys):
    """``eaglespec generate --tp 2`` prints what ``--tp 1`` prints; ``serve --tp 2``'s engine
    thread drives rank 0's engine unchanged and answers the same completion."""
    import httpx

    from eaglespec import cli
    from eaglespec.serve.server import ServerThread, build_llm, build_server_app

    model, head = tiny_dirs
    common = ["generate", "The sea", "--model", model, "--draft", head, "--tree", "chain:2", "--max-tokens", "8",
              "--device", "cpu", "--json"]
    records = []
    for tp in ("1", "2"):
        assert cli.main(common + ["--tp", tp]) == 0
        records.append(json.loads(capsys.readouterr().out))
    assert records[0]["token_ids"] == records[1]["token_ids"] and len(records[0]["token_ids"]) == 8

    args = cli.build_parser().parse_args(["serve", "--model", model, "--draft", "none", "--device", "cpu",
                                          "--tp", "2", "--num-blocks", "32", "--max-batch-size", "2"])
    llm = build_llm(args)
    assert llm.tensor_parallel_size == 2
    app, engine = build_server_app(llm, "tiny")
    server = ServerThread(app)
    try:
        url = f"http://127.0.0.1:{server.start()}"
        reply = httpx.post(url + "/v1/completions", timeout=120,
                           json={"model": "tiny", "prompt": "The sea", "max_tokens": 8, "temperature": 0}).json()
    finally:
        server.stop()
        engine.stop()
    ref = LLM(model, draft="none", device="cpu").generate(["The sea"], SamplingParams(max_tokens=8))[0]
    assert reply["choices"][0]["text"] == ref.text
    closed_cleanly(llm)


def _group_alive(pgid: int) -> list[int]:
    """Processes of a process group that are still running (zombies excluded)."""
    alive = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(int(entry))
    return alive


@pytest.mark.parametrize("when", ["starting", "generating"])
def test_ctrl_c_in_a_terminal_stops_every_rank_quietly(tiny_dirs, when):
    """Ctrl-C reaches the whole process group: rank 0 says it was interrupted, the workers say
    nothing and leave (while they start, or while they generate)."""
    model, _ = tiny_dirs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.Popen([sys.executable, "-m", "eaglespec.cli", "generate", "Hi", "--model", model, "--draft",
                             "none", "--max-tokens", "80", "--device", "cpu", "--tp", "2"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    err = b""
    while b"eaglespec: loading" not in err:
        err += os.read(proc.stderr.fileno(), 4096)
    if when == "starting":
        time.sleep(1.0)
    else:
        os.read(proc.stdout.fileno(), 1)  # the first piece of text
    os.killpg(proc.pid, signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    err = (err + rest).decode()
    assert proc.returncode in (0, 130), err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "leaked" not in err, err
    deadline = time.monotonic() + 60
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _group_alive(proc.pid)


TORCHRUN_SCRIPT = """
import json, os, sys
from eaglespec import LLM, SamplingParams
from eaglespec.config import EngineConfig
llm = LLM(sys.argv[1], draft="none", device="cpu", tensor_parallel_size=2,
          engine=EngineConfig(num_blocks=96, max_batch_size=4, max_model_len=256, attention_backend="torch"))
# Only rank 0 gets here: the other rank followed inside LLM() and left when rank 0 closed.
out = llm.generate(json.loads(sys.argv[2]), SamplingParams(max_tokens=12, ignore_eos=True))
llm.close()
print("RANK", os.environ["RANK"], json.dumps([o.token_ids for o in out]), flush=True)
"""


def test_under_torchrun_rank_0_serves_and_the_others_follow(checkpoint, reference, tmp_path):
    import socket

    script = tmp_path / "tp_torchrun.py"
    script.write_text(TORCHRUN_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-addr", "127.0.0.1", "--master-port", str(port), str(script), checkpoint[0],
                             json.dumps(prompts()[:2])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None or _group_alive(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its ranks
    assert proc.returncode == 0, err[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("RANK ")]
    assert len(lines) == 1 and lines[0].startswith("RANK 0 "), out
    ref = reference.generate(prompts()[:2], SamplingParams(max_tokens=12, ignore_eos=True))
    assert json.loads(lines[0].split(" ", 2)[2]) == [o.token_ids for o in ref]
