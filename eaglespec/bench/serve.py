"""Load generator for a running ``eaglespec serve`` (or any OpenAI-compatible server).

    eaglespec bench serve --url http://127.0.0.1:8000 --label spec

At each concurrency (1, 2, 4, ..., 64) ``c`` clients stream chat completions back to back
(httpx, server-sent events) until ``max(c * requests_per_client, min_requests)`` requests have
completed. Prompts: MT-bench first turns and ShareGPT conversations from index 16,000 on (past
the ones the shipped head was trained on); each request's output length is its source reply's
length (ShareGPT: the first reply, about 4 characters a token; MT-bench, which has no replies:
``--mtbench-tokens``), generated with ``ignore_eos`` so that every run (speculation on or off)
produces the same number of tokens. Reported per concurrency: output tokens/s, TTFT and TPOT
p50/p99, tau (from the server's /metrics) — and checked: every request completed with its
token count, and ``c`` requests really were in flight at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from dataclasses import dataclass

SHAREGPT_HELD_OUT_START = 16000
CHARS_PER_TOKEN = 4


@dataclass(slots=True)
class BenchPrompt:
    messages: list[dict]
    max_tokens: int
    source: str


@dataclass(slots=True)
class RequestResult:
    ok: bool
    tokens: int
    ttft_s: float
    tpot_s: float  # (last token - first token) / (tokens - 1); 0 for one token
    latency_s: float
    error: str = ""


def load_prompts(num_sharegpt: int, mtbench: bool, min_tokens: int, max_tokens: int, mtbench_tokens: int,
                 max_prompt_chars: int = 6000) -> list[BenchPrompt]:
    """MT-bench first turns, then ShareGPT conversations from index 16,000 with their reply lengths."""
    from eaglespec.train.data import iter_sharegpt, load_conversations

    prompts = []
    if mtbench:
        for turns in load_conversations("mtbench"):
            if turns:
                prompts.append(BenchPrompt([{"role": "user", "content": turns[0]}], mtbench_tokens, "mtbench"))
    records = iter_sharegpt(None, SHAREGPT_HELD_OUT_START, None) if num_sharegpt > 0 else iter(())
    for record in records:
        if len([p for p in prompts if p.source == "sharegpt"]) >= num_sharegpt:
            break
        turns = record.get("conversations") or []
        if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
            continue
        question, reply = turns[0].get("value") or "", turns[1].get("value") or ""
        if not question.strip() or not reply.strip() or len(question) > max_prompt_chars:
            continue
        length = min(max(len(reply) // CHARS_PER_TOKEN, min_tokens), max_tokens)
        prompts.append(BenchPrompt([{"role": "user", "content": question}], length, "sharegpt"))
    if not prompts:
        raise ValueError("no benchmark prompts: enable MT-bench or ask for ShareGPT conversations")
    random.Random(0).shuffle(prompts)  # every level, however short, sees both sources
    return prompts


def write_prompts(prompts: list[BenchPrompt], path: str) -> None:
    """The chosen prompts as JSON lines (messages, max_tokens, source), to carry to a machine
    without the data packages (``--prompts``)."""
    with open(path, "w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps({"messages": p.messages, "max_tokens": p.max_tokens, "source": p.source},
                               ensure_ascii=False) + "\n")


def read_prompts(path: str) -> list[BenchPrompt]:
    with open(path, encoding="utf-8") as f:
        prompts = [BenchPrompt(r["messages"], int(r["max_tokens"]), r.get("source", path))
                   for r in map(json.loads, filter(str.strip, f))]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); 0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


async def _one_request(client, url: str, model: str, prompt: BenchPrompt, timeout_s: float) -> RequestResult:
    body = {"model": model, "messages": prompt.messages, "max_tokens": prompt.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=timeout_s) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                return RequestResult(False, 0, 0, 0, time.perf_counter() - t0, f"HTTP {resp.status_code}: {text[:200]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return RequestResult(False, 0, 0, 0, time.perf_counter() - t0, chunk["error"]["message"])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    now = time.perf_counter()
                    first = first or now
                    last = now
    except Exception as exc:  # noqa: BLE001 - recorded as a failed request
        return RequestResult(False, tokens, 0, 0, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    if first is None:
        return RequestResult(False, tokens, 0, 0, end - t0, "no tokens streamed")
    tpot = (last - first) / (tokens - 1) if tokens > 1 else 0.0
    ok = tokens == prompt.max_tokens
    return RequestResult(ok, tokens, first - t0, tpot, end - t0,
                         "" if ok else f"{tokens} tokens instead of {prompt.max_tokens}")


def _scrape(text: str) -> dict[str, float]:
    """name{labels} -> value of a Prometheus text page."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


