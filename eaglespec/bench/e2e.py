"""End-to-end speed on real prompts: speculative decoding against plain decoding, same machine.

Default: the embedded SmolLM2-135M-Instruct with its shipped head, MT-bench first turns (chat
template applied), greedy (or --temperature/--top-p, one seed per prompt), 256 new tokens,
batch sizes 1 to 64. For each batch size the same prompts run through plain decoding, each
speculative engine (``auto`` by default: the tree, or plain decoding, chosen per step) and plain
decoding again; reported: tokens/s, tau, acceptance per depth, speedup over the mean of the two
plain runs and their spread, the speculation each step chose, the engine steps and their host
time by the number of requests left running (the full batch against its tail),
and how many outputs are token-for-token identical to plain decoding (bf16 kernels may flip
near-tied argmaxes between the two paths; fp32 on the CPU is exact, see the tests).
``--draft-vocab 4096,8192,16384,full`` runs every tree once per draft vocabulary size (the head
drafts over that many of its most frequent tokens; full = its whole vocabulary; without the
option, what its config says); ``--heads shipped=DIR;retrained=DIR`` runs every tree with each
head, side by side.
"""

from __future__ import annotations

import argparse
import time

import torch

from eaglespec import LLM, EngineConfig, SamplingParams, SpecConfig
from eaglespec.bench.results import write_result
from eaglespec.engine.graphs import bucket_for
from eaglespec.engine.llm import shipped_head_path
from eaglespec.engine.request import pooled_speculation
from eaglespec.models.eagle import EagleHead, load_head
from eaglespec.train.data import load_conversations


FULL_VOCAB = "full"


def parse_draft_vocabs(text: str) -> list[int | str | None]:
    """``--draft-vocab``: comma-separated sizes ("4096", "8k" = 8192), "full" (the head's whole
    vocabulary, FULL_VOCAB) or "default" (None: what the head's config says)."""
    sizes: list[int | str | None] = []
    for item in (t.strip().lower() for t in text.split(",") if t.strip()):
        if item in (FULL_VOCAB, "default"):
            sizes.append(FULL_VOCAB if item == FULL_VOCAB else None)
            continue
        try:
            n = int(item[:-1]) * 1024 if item.endswith("k") else int(item)
        except ValueError:
            raise ValueError(f"--draft-vocab: {item!r} is not a size (4096, 8k), 'full' or 'default'") from None
        if n < 1:
            raise ValueError(f"--draft-vocab: sizes must be >= 1, got {item!r}")
        sizes.append(n)
    return sizes or [None]


def draft_vocab_size_for(size: int | str | None, head: EagleHead) -> int | None:
    """One parsed ``--draft-vocab`` item as SpecConfig.draft_vocab_size for this head."""
    return head.own_vocab_size if size == FULL_VOCAB else size


def parse_heads(text: str) -> dict[str, str]:
    """``--heads``: "NAME=DIR;NAME=DIR" -> {name: directory}; empty: the shipped head."""
    heads: dict[str, str] = {}
    for item in (t.strip() for t in text.split(";") if t.strip()):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--heads: expected NAME=DIR, got {item!r}")
        heads[name] = path
    return heads or {"shipped": shipped_head_path()}


