"""tree="auto" against its own recent changes, end to end, in one process, interleaved.

Each variant is an engine on the same target and head with one change undone on that engine
alone (an instance patch, nothing in the package):

- ``main``: as on main;
- ``no-sampled-priors``: sampled steps start without the head's greedy priors (the policy
  before design note 47).

(Design note 49's ``switch-drains`` was measured with it, on an H100, and its change reverted.)

Per batch size the runs go plain, main, the others, main, plain: speedups are over the mean of
the two plain runs, and the two main runs give main's own spread. Reuses the end-to-end
benchmark's prompts, warm-up and ``run_batch``.

    python benchmarks/ab_auto.py --questions mtbench-question.jsonl --batches 1,16 \\
        --temperature 0.7 --top-p 0.9 --out $OUT
"""

from __future__ import annotations

import argparse

from eaglespec import LLM, EngineConfig, SamplingParams, SpecConfig
from eaglespec.bench.e2e import mtbench_prompts, run_batch, spread_indices, warm_up
from eaglespec.bench.results import write_result
from eaglespec.engine.llm import shipped_head_path
from eaglespec.models.eagle import load_head

VARIANTS = ("main", "no-sampled-priors")


def undo(llm: LLM, variant: str) -> None:
    """Undo one change on this engine (before its warm-up, so the policy never saw it)."""
    if variant == "no-sampled-priors":
        policy = llm.speculative.policy
        for key in [k for k in policy._drafts if not k[1]]:  # (tree, greedy=False)
            del policy._drafts[key]
    elif variant != "main":
        raise ValueError(f"unknown variant {variant!r}: expected one of {VARIANTS}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", default="mtbench")
    ap.add_argument("--num", type=int, default=80)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--batch1-num", type=int, default=16)
    ap.add_argument("--variants", default=",".join(VARIANTS[1:]), help="besides main, comma-separated")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    engine = EngineConfig(max_batch_size=max(batches), max_model_len=2048, gpu_memory_fraction=0.3)
    plain = LLM(draft="none", engine=engine)
    prompts = mtbench_prompts(plain.tokenizer, args.questions, args.num)
    params = [SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=i)
              for i in range(len(prompts))]
    head = load_head(shipped_head_path(), plain.model)
    engines = {"plain": plain}
    for variant in ["main", *[v for v in args.variants.split(",") if v]]:
        llm = LLM.from_model(plain.model, tokenizer=plain.tokenizer, draft=head, engine=engine,
                             spec=SpecConfig(tree="auto"), eos_ids=plain.eos_ids)
        undo(llm, variant)
        engines[variant] = llm
    for llm in engines.values():
        warm_up(llm, prompts, args.temperature, args.top_p)
    order = ["plain", "main", *[v for v in engines if v not in ("plain", "main")], "main", "plain"]
    rows = []
    for batch in batches:
        chosen = spread_indices(len(prompts), args.batch1_num) if batch == 1 else list(range(len(prompts)))
        subset, subset_params = [prompts[i] for i in chosen], [params[i] for i in chosen]
        runs = [(name, run_batch(engines[name], subset, batch, subset_params)) for name in order]
        plain_rates = [r["tokens_per_s"] for name, r in runs if name == "plain"]
        base = sum(plain_rates) / 2
        for i, (name, r) in enumerate(runs):
            row = {k: v for k, v in r.items() if k != "outputs"}
            row.update(batch=batch, engine=name, position=i, prompts=len(subset), speedup=r["tokens_per_s"] / base,
                       plain_spread=abs(plain_rates[0] - plain_rates[1]) / base)
            rows.append(row)
            print(f"batch {batch:3d} #{i} {name:>18s}: {r['tokens_per_s']:8.1f} tok/s  tau {r['tau']:.2f}  "
                  f"speedup {row['speedup']:.2f}x  {r['speculation'] if name != 'plain' else ''}", flush=True)
        record = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
                  "order": order, "rows": rows}
        path = write_result("e2e-auto-ab" + (f"-t{args.temperature:g}-p{args.top_p:g}" if args.temperature else ""),
                            record, plain.device, args.out)
    print("wrote", path)


if __name__ == "__main__":
    main()
