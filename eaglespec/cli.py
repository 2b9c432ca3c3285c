"""Command line: ``eaglespec generate | chat | serve | bench serve | train``.

    eaglespec generate PROMPT        one completion, streamed to stdout (PROMPT "-": stdin)
    eaglespec chat [--url URL]       interactive chat with line editing, replies streamed
    eaglespec serve                  OpenAI-compatible HTTP server
    eaglespec bench serve            load generator against a running server
    eaglespec train prepare|fit|eval|all --config FILE.toml     train an EAGLE draft head

Text goes to stdout and everything else (loading progress, statistics, errors) to stderr, so
``--json`` output is pure JSON. A mistake the user can make (an argument, a file, a device,
undecodable text) ends with one line ``eaglespec: error: ...`` and exit status 2, no traceback;
Ctrl-C ends quietly (status 130 in ``generate``, 0 in ``chat``, where it is the way out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

TREE_HELP = """\
the draft tree verified by one target forward:
  auto                     the default: each step runs plain decoding or one of the trees
                           {auto}, whichever measures the most tokens/s for the batch at hand
  chain:K                  K draft tokens in a line (1 <= K <= {max_chain})
  dynamic:DEPTH,TOPK,NODES EAGLE-2 dynamic tree: the head drafts DEPTH levels (a step emits at
                           most DEPTH + 1 tokens), expands the TOPK best tokens of the TOPK best
                           nodes per level, and the target verifies the NODES draft tokens of
                           highest joint probability; all >= 1, NODES <= {max_chain},
                           DEPTH * TOPK <= {max_nodes}
  FILE.json                a static tree: a JSON list of paths of child ranks (EAGLE/Medusa
                           choices), at most {max_chain} nodes