def run_batch(llm: LLM, prompts: list[list[int]], batch: int, params: list[SamplingParams]) -> dict:
    """Generate every prompt, ``batch`` at a time; wall time includes everything the engine does.

    Checks that there are at least ``batch`` prompts and that each group of ``batch`` prompts
    really ran as one batch (all of them running at once at some step), so a row labelled batch
    64 measured 64 sequences (and then the remainder as a last, smaller group)."""
    if len(prompts) < batch:  # the whole run would be one smaller batch, labelled as this one
        raise ValueError(f"e2e: batch {batch} needs at least {batch} prompts, got {len(prompts)} (--num)")
    outs = []
    # Engine steps and host wall time by the number of requests running after the step: where a
    # slow run spent its time (the full batch or its tail), as the host saw it.
    by_running: dict[int, list] = {}
    sync = torch.cuda.synchronize if llm.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        group = prompts[i:i + batch]
        ids = [llm.add_request(p, sp) for p, sp in zip(group, params[i:i + batch])]
        peak = 0
        while llm.has_work:
            t_step = time.perf_counter()
            llm.step()
            running = len(llm.scheduler.running)
            entry = by_running.setdefault(running, [0, 0.0])
            entry[0] += 1
            entry[1] += time.perf_counter() - t_step
            peak = max(peak, running)
        if peak != len(group):
            raise RuntimeError(f"e2e: a batch of {len(group)} prompts ran at most {peak} at once")
        outs += [llm.collect(j) for j in ids]
    sync()
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    forwards = sum(o.stats["target_forwards"] for o in outs)
    head = pooled_speculation([o.stats for o in outs])
    chosen: dict[str, int] = {}  # decoding steps per tree (or plain), summed over requests
    for o in outs:
        for choice, n in o.stats.get("speculation", {}).items():
            chosen[choice] = chosen.get(choice, 0) + n
    return {"outputs": outs, "tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed,
            # tau: the run's tokens per target forward; per speculative step: the head's (design note 63)
            "tau": tokens / max(forwards, 1), "tokens_per_speculative_step": head["tau"],
            "accept_rate_per_depth": head["accept_rate_per_depth"], "speculation": chosen,
            "steps_by_running": {n: {"steps": c, "seconds": t} for n, (c, t) in sorted(by_running.items())}}


def mtbench_prompts(tokenizer, questions: str, num: int) -> list[list[int]]:
    """The first turns of ``num`` questions ('mtbench': the package's; else a .jsonl path), as
    token ids with the chat template applied."""
    convs = load_conversations(questions, 0, num)
    return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": c[0]}])) for c in convs if c]


def warm_up(llm: LLM, prompts: list[list[int]], temperature: float, top_p: float) -> None:
    """Triton compiles and every bucket's graph is captured (the tail of each batch passes
    through the smaller buckets), so no capture lands inside a timed run. tree=auto captures a
    sampled batch's graphs when it first tries each choice at a bucket (a trial of a few steps
    per choice): long enough replies that every choice is tried at every bucket. With 8 tokens
    most choices were first captured inside the timed runs (sampled, H200, 2026-12-04: 0.40x at
    batch 64, where a whole run lasts about 3 s)."""
    tokens = 8
    if llm.speculative is not None:  # enough steps for every trial even if each accepts all
        policy = llm.speculative.policy
        steps = 2 + (0 if policy is None else policy.trial_steps * len(policy.choices))
        tokens = steps * llm.speculative.lookahead
    for b in llm.runner.buckets:
        llm.generate(prompts[:b], SamplingParams(max_tokens=tokens, temperature=temperature, top_p=top_p,
                                                 ignore_eos=True))


