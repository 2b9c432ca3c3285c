"""Tree attention of SmolLM2's shape against its split size (GPU only, about a minute).

At batch 1 a verified layer's tree attention took 7.6 us where a decode step's attention took
3.4 (H100, ``bench.spec_step`` census, 2026-12-05). Tree queries split their keys in chunks of
at least 256 (``default_decode_split_size``'s granule for more than 16 query rows per KV head),
so a short context runs on few programs, each walking many keys. This times one layer's
``two_pass_tree_attention`` (9 query heads, 3 KV heads, head_dim 64, 16-token blocks, a block
table as wide as max_model_len 2048) for trees of 16 and 33 nodes at several split sizes, as the
replay of a CUDA graph of 30 calls (one per layer), beside ``paged_decode_attention``. (The
recorded results took the mean of 50 replays; this takes the median of 7, as bench_gemv does.)

    python benchmarks/bench_tree_split.py [--out PATH] [--batches 1,16] [--contexts 128,512,1024]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from bench_gemv import time_graph  # noqa: E402  (beside this script)
from eaglespec.ops import attention as A  # noqa: E402

HQ, HKV, D, BLOCK, MAX_LEN, LAYERS = 9, 3, 64, 16, 2048 + 6, 30


def replay_us(fn) -> float:
    """Microseconds per call of ``fn``, from a CUDA graph of LAYERS calls (median of 7 replays)."""
    return time_graph(lambda: [fn() for _ in range(LAYERS)], LAYERS)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--contexts", default="128,512,1024")
    ap.add_argument("--splits", default="64,128,256,512")
    args = ap.parse_args(argv)
    dev, dtype = torch.device("cuda"), torch.bfloat16
    blocks_per_seq = -(-MAX_LEN // BLOCK)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        cache_k = torch.randn(batch * blocks_per_seq + 1, BLOCK, HKV, D, device=dev, dtype=dtype)
        cache_v = torch.randn_like(cache_k)
        tables = (1 + torch.arange(batch * blocks_per_seq, device=dev, dtype=torch.int32)).view(batch, blocks_per_seq)
        for context in (int(c) for c in args.contexts.split(",")):
            lens = torch.full((batch,), context, device=dev, dtype=torch.int32)
            q1 = torch.randn(batch, 1, HQ, D, device=dev, dtype=dtype)
            decode = replay_us(lambda: A.paged_decode_attention(q1, cache_k, cache_v, tables, lens, D ** -0.5,
                                                                out_dtype=dtype))
            for nodes in (16, 33):
                q = torch.randn(batch, nodes, HQ, D, device=dev, dtype=dtype)
                kt, vt = (torch.randn(batch, nodes, HKV, D, device=dev, dtype=dtype) for _ in range(2))
                bits = torch.tensor([(1 << (i + 1)) - 1 for i in range(nodes)], device=dev).repeat(batch, 1)
                default = A.default_decode_split_size(batch, HKV, nodes * (HQ // HKV), blocks_per_seq * BLOCK, BLOCK,
                                                      A._num_sms(dev))
                times = {}
                for split in sorted({default, *(int(s) for s in args.splits.split(","))}):
                    times[split] = replay_us(lambda s=split: A.two_pass_tree_attention(
                        q, cache_k, cache_v, tables, lens, kt, vt, bits, D ** -0.5, split_size=s))
                row = {"batch": batch, "context": context, "nodes": nodes, "decode_us": decode,
                       "default_split": default, "tree_us_by_split": times}
                rows.append(row)
                print(f"batch {batch:3d} context {context:5d} nodes {nodes:3d}: decode {decode:5.1f} us, tree "
                      + ", ".join(f"{s}{'*' if s == default else ''}: {t:5.1f}" for s, t in times.items()), flush=True)
    record = {"benchmark": "tree-split", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "note": "us per call, CUDA graph of 30 calls (median of 7 replays); * marks default_decode_split_size's choice", "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