a tree other than auto runs on every step"""


def _tree_help() -> str:
    from eaglespec.config import AUTO_TREES
    from eaglespec.speculative.tree import MAX_TREE_NODES

    return TREE_HELP.format(max_chain=MAX_TREE_NODES - 1, max_nodes=MAX_TREE_NODES, auto=", ".join(AUTO_TREES))


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("eaglespec")
    except Exception:  # not installed as a distribution (a source checkout on sys.path)
        from eaglespec import __version__

        return __version__


# ---------------------------------------------------------------------------------------------
# Arguments.
# ---------------------------------------------------------------------------------------------


def _add_model_args(p: argparse.ArgumentParser, max_model_len: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="Hugging Face safetensors directory or .gguf file "
                                                 "(default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--draft", default=None, help="EAGLE head directory, or 'none' for plain decoding "
                                                 "(default: the shipped head with the default model)")
    g.add_argument("--tree", default=None, metavar="SPEC", help=_tree_help())
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    g.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bfloat16 on "
                                                 "CUDA, float32 on the CPU)")
    g.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor parallelism: run the model on N GPUs (cuda:0..N-1; pick them with "
                        "CUDA_VISIBLE_DEVICES), or N CPU processes; under torchrun, the job's N processes "
                        "(default 1)")
    if not max_model_len:  # the server sizes its engine with its own options
        return
    g.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help="most tokens of a sequence, prompt and reply together (default: the model's "
                        "context length from its config, e.g. 8192 for SmolLM2); a reply that reaches it "
                        "ends with finish_reason 'length', a longer prompt is an error")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128, help="most new tokens (default 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus cut in (0, 1] (default 1: none)")
    g.add_argument("--top-k", type=int, default=0, help="keep the K most likely tokens (default 0: all)")
    g.add_argument("--seed", type=int, default=None, help="same seed, same output (default: random)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when the reply contains TEXT (not included); may be repeated")
    g.add_argument("--system", default=None, metavar="TEXT", help="system message of the chat template")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object per reply (text, token_ids, finish_reason and the stats: "
                        "see the README) instead of streaming text")


def _checked_text(value: str | None, what: str) -> str | None:
    """Command-line text; undecodable bytes (kept by Python as lone surrogates) are an error."""
    if value is not None:
        from eaglespec.tokenizer import check_unicode

        check_unicode(value, what)
    return value


def _read_prompt(args) -> str:
    if args.prompt_file is not None and args.prompt is not None:
        raise ValueError("give the prompt as an argument or with --prompt-file, not both")
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ValueError(f"--prompt-file {args.prompt_file!r}: {exc.strerror}") from None
        source = f"--prompt-file {args.prompt_file!r}"
    elif args.prompt == "-":
        data, source = sys.stdin.buffer.read(), "the prompt read from stdin"
    elif args.prompt is None:
        raise ValueError("no prompt: give PROMPT, '-' to read it from stdin, or --prompt-file PATH")
    else:
        return _checked_text(args.prompt, "the prompt")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{source} is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None


def _params(args):
    from eaglespec import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_tokens, seed=args.seed,
                          stop=tuple(_checked_text(s, "--stop") for s in args.stop))


def _build_llm(args):
    """Check the arguments, then load (progress on stderr)."""
    from eaglespec import LLM, EngineConfig, SpecConfig
    from eaglespec.engine.llm import check_speculation_args, resolve_device

    if args.max_model_len is not None and args.max_model_len < 1:
        raise ValueError(f"--max-model-len must be >= 1, got {args.max_model_len}")
    # --tree auto is the default (SpecConfig's): None, so that --draft none with it is no error.
    spec = SpecConfig(tree=args.tree) if args.tree not in (None, "auto") else None
    check_speculation_args(args.draft, spec, default_draft=args.model is None)  # before the weights load
    device = resolve_device(args.device)
    engine = EngineConfig(max_model_len=args.max_model_len or 0)
    what = args.model or "the embedded SmolLM2-135M-Instruct"
    where = f"{args.tp} ranks ({device.type})" if args.tp != 1 else str(device)
    print(f"eaglespec: loading {what} on {where} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    llm = LLM(model=args.model, draft=args.draft, spec=spec, device=device, dtype=args.dtype, engine=engine,
              progress=sys.stderr.isatty(), tensor_parallel_size=args.tp)
    draft = f"tree {llm.spec_config.tree}" if llm.speculative is not None else "plain decoding (no draft head)"
    print(f"eaglespec: ready in {time.perf_counter() - t0:.1f} s: {draft}, max_model_len "
          f"{llm.engine_config.max_model_len}", file=sys.stderr, flush=True)
    return llm


# ---------------------------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------------------------


def output_record(out) -> dict:
    """The ``--json`` object of one reply: text, token ids, finish reason, every stats key."""
    return {"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason, **out.stats}


def stats_line(out, max_model_len: int) -> str:
    """The one-line summary printed on stderr after a reply."""
    s = out.stats
    reason = out.finish_reason
    if reason == "length" and s["prompt_tokens"] + s["new_tokens"] >= max_model_len:
        reason = f"length (context limit max_model_len {max_model_len} reached)"
    parts = [f"{s['prompt_tokens']} prompt + {s['new_tokens']} new tokens",
             f"first token {s['ttft_ms']:.0f} ms (prefill {s['prefill_ms']:.0f} ms)"]
    if s["decode_forwards"]:
        parts.append(f"decode {s['decode_tokens']} tokens in {s['decode_ms']:.0f} ms: {s['ms_per_token']:.1f} "
                     f"ms/token, {s['tokens_per_s']:.1f} tokens/s, tau {s['tau']:.2f} over "
                     f"{s['decode_forwards']} forwards")
    if s["accept_rate_per_depth"]:
        parts.append("acceptance per depth " + " ".join(f"{r:.2f}" for r in s["accept_rate_per_depth"]))
    parts.append(f"finish: {reason}")
    return "[" + " | ".join(parts) + "]"


def _reply(llm, prompt, params, args) -> object:
    """Generate one reply: streamed to stdout as text, or one JSON line with --json."""
    stream = llm.stream(prompt, params)
    if args.json:
        for _ in stream:
            pass
        out = stream.output
        print(json.dumps(output_record(out), ensure_ascii=False), flush=True)
    else:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        out = stream.output
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(stats_line(out, llm.engine_config.max_model_len), file=sys.stderr, flush=True)
    if out.error:
        print(f"eaglespec: error: {out.error}", file=sys.stderr)
    return out


def _messages(system: str | None) -> list[dict]:
    return [{"role": "system", "content": system}] if system else []


# ---------------------------------------------------------------------------------------------
# Commands.
# ---------------------------------------------------------------------------------------------


def cmd_generate(args) -> int:
    prompt_text = _read_prompt(args)
    system = _checked_text(args.system, "--system")
    if system is not None and not args.chat:
        raise ValueError("--system goes with --chat (a system message belongs to the chat template)")
    params = _params(args)
    llm = _build_llm(args)
    with llm:  # stops the other ranks under --tp
        prompt = llm.chat_prompt(_messages(system) + [{"role": "user", "content": prompt_text}]) if args.chat \
            else prompt_text
        out = _reply(llm, prompt, params, args)
    return 1 if out.error else 0


def _read_line(prompt: str, json_mode: bool) -> str:
    """One line of user input with line editing (readline); with --json the prompt goes to
    stderr so stdout carries nothing but JSON."""
    if json_mode:
        if sys.stdin.isatty():
            sys.stderr.write(prompt)
            sys.stderr.flush()
        return input()
    return input(prompt if sys.stdin.isatty() else "")


def cmd_chat(args) -> int:
    try:
        import readline  # noqa: F401  (arrow keys, history and editing for input())
    except ImportError:  # not on every platform
        pass
    system = _checked_text(args.system, "--system")
    if args.url:
        reply = _http_replier(args)
    else:
        params = _params(args)
        llm = _build_llm(args)

        def reply(messages: list[dict]) -> str:
            return _reply(llm, llm.chat_prompt(messages), params, args).text
    messages = _messages(system)
    print("eaglespec chat: an empty line, Ctrl-D or Ctrl-C ends.", file=sys.stderr, flush=True)
    try:
        while True:
            try:
                line = _read_line("> ", args.json)
            except EOFError:
                break
            if not line.strip():
                break
            try:
                _checked_text(line, "the message")
            except ValueError as exc:
                print(f"eaglespec: error: {exc}", file=sys.stderr)
                continue
            messages.append({"role": "user", "content": line})
            messages.append({"role": "assistant", "content": reply(messages)})
    except KeyboardInterrupt:
        print("\neaglespec: interrupted, bye", file=sys.stderr)
    return 0


def _http_replier(args):
    """``chat --url``: replies from a running ``eaglespec serve``, streamed (text only)."""
    import openai

    if args.json:
        raise ValueError("chat --url streams text; --json needs the local engine's stats")
    client = openai.OpenAI(base_url=args.url.rstrip("/") + "/v1", api_key="none")
    model = client.models.list().data[0].id
    print(f"eaglespec: chatting with {model} at {args.url}", file=sys.stderr, flush=True)

    def reply(messages: list[dict]) -> str:
        pieces = []
        for chunk in client.chat.completions.create(model=model, messages=messages, stream=True,
                                                    max_tokens=args.max_tokens, temperature=args.temperature,
                                                    top_p=args.top_p, seed=args.seed, stop=args.stop or None,
                                                    extra_body={"top_k": args.top_k}):
            piece = chunk.choices[0].delta.content if chunk.choices else None
            if piece:
                pieces.append(piece)
                print(piece, end="", flush=True)
        print()
        return "".join(pieces)
    return reply


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eaglespec", formatter_class=argparse.RawTextHelpFormatter,
        description="EAGLE speculative decoding for Llama models: the target's own output from fewer "
                    "target forwards.\nText goes to stdout; progress, statistics and errors to stderr.")
    parser.add_argument("--version", action="version", version=f"eaglespec {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,chat,serve,bench,train}")
    g = sub.add_parser("generate", help="one completion, streamed", formatter_class=argparse.RawTextHelpFormatter,
                       description="Generate a completion for one prompt, streamed to stdout as it is produced.")
    g.add_argument("prompt", nargs="?", default=None, help="the prompt text, or '-' to read it from stdin")
    g.add_argument("--prompt-file", default=None, metavar="PATH", help="read the prompt from a UTF-8 file")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_model_args(g)
    _add_sampling_args(g)
    g.set_defaults(fn=cmd_generate)
    c = sub.add_parser("chat", help="interactive chat, streamed", formatter_class=argparse.RawTextHelpFormatter,
                       description="Interactive chat (line editing and history through readline). An empty "
                                   "line, Ctrl-D or Ctrl-C ends it.")
    _add_model_args(c)
    _add_sampling_args(c)
    c.add_argument("--url", default=None, help="talk to a running `eaglespec serve` (e.g. http://127.0.0.1:8000)")
    c.set_defaults(fn=cmd_chat)
    from eaglespec.serve.server import add_serve_args, cmd_serve

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server", formatter_class=argparse.RawTextHelpFormatter)
    _add_model_args(s, max_model_len=False)
    add_serve_args(s)
    s.set_defaults(fn=cmd_serve)
    b = sub.add_parser("bench", help="benchmarks")
    bench = b.add_subparsers(dest="bench", required=True)
    from eaglespec.bench.serve import add_bench_serve_args, cmd_bench_serve

    bs = bench.add_parser("serve", help="load generator against a running server")
    add_bench_serve_args(bs)
    bs.set_defaults(fn=cmd_bench_serve)
    from eaglespec.train.cli import add_train_commands

    add_train_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.fn(args)
    except KeyboardInterrupt:
        print("\neaglespec: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError) as exc:
        print(f"eaglespec: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
