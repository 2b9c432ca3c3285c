"""Command line: ``eaglespec generate | chat | serve | bench``."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF directory or .gguf file (default: embedded SmolLM2-135M)")
    p.add_argument("--draft", default=None, help="EAGLE head directory, or 'none' to turn speculation off")
    p.add_argument("--tree", default=None, help="chain:K | dynamic:DEPTH,TOPK,NODES | choices.json")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when present)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object with text, tokens and stats")


def _build_llm(args):
    from eaglespec import LLM, SpecConfig

    spec = SpecConfig(tree=args.tree) if args.tree else None
    return LLM(model=args.model, draft=args.draft, spec=spec, device=args.device, dtype=args.dtype)


def _params(args):
    from eaglespec import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_tokens, seed=args.seed)


def _print_output(out, args, elapsed: float) -> None:
    if args.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                          **out.stats}, ensure_ascii=False))
    else:
        print(out.text)
        s = out.stats
        rates = ", ".join(f"{r:.2f}" for r in s["accept_rate_per_depth"]) or "-"
        print(f"[{s['new_tokens']} tokens, {s['ms_per_token']:.1f} ms/token, tau {s['tau']:.2f}, "
              f"acceptance per depth: {rates}, {elapsed:.1f} s]", file=sys.stderr)
    if out.error:
        print(f"error: {out.error}", file=sys.stderr)


def cmd_generate(args) -> int:
    llm = _build_llm(args)
    params = _params(args)
    t0 = time.perf_counter()
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params)
    else:
        out = llm.generate([args.prompt], params)[0]
    _print_output(out, args, time.perf_counter() - t0)
    return 1 if out.error else 0


def cmd_chat(args) -> int:
    if args.url:
        return chat_over_http(args)
    llm = _build_llm(args)
    params = _params(args)
    messages = []
    print("eaglespec chat: an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        t0 = time.perf_counter()
        out = llm.chat(messages, params)
        messages.append({"role": "assistant", "content": out.text})
        _print_output(out, args, time.perf_counter() - t0)
    return 0


def chat_over_http(args) -> int:
    """``eaglespec chat --url``: the same loop against a running server (streamed replies)."""
    import openai

    client = openai.OpenAI(base_url=args.url.rstrip("/") + "/v1", api_key="none")
    model = client.models.list().data[0].id
    messages = []
    print(f"eaglespec chat with {model} at {args.url}: an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = []
        for chunk in client.chat.completions.create(model=model, messages=messages, stream=True,
                                                    max_tokens=args.max_tokens, temperature=args.temperature,
                                                    top_p=args.top_p, seed=args.seed,
                                                    extra_body={"top_k": args.top_k}):
            piece = chunk.choices[0].delta.content if chunk.choices else None
            if piece:
                reply.append(piece)
                print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eaglespec", description="EAGLE speculative decoding for Llama")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a completion for one prompt")
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_model_args(g)
    _add_sampling_args(g)
    g.set_defaults(fn=cmd_generate)
    c = sub.add_parser("chat", help="interactive chat")
    _add_model_args(c)
    _add_sampling_args(c)
    c.add_argument("--url", default=None, help="talk to a running `eaglespec serve` (e.g. http://127.0.0.1:8000)")
    c.set_defaults(fn=cmd_chat)
    from eaglespec.serve.server import add_serve_args, cmd_serve

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    _add_model_args(s)
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
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"eaglespec: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
