"""Tiles of the split-K attention kernel: the key tile, warps and pipeline stages, for plain
decode (one query a sequence) and a chain:3 verify (four tree queries), Llama-3.1-8B's
attention shape, against the default launch. Each row records how many chunks the default
split gives its keys (one at batch 64 and 512 context: the 2-warp rule's case; several at 16).

    python benchmarks/bench_attention_tiles.py --out FILE [--batches 64,16] [--context 512] [--table-keys 640]

It drives ``_split_attention``, the launcher behind paged_decode_attention and
two_pass_tree_attention, whose ``launch`` argument overrides the tiles.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import pathlib

import torch
import triton

from eaglespec.ops import attention as A

HQ, HKV, D, BS = 32, 8, 128, 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="64")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--table-keys", type=int, default=640,
                    help="keys a block-table row spans (spec_step's max_model_len: context + 128)")
    ap.add_argument("--out", type=pathlib.Path, required=True)
    args = ap.parse_args()
    dev, dtype, scale = torch.device("cuda"), torch.bfloat16, 1 / math.sqrt(D)
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        blocks_per_seq = args.table_keys // BS
        num_blocks = batch * blocks_per_seq + 1
        k_cache = torch.randn(num_blocks, BS, HKV, D, device=dev, dtype=dtype, generator=gen)
        v_cache = torch.randn_like(k_cache)
        tables = torch.randperm(num_blocks - 1, device=dev, generator=gen)[:batch * blocks_per_seq]
        tables = tables.view(batch, blocks_per_seq).to(torch.int32)
        lens = torch.full((batch,), args.context, dtype=torch.int32, device=dev)
        for nodes in (1, 4):
            q = torch.randn(batch, nodes, HQ, D, device=dev, dtype=dtype, generator=gen)
            tree = None
            if nodes > 1:
                k_tree = torch.randn(batch, nodes, HKV, D, device=dev, dtype=dtype, generator=gen)
                bits = ((torch.ones((), dtype=torch.int64) << (torch.arange(nodes) + 1)) - 1)
                tree = (k_tree, torch.randn_like(k_tree), bits.expand(batch, nodes).contiguous().to(dev), HQ // HKV)

            def run(launch=None):
                return A._split_attention(q, k_cache, v_cache, tables, lens, scale, None,
                                          dtype, tree, launch)[0]

            ref = run()
            base = triton.testing.do_bench_cudagraph(run, rep=50)
            split = A.default_decode_split_size(batch, HKV, nodes * (HQ // HKV), args.table_keys, BS,
                                                torch.cuda.get_device_properties(dev).multi_processor_count)
            row = {"batch": batch, "nodes": nodes, "context": args.context, "chunks": -(-args.table_keys // split),
                   "default_us": base * 1000, "sweep": []}
            for block_n, warps, stages in itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4)):
                launch = {"block_n": block_n, "num_warps": warps, "num_stages": stages}
                try:
                    err = (run(launch).float() - ref.float()).abs().max().item()
                    us = triton.testing.do_bench_cudagraph(lambda: run(launch), rep=50) * 1000
                    row["sweep"].append({**launch, "us": us, "max_err": err})
                except Exception as e:  # out of shared memory or registers: recorded
                    row["sweep"].append({**launch, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            ok = [s for s in row["sweep"] if "us" in s and s["max_err"] < 0.05]
            best = min(ok, key=lambda s: s["us"])
            row["best"] = best
            print(f"batch {batch:3d} nodes {nodes} ({row['chunks']} chunks): default {row['default_us']:6.1f} us, best {best['us']:6.1f} us "
                  f"(block_n {best['block_n']}, warps {best['num_warps']}, stages {best['num_stages']})", flush=True)
            rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