CLIENTS_PER_PROCESS = 8  # one asyncio process parses this many SSE streams without falling behind a fast server


@dataclass(slots=True)
class _Shared:
    """Counters the client processes share: the next request to send, and how many are in flight."""

    next_index: object  # multiprocessing.Value("i")
    in_flight: object
    peak_in_flight: object
    start: object  # multiprocessing.Barrier: every process ready, then the clock starts


def _take(value, limit: int | None = None) -> int | None:
    """Atomically: value += 1 and return the old value (None if it had reached ``limit``)."""
    with value.get_lock():
        if limit is not None and value.value >= limit:
            return None
        value.value += 1
        return value.value - 1


async def _clients(url: str, model: str, prompts: list[BenchPrompt], clients: int, num_requests: int,
                   timeout_s: float, shared: _Shared) -> list[RequestResult]:
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    results: list[RequestResult] = []
    async with httpx.AsyncClient(limits=limits, timeout=timeout_s) as client:

        async def worker():
            while (i := _take(shared.next_index, num_requests)) is not None:
                now = _take(shared.in_flight) + 1
                with shared.peak_in_flight.get_lock():
                    shared.peak_in_flight.value = max(shared.peak_in_flight.value, now)
                try:
                    results.append(await _one_request(client, url, model, prompts[i % len(prompts)], timeout_s))
                finally:
                    with shared.in_flight.get_lock():
                        shared.in_flight.value -= 1

        await asyncio.to_thread(shared.start.wait)
        await asyncio.gather(*(worker() for _ in range(clients)))
    return results


def _client_process(index, url, model, prompts, clients, num_requests, timeout_s, shared, out) -> None:
    """Runs ``clients`` clients; puts (index, results as tuples) or (index, error text) on ``out``."""
    try:
        out.put((index, [tuple(getattr(r, f) for f in RequestResult.__slots__) for r in
                         asyncio.run(_clients(url, model, prompts, clients, num_requests, timeout_s, shared))]))
    except BaseException as exc:  # noqa: BLE001 - the parent reports it
        shared.start.abort()
        out.put((index, f"{type(exc).__name__}: {exc}"))


def _next_part(out, workers, reported: set[int]) -> list | str:
    """The next client process's results (or its error text); an error text too when a process
    died without reporting (killed), instead of waiting for it forever."""
    import queue

    while True:
        try:
            index, part = out.get(timeout=1.0)
            reported.add(index)
            return part
        except queue.Empty:
            dead = [k for k, w in enumerate(workers) if k not in reported and w.exitcode not in (None, 0)]
            if dead:
                reported.add(dead[0])
                return f"client process {dead[0]} died with exit code {workers[dead[0]].exitcode}"