def spread_indices(total: int, k: int) -> list[int]:
    """k indices spread evenly over range(total) (all of them when k >= total): MT-bench lists its
    questions category by category, so its first 16 are all writing prompts, which the draft
    accepts less often than most (tau 2.1 where all 80 give 3.1, H200, 2026-12-04)."""
    if k >= total:
        return list(range(total))
    return [i * total // k for i in range(k)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--questions", default="mtbench", help="'mtbench' (package) or a .jsonl path")
    ap.add_argument("--num", type=int, default=80)
    ap.add_argument("--batches", default="1,2,4,8,16,32,64")
    ap.add_argument("--batch1-num", type=int, default=16,
                    help="prompts timed at batch 1 (slow), spread evenly over the questions")
    ap.add_argument("--trees", default="", help="';'-separated trees, 'auto' among them (default: auto)")
    ap.add_argument("--heads", default="", help="';'-separated NAME=DIR draft heads, each run with every tree "
                                                "(default: the shipped head)")
    ap.add_argument("--draft-vocab", default="default",
                    help="comma-separated draft vocabulary sizes, e.g. 4096,8192,16384,full (each tree runs with "
                         "each; full: the head's whole vocabulary, default: its config's)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="float32 makes greedy outputs exactly comparable")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    engine = EngineConfig(max_batch_size=max(batches), max_model_len=2048, gpu_memory_fraction=0.3)
    plain = LLM(draft="none", device=args.device, dtype=args.dtype, engine=engine)
    prompts = mtbench_prompts(plain.tokenizer, args.questions, args.num)
    # One seed per prompt: the same prompt samples the same way in every engine and batch size.
    params = [SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=i)
              for i in range(len(prompts))]
    trees = [t for t in args.trees.split(";") if t] or ["auto"]
    vocabs = parse_draft_vocabs(args.draft_vocab)
    head_dirs = parse_heads(args.heads)
    engines = {"plain": plain}
    for head_name, head_dir in head_dirs.items():
        head = load_head(head_dir, plain.model)  # one target for every engine
        for tree in trees:
            for size in vocabs:
                spec = SpecConfig(tree=tree, draft_vocab_size=draft_vocab_size_for(size, head))
                llm = LLM.from_model(plain.model, tokenizer=plain.tokenizer, draft=head, engine=engine, spec=spec,
                                     eos_ids=plain.eos_ids)
                name = tree if size is None else f"{tree} vocab {spec.draft_vocab_size}"
                engines[name if len(head_dirs) == 1 else f"{head_name} {name}"] = llm
    for llm in engines.values():
        warm_up(llm, prompts, args.temperature, args.top_p)
    rows = []
    device = plain.device
    result_name = ("e2e-smollm2-mtbench" + (f"-t{args.temperature:g}-p{args.top_p:g}" if args.temperature else "")
                   + (f"-{args.dtype}" if args.dtype else "") + ("-draft-vocab" if vocabs != [None] else "")
                   + ("-heads" if len(head_dirs) > 1 else ""))
    for batch in batches:
        chosen = spread_indices(len(prompts), args.batch1_num) if batch == 1 else list(range(len(prompts)))
        subset, subset_params = [prompts[i] for i in chosen], [params[i] for i in chosen]
        # Plain decoding runs first and last (A, B, ..., A): speedups are over the mean of the
        # two, and their spread says how noisy the machine was.
        first = run_batch(plain, subset, batch, subset_params)
        runs = {name: run_batch(llm, subset, batch, subset_params)
                for name, llm in engines.items() if name != "plain"}
        last = run_batch(plain, subset, batch, subset_params)
        base_rate = (first["tokens_per_s"] + last["tokens_per_s"]) / 2
        spread = abs(first["tokens_per_s"] - last["tokens_per_s"]) / base_rate
        base = {**first, "tokens_per_s": base_rate, "seconds": (first["seconds"] + last["seconds"]) / 2}
        for name, llm in engines.items():
            r = base if name == "plain" else runs[name]
            same = sum(a.token_ids == b.token_ids for a, b in zip(r["outputs"], base["outputs"]))
            row = {k: v for k, v in r.items() if k != "outputs"}
            row.update(batch=batch, engine=name, prompts=len(subset), prompt_indices=chosen if batch == 1 else None,
                       speedup=r["tokens_per_s"] / base_rate,
                       plain_spread=spread, identical_to_plain=f"{same}/{len(subset)}",
                       draft_vocab=None if name == "plain" else llm.speculative.vocab.size)
            policy = None if llm.speculative is None else llm.speculative.policy
            if policy is not None:  # what tree=auto believed at this batch's bucket (step ms, tokens per step)
                bucket = bucket_for(batch, llm.runner.buckets)
                row["policy"] = [p for p in policy.summary() if p["bucket"] == bucket]
            rows.append(row)
            print(f"batch {batch:3d} {name:>28s}: {row['tokens_per_s']:8.1f} tok/s  tau {row['tau']:.2f}  "
                  f"speedup {row['speedup']:.2f}x (plain spread {spread:.1%})  identical {row['identical_to_plain']}  "
                  f"{row['speculation'] if name != 'plain' else ''}", flush=True)
        # Written after every batch size: a run cut short by a time limit keeps what it measured.
        record = {"max_tokens": args.max_tokens, "dtype": str(plain.runner.dtype), "temperature": args.temperature,
                  "top_p": args.top_p, "rows": rows}
        path = write_result(result_name, record, device, args.out)
    print("wrote", path, "(plot: python -m eaglespec.bench.plots, needs the [plot] extra)")


if __name__ == "__main__":
    main()
