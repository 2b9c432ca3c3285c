"""Plots of recorded benchmark results (benchmarks/results/*.json -> PNG beside them).

    python -m eaglespec.bench.plots [--results benchmarks/results]

spec-step-*.json -> cost of a speculative step over a plain decode step, by tree size and batch;
e2e-*.json       -> tokens/s of plain and speculative decoding by batch size;
serve-*.json     -> served throughput, TTFT and TPOT by concurrency (``plot_serve`` overlays runs);
data-scaling-*.json -> a head recipe's tau against the reply tokens it trained on, one line per tree.
"""

from __future__ import annotations

import argparse
import glob
import json
import os


def _save(fig, path: str) -> str:
    """Write the figure as a PNG beside the JSON it was drawn from; returns the PNG's path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = path[:-5] + ".png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_spec_step(path: str) -> str:
    import matplotlib.pyplot as plt

    with open(path) as f:
        rec = json.load(f)
    rows = rec["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    vocabs = sorted({r.get("draft_vocab") or 0 for r in rows})  # one line per batch and draft vocabulary
    for batch in sorted({r["batch"] for r in rows}):
        for vocab in vocabs:
            sel = sorted((r for r in rows if r["batch"] == batch and (r.get("draft_vocab") or 0) == vocab),
                         key=lambda r: r["nodes"])
            nodes = [r["nodes"] for r in sel]
            label = f"batch {batch}" + (f", draft vocab {vocab}" if len(vocabs) > 1 else "")
            axes[0].plot(nodes, [r["verify_over_decode"] for r in sel], marker="o", label=label)
            axes[1].plot(nodes, [r["step_over_decode"] for r in sel], marker="o", label=label)
    for ax, title in zip(axes, ("verify (target forward + accept + commit)", "whole step (draft + verify)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.axhline(1.15, color="grey", ls=":", lw=1)
        ax.set_xlabel("draft nodes in the tree")
        ax.set_ylabel("time / plain decode step")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"{rec['benchmark']} on {rec['device']} ({rec['date']}), context {rec.get('context')}", fontsize=10)
    return _save(fig, path)


def plot_e2e(path: str) -> str:
    """Speedup over plain decoding against batch size, one line per engine (tau annotated)."""
    import matplotlib.pyplot as plt

    with open(path) as f:
        rec = json.load(f)
    rows = rec["rows"]
    engines = [e for e in dict.fromkeys(r["engine"] for r in rows) if e != "plain"]
    fig, ax = plt.subplots(figsize=(8, 4))
    for eng in engines:
        sel = sorted((r for r in rows if r["engine"] == eng), key=lambda r: r["batch"])
        ax.plot([r["batch"] for r in sel], [r["speedup"] for r in sel], marker="o", label=eng)
        for r in sel:
            ax.annotate(f"τ {r['tau']:.1f}", (r["batch"], r["speedup"]), textcoords="offset points",
                        xytext=(0, 5), ha="center", fontsize=7)
    ax.axhline(1.0, color="grey", lw=1)
    ax.set_xscale("log", base=2)
    batches = sorted({r["batch"] for r in rows})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens/s over plain decoding")
    sampling = "greedy" if not rec.get("temperature") else f"temperature {rec['temperature']}, top-p {rec.get('top_p')}"
    ax.set_title(f"{rec['benchmark']} on {rec['device']} ({rec['date']}), {sampling}", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_serve(paths: list[str]) -> str:
    """Throughput, TPOT and TTFT (p50 solid, p99 dashed) by concurrency, one line per run
    (speculation on and off in one figure when both are given); PNG beside the first file."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    title = ""
    for path in paths:
        with open(path) as f:
            rec = json.load(f)
        rows = sorted(rec["rows"], key=lambda r: r["concurrency"])
        conc = [r["concurrency"] for r in rows]
        name = f"{rec['label']} ({rec['speculation']})"
        line = axes[0].plot(conc, [r["output_tokens_per_s"] for r in rows], marker="o", label=name)[0]
        for r in rows:
            if r["tau"]:
                axes[0].annotate(f"τ {r['tau']:.1f}", (r["concurrency"], r["output_tokens_per_s"]), fontsize=6,
                                 ha="center", va="bottom")
        for ax, key in ((axes[1], "tpot"), (axes[2], "ttft")):
            ax.plot(conc, [r[f"{key}_p50_ms"] for r in rows], marker="o", color=line.get_color(), label=f"{name} p50")
            ax.plot(conc, [r[f"{key}_p99_ms"] for r in rows], marker="x", ls="--", color=line.get_color(),
                    label=f"{name} p99")
        title = f"{rec['model']} served on {rec['device']} ({rec['date']})"
    for ax, ylabel in zip(axes, ("output tokens/s", "time per output token (ms)", "time to first token (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    axes[2].set_yscale("log")
    fig.suptitle(title, fontsize=10)
    return _save(fig, paths[0])


def plot_scaling(path: str) -> str:
    """Tau against training reply tokens (log scale), one line per tree (eaglespec.bench.scaling)."""
    import matplotlib.pyplot as plt

    with open(path) as f:
        rec = json.load(f)
    fig, ax = plt.subplots(figsize=(7, 4))
    for tree in dict.fromkeys(r["tree"] for r in rec["rows"]):
        sel = sorted((r for r in rec["rows"] if r["tree"] == tree), key=lambda r: r["reply_tokens"])
        ax.plot([r["reply_tokens"] for r in sel], [r["tau"] for r in sel], marker="o", label=tree)
    ax.set_xscale("log")
    # Millions on the ticks: matplotlib's log-scale minor labels (1.2x10^7 ...) run into each other.
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda x, _: f"{x / 1e6:g}M"))
    ax.xaxis.set_minor_formatter(plt.FuncFormatter(lambda x, _: f"{x / 1e6:g}M"))
    ax.set_xlabel("reply tokens trained on")
    # Evaluations counted tokens per target forward until design note 63 (2026-12-06).
    per = "speculative step" if rec["date"] >= "2026-12-06" else "target forward"
    ax.set_ylabel(f"tau (tokens per {per})")
    ax.set_title(f"{rec['benchmark']} on {rec['device']} ({rec['date']})", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", default="benchmarks/results")
    args = ap.parse_args(argv)
    for path in sorted(glob.glob(os.path.join(args.results, "spec-step-*.json"))):
        print("wrote", plot_spec_step(path))
    for path in sorted(glob.glob(os.path.join(args.results, "e2e-*.json"))):
        print("wrote", plot_e2e(path))
    for path in sorted(glob.glob(os.path.join(args.results, "data-scaling-*.json"))):
        print("wrote", plot_scaling(path))
    runs: dict[tuple, list[str]] = {}  # one figure per model, device and date: its runs overlaid
    for path in sorted(glob.glob(os.path.join(args.results, "serve-*.json"))):
        with open(path) as f:
            rec = json.load(f)
        runs.setdefault((rec["model"], rec["device"], rec["date"]), []).append(path)
    for paths in runs.values():
        print("wrote", plot_serve(paths))


if __name__ == "__main__":
    main()