async def run_level(url: str, model: str, prompts: list[BenchPrompt], concurrency: int, num_requests: int,
                    timeout_s: float, clients_per_process: int = CLIENTS_PER_PROCESS) -> dict:
    """``concurrency`` clients, back to back, until ``num_requests`` are done. The clients are
    spread over processes (``clients_per_process`` each) so that parsing the streams in Python
    never becomes what is measured."""
    import multiprocessing as mp

    import httpx

    ctx = mp.get_context("spawn")
    procs = math.ceil(concurrency / clients_per_process)
    shared = _Shared(ctx.Value("i", 0), ctx.Value("i", 0), ctx.Value("i", 0), ctx.Barrier(procs + 1))
    out = ctx.Queue()
    split = [concurrency // procs + (k < concurrency % procs) for k in range(procs)]
    workers = [ctx.Process(target=_client_process, daemon=True,
                           args=(k, url, model, prompts, n, num_requests, timeout_s, shared, out))
               for k, n in enumerate(split)]
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        before = _scrape((await client.get(f"{url}/metrics")).text)
        server_running: list[float] = []

        async def watch():  # how many the server itself runs at once
            while True:
                await asyncio.sleep(0.5)
                try:
                    m = _scrape((await client.get(f"{url}/metrics")).text)
                    server_running.append(m.get("eaglespec_num_requests_running", 0.0))
                except Exception:  # noqa: BLE001 - a missed sample is no failure
                    pass

        for w in workers:
            w.start()
        try:
            await asyncio.to_thread(shared.start.wait)
        except Exception:  # noqa: BLE001 - a client process failed before the start; its error follows
            pass
        watcher = asyncio.create_task(watch())
        t0 = time.perf_counter()
        reported: set[int] = set()
        parts = [await asyncio.to_thread(_next_part, out, workers, reported) for _ in workers]
        elapsed = time.perf_counter() - t0
        watcher.cancel()
        for w in workers:
            w.join()
        errors = [p for p in parts if isinstance(p, str)]
        if errors:
            raise RuntimeError(f"concurrency {concurrency}: a client process failed: {errors[0]}")
        results = [RequestResult(*fields) for part in parts for fields in part]
        max_in_flight = shared.peak_in_flight.value
        after = _scrape((await client.get(f"{url}/metrics")).text)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    forwards = delta("eaglespec_decode_forwards_total")
    # The largest decoding step of this level, from the server's batch-size histogram: at most
    # the first bucket bound that holds every step, more than the bound before it.
    bounds = sorted((float(k.split("le=")[1].rstrip("}")), k) for k in after
                    if k.startswith("eaglespec_step_batch_size_bucket{") and "+Inf" not in k)
    total = delta("eaglespec_step_batch_size_count")
    peak_bound = next((b for b, k in bounds if total and delta(k) == total), float("inf") if total else 0.0)
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    depth_rates = {}
    for key in after:
        if key.startswith("eaglespec_spec_proposed_total{"):
            acc = key.replace("proposed", "accepted")
            proposed = delta(key)
            if proposed:
                depth_rates[key.split("depth=")[1].rstrip("}")] = delta(acc) / proposed
    return {
        "concurrency": concurrency, "requests": len(results), "completed": len(ok),
        "failed": [r.error for r in results if not r.ok][:5], "max_in_flight": max_in_flight,
        "server_max_running": max(server_running, default=0.0),
        "server_peak_step_bound": peak_bound, "server_max_batch_size": after.get("eaglespec_max_batch_size", 0.0),
        "seconds": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed,
        "requests_per_s": len(ok) / elapsed,
        "ttft_p50_ms": 1000 * percentile([r.ttft_s for r in ok], 50),
        "ttft_p99_ms": 1000 * percentile([r.ttft_s for r in ok], 99),
        "tpot_p50_ms": 1000 * percentile([r.tpot_s for r in ok if r.tokens > 1], 50),
        "tpot_p99_ms": 1000 * percentile([r.tpot_s for r in ok if r.tokens > 1], 99),
        "tau": delta("eaglespec_decode_tokens_total") / forwards if forwards else 0.0,
        "accept_rate_per_depth": [depth_rates[k] for k in sorted(depth_rates, key=int)],
    }


def check_level(row: dict) -> None:
    """The run measured what its label says: all requests completed, ``c`` really concurrent."""
    c = row["concurrency"]
    if row["completed"] != row["requests"]:
        raise RuntimeError(f"concurrency {c}: {row['requests'] - row['completed']} of {row['requests']} requests "
                           f"failed or came back short: {row['failed']}")
    if row["max_in_flight"] != c:
        raise RuntimeError(f"concurrency {c}: at most {row['max_in_flight']} requests were in flight at once")
    # The server batched them: its largest step ran more than half of min(c, its max batch) requests.
    want = min(c, row.get("server_max_batch_size") or c)
    if row.get("server_peak_step_bound", want) < want:
        raise RuntimeError(f"concurrency {c}: the server's largest step ran at most {row['server_peak_step_bound']:.0f} "
                           f"requests (clients: {c}, server max batch: {row.get('server_max_batch_size'):.0f})")


def add_bench_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--prompts", default=None, help="prompts written by --write-prompts (instead of the data packages)")
    p.add_argument("--write-prompts", default=None, help="write the chosen prompts to this .jsonl and stop")
    p.add_argument("--label", default="", help="what is served (spec, plain, ...), in the result name")
    p.add_argument("--concurrency", default="1,2,4,8,16,32,64")
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--min-requests", type=int, default=16, help="per concurrency level")
    p.add_argument("--sharegpt", type=int, default=256, help="ShareGPT conversations (from index 16,000)")
    p.add_argument("--no-mtbench", action="store_true")
    p.add_argument("--mtbench-tokens", type=int, default=256, help="output length of MT-bench prompts")
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the unmeasured round of short requests before each level")
    p.add_argument("--device", default=None, help="the server's device, for the result name (default: local)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--compare", default=None, help="another bench-serve JSON to draw in the same plot")
    p.add_argument("--no-plot", action="store_true")


def cmd_bench_serve(args) -> int:
    import httpx
    import torch

    from eaglespec.bench.results import slug, write_result

    prompts = (read_prompts(args.prompts) if args.prompts else
               load_prompts(args.sharegpt, not args.no_mtbench, args.min_tokens, args.max_tokens, args.mtbench_tokens))
    if args.write_prompts:
        write_prompts(prompts, args.write_prompts)
        print(f"wrote {len(prompts)} prompts to {args.write_prompts}")
        return 0
    if not args.url:
        raise ValueError("bench serve: --url is required (or --write-prompts)")
    url = args.url.rstrip("/")
    info = httpx.get(f"{url}/v1/models", timeout=30).json()
    model = info["data"][0]["id"]
    metrics = _scrape(httpx.get(f"{url}/metrics", timeout=30).text)
    tree = next((k.split("tree=")[1].rstrip("}") for k in metrics if k.startswith("eaglespec_speculation_info")),
                "unknown")
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.label in ("spec", "plain") and (args.label == "plain") != (tree == "none"):
        raise RuntimeError(f"--label {args.label} but the server's speculation is {tree!r}")
    print(f"bench serve: {model} at {url}, speculation {tree}, {len(prompts)} prompts", flush=True)
    rows = []
    for c in levels:
        n = max(c * args.requests_per_client, args.min_requests)
        if args.warmup:  # c short requests at once first: the batch buckets up to c are compiled/captured
            short = [BenchPrompt(p.messages, min(8, p.max_tokens), p.source) for p in prompts[:c]]
            asyncio.run(run_level(url, model, short, c, c, args.timeout))
        row = asyncio.run(run_level(url, model, prompts, c, n, args.timeout))
        check_level(row)
        rows.append(row)
        print(f"concurrency {c:3d}: {row['output_tokens_per_s']:8.1f} tok/s  TTFT p50 {row['ttft_p50_ms']:7.1f} "
              f"p99 {row['ttft_p99_ms']:7.1f} ms  TPOT p50 {row['tpot_p50_ms']:6.2f} p99 {row['tpot_p99_ms']:6.2f} ms  "
              f"tau {row['tau']:.2f}  (server ran up to {row['server_max_running']:.0f})", flush=True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    label = args.label or ("plain" if tree == "none" else "spec")
    path = write_result(f"serve-{slug(model)}-{label}", {
        "url": url, "model": model, "label": label, "speculation": tree, "prompts": len(prompts),
        "prompts_file": args.prompts,
        "sources": {"mtbench": not args.no_mtbench, "sharegpt_from": SHAREGPT_HELD_OUT_START,
                    "sharegpt": args.sharegpt}, "output_tokens": [args.min_tokens, args.max_tokens],
        "rows": rows}, device, args.out)
    print("wrote", path)
    if not args.no_plot:
        from eaglespec.bench.plots import plot_serve

        print("plot", plot_serve([path] + ([args.compare] if args.compare else [])))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_serve_args(ap)
    return cmd_bench_serve(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
