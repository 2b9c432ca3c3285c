"""Data scaling of a head recipe: tau against the tokens the head trained on.

    python -m eaglespec.bench.scaling RUN_DIR [RUN_DIR ...] --label smollm2-eagle1 --out benchmarks/results

Each run directory is a ``train.out_dir``: ``fit.json`` (written by ``eaglespec train fit``: the
data it trained on, its device, its steps) and ``eval.json`` (``eaglespec train eval``: tau and
acceptance per depth for each tree). One record with a row per run and tree is written as
``data-scaling-LABEL-DEVICE-DATE.json``; ``python -m eaglespec.bench.plots`` draws it. The runs
should differ in ``train.data_fraction`` only (nested subsets of the same prepared data).
"""

from __future__ import annotations

import argparse
import json
import os

from eaglespec.bench.results import slug, write_record


def collect(run_dirs: list[str]) -> list[dict]:
    """One row per run and evaluated tree, by training tokens."""
    rows = []
    for run in run_dirs:
        for name in ("fit.json", "eval.json"):
            if not os.path.isfile(os.path.join(run, name)):
                raise FileNotFoundError(f"{run}: no {name} (run `eaglespec train fit` and `train eval` there)")
        with open(os.path.join(run, "fit.json")) as f:
            fit = json.load(f)
        with open(os.path.join(run, "eval.json")) as f:
            ev = json.load(f)
        for tree, res in ev["results"].items():
            rows.append({"run": os.path.basename(os.path.normpath(run)), **fit["data"], "steps": fit.get("step"),
                         "device": fit.get("device"), "tree": tree, "tau": res["tau"],
                         "accept_rate_per_depth": res["accept_rate_per_depth"], "prompts": ev["prompts"],
                         "max_tokens": ev["max_tokens"], "eval_source": ev["source"]})
    return sorted(rows, key=lambda r: (r["tree"], r["reply_tokens"]))


def table(rows: list[dict]) -> str:
    lines = ["| run | sequences | tokens | reply tokens | steps | tree | tau | acceptance per depth |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['sequences']:,} | {r['tokens']:,} | {r['reply_tokens']:,} | {r['steps']} | "
                     f"{r['tree']} | {r['tau']:.2f} | {' / '.join(f'{a:.2f}' for a in r['accept_rate_per_depth'])} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="train.out_dir of each run (fit.json + eval.json)")
    ap.add_argument("--label", required=True, help="the recipe, e.g. smollm2-eagle1")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    rows = collect(args.runs)
    devices = ", ".join(sorted({r["device"] or "unknown device" for r in rows}))
    path = write_record(f"data-scaling-{slug(args.label)}", {"rows": rows}, devices, args.out)
    print(table(rows))
    print("wrote", path)


if __name__ == "__main__":
    main()
