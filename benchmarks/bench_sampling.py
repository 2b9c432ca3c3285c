"""The sampled distribution's cost against the number of rows (GPU only, under a minute).

A sampled step shapes every row's distribution (``ops.sampling.target_probs``): plain decoding
one row per sequence, a verified tree one row per node (1,024 rows for 64 sequences of a
16-node tree). The PyTorch reference sorts each row for top-p; the Triton kernel searches the
thresholds instead. This times both, and the whole ``sample`` (distribution plus the seeded
draw), as the replay of a CUDA graph, for temperature 0.7 with top-p 0.9 (and top-k 50 with it),
and counts the rows where the two keep different tokens (with the float64 answer beside).

    python benchmarks/bench_sampling.py [--out DIR] [--rows 1,4,16,64,256,1024] [--vocabs 49152,128256]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from bench_gemv import time_graph  # noqa: E402  (beside this script)
from eaglespec.bench.results import write_result  # noqa: E402
from eaglespec.config import SamplingParams  # noqa: E402
from eaglespec.ops import sampling as S  # noqa: E402

SETTINGS = {"t0.7-p0.9": SamplingParams(temperature=0.7, top_p=0.9),
            "t0.7-k50-p0.9": SamplingParams(temperature=0.7, top_k=50, top_p=0.9)}
TILES = [S.FEW_ROWS_TILE, S.MANY_ROWS_TILE, S.GridTile(2048, 64, 64, 4), S.GridTile(4096, 16, 128, 8)]


def float64_kept(logits_row: torch.Tensor, params: SamplingParams) -> tuple[int, float]:
    """How many tokens the cuts keep in float64, and how far the nucleus's last mass_above lies
    from top_p (a disagreement closer than fp32 rounding is a rounding tie, not a bug)."""
    p = torch.softmax(logits_row.double() / params.temperature, -1)
    ranked = p.sort(descending=True).values
    if params.top_k > 0:
        ranked = ranked[:params.top_k] / ranked[:params.top_k].sum()
    above = torch.cat([ranked.new_zeros(1), ranked.cumsum(0)[:-1]])
    inside = int((above < params.top_p).sum())
    return inside, float((above - params.top_p).abs().min())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--rows", default="1,4,16,64,256,1024")
    ap.add_argument("--vocabs", default="49152,128256")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    results = []
    for vocab in (int(v) for v in args.vocabs.split(",")):
        for rows in (int(r) for r in args.rows.split(",")):
            # Logits of a language model's spread: a few likely tokens and a long tail.
            logits = torch.randn(rows, vocab, device=dev) * 3
            for name, params in SETTINGS.items():
                st = S.SamplingTensors.from_params([params] * rows, list(range(rows)), dev)
                ref, kernel = S.target_probs_ref(logits, st), S.target_probs_triton(logits, st)
                differ = ((ref > 0) != (kernel > 0)).any(1).nonzero().flatten().tolist()
                differing = [{"sort_kept": int((ref[r] > 0).sum()), "kernel_kept": int((kernel[r] > 0).sum()),
                              "float64_kept_and_gap": float64_kept(logits[r], params)} for r in differ[:4]]
                row = {"vocab": vocab, "rows": rows, "settings": name,
                       "kept_tokens_mean": float((kernel > 0).sum(1).float().mean()),
                       "rows_keeping_other_tokens": len(differ), "differing_rows": differing,
                       "max_abs_diff": float((ref - kernel).abs().max()),
                       "ref_us": time_graph(lambda: S.target_probs_ref(logits, st), 1),
                       "sample_us": time_graph(lambda: S.sample(logits, st), 1),
                       "kernel_us": {f"{t.chunk}/{t.probes}/{t.sub}/{t.num_warps}": time_graph(
                           lambda t=t: S.target_probs_triton(logits, st, t), 1) for t in TILES}}
                results.append(row)
                times = "  ".join(f"{k} {v:7.1f}" for k, v in row["kernel_us"].items())
                print(f"vocab {vocab:6d} rows {rows:4d} {name:14s} kept {row['kept_tokens_mean']:7.1f}  "
                      f"sort {row['ref_us']:8.1f} us  kernel (chunk/probes/sub/warps) {times}  "
                      f"sample {row['sample_us']:7.1f}  differ {len(differ)} {differing[:2]}", flush=True)
    print("wrote", write_result("sampling-target-probs", {"rows": results}, dev, args.out))


if __name__ == "__main__":
    main()
