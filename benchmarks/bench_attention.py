"""Tree-verify attention on one GPU: two-pass Triton kernels vs SDPA + mask vs FlexAttention.

One attention layer of Llama-3.1-8B (32 query heads, 8 KV heads, head_dim 128, bf16, paged KV
cache with 16-token blocks). For every batch x context it times:

  decode           paged_decode_attention, one query per sequence (the plain decode step)
  two_pass         two_pass_tree_attention: prefix pass over the paged cache + tree pass + merge
  sdpa_masked      tree_attention_sdpa_masked: gathers prefix + tree K/V from the paged cache,
                   one SDPA call under a boolean mask (GQA through enable_gqa)
  sdpa_masked_rep  the same with K/V repeated to 32 heads (SDPA may pick a faster backend)
  flex_contiguous  compiled FlexAttention with a block mask over prefix + tree, on K/V that is
                   ALREADY contiguous (the gather is not timed: optimistic for FlexAttention)

Times are medians of triton.testing.do_bench (L2 flushed before every call), of one CUDA-graph
replay where the method can be captured (no Python/launch overhead; `ms_graph`) and of eager
calls (`ms_eager`); `ms` (the table) is the graph time when there is one. The HBM floor is the
K/V bytes a kernel must read (prefix + tree keys and values) / 2.98e12 B/s (H100 SXM).

Usage (GPU only; < 3 minutes on an H100):
    python benchmarks/bench_attention.py [--out PATH] [--batches 1,4,16,64]
        [--contexts 1024,2048,4096,8192] [--nodes 64] [--flex-budget-s 45] [--no-flex]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from eaglespec.ops import attention as A  # noqa: E402
from graph_timing import bench_ms, graph_bench_ms  # noqa: E402 - beside this script

HQ, HKV, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16  # Llama-3.1-8B attention, paged cache
DTYPE = torch.bfloat16
HBM_BYTES_PER_S = 2.98e12  # H100 SXM achievable-peak figure used across the project
SCALE = 1.0 / math.sqrt(HEAD_DIM)
DEVICE = "cuda"


# ----------------------------------------------------------------------------- inputs


def random_ancestor_bits(batch: int, nodes: int, gen: torch.Generator) -> torch.Tensor:
    """[B, N] int64: a random tree per sequence (parent of node i drawn from 0..i-1)."""
    rows = []
    for _ in range(batch):
        bits: list[int] = []
        for i in range(nodes):
            parent = int(torch.randint(0, i, (), generator=gen)) if i > 0 else -1
            bits.append((bits[parent] if parent >= 0 else 0) | (1 << i))
        rows.append([b - (1 << 64) if b >= 1 << 63 else b for b in bits])  # as signed int64
    return torch.tensor(rows, dtype=torch.int64)


def make_case(batch: int, context: int, nodes: int, seed: int = 0) -> dict:
    """Paged cache holding `context` tokens per sequence in shuffled blocks, plus a tree."""
    gen = torch.Generator().manual_seed(seed)
    dev = DEVICE
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, HKV, HEAD_DIM, device=dev, dtype=DTYPE)
    v_cache = torch.randn(num_blocks, BLOCK_SIZE, HKV, HEAD_DIM, device=dev, dtype=DTYPE)
    perm = torch.randperm(num_blocks, generator=gen).to(dev)
    block_tables = perm.view(batch, blocks_per_seq).to(torch.int32).contiguous()
    return dict(
        q=torch.randn(batch, nodes, HQ, HEAD_DIM, device=dev, dtype=DTYPE),
        q1=torch.randn(batch, 1, HQ, HEAD_DIM, device=dev, dtype=DTYPE),
        k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
        prefix_lens=torch.full((batch,), context, dtype=torch.int32, device=dev),
        k_tree=torch.randn(batch, nodes, HKV, HEAD_DIM, device=dev, dtype=DTYPE),
        v_tree=torch.randn(batch, nodes, HKV, HEAD_DIM, device=dev, dtype=DTYPE),
        bits=random_ancestor_bits(batch, nodes, gen).to(dev),
    )


def tree_args(c: dict) -> tuple:
    return (c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["prefix_lens"],
            c["k_tree"], c["v_tree"], c["bits"], SCALE)


def kv_bytes(batch: int, keys: int) -> int:
    return batch * keys * HKV * HEAD_DIM * 2 * DTYPE.itemsize  # K and V


# ----------------------------------------------------------------------------- FlexAttention


def flex_setup(c: dict):
    """Returns a zero-argument callable running compiled FlexAttention, or raises."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    batch, nodes = c["q"].shape[:2]
    tables = c["block_tables"].long()
    k_prefix = c["k_cache"][tables].reshape(batch, -1, HKV, HEAD_DIM)
    v_prefix = c["v_cache"][tables].reshape(batch, -1, HKV, HEAD_DIM)
    max_keys = k_prefix.shape[1]
    k_all = torch.cat([k_prefix, c["k_tree"]], 1).transpose(1, 2).contiguous()  # [B, Hkv, L, D]
    v_all = torch.cat([v_prefix, c["v_tree"]], 1).transpose(1, 2).contiguous()
    q = c["q"].transpose(1, 2).contiguous()  # [B, Hq, N, D]
    prefix_lens, bits = c["prefix_lens"], c["bits"]

    def mask_mod(b, h, q_idx, kv_idx):
        in_prefix = (kv_idx < max_keys) & (kv_idx < prefix_lens[b])
        j = kv_idx - max_keys
        in_tree = (j >= 0) & (((bits[b, q_idx] >> j.clamp(min=0)) & 1) != 0)
        return in_prefix | in_tree

    block_mask = create_block_mask(mask_mod, batch, None, nodes, max_keys + nodes, device=DEVICE)
    compiled = torch.compile(flex_attention, dynamic=False)
    # Variants, first that compiles wins: the device image's inductor has failed to lower the
    # plain GQA call for 64 tree queries ("NoValidChoicesError"), so also try the non-decoding
    # kernel and K/V repeated to every query head.
    k_rep = k_all.repeat_interleave(HQ // HKV, dim=1)
    v_rep = v_all.repeat_interleave(HQ // HKV, dim=1)
    variants = [
        ("gqa", lambda: compiled(q, k_all, v_all, block_mask=block_mask, scale=SCALE, enable_gqa=True)),
        ("gqa, forced flex kernel", lambda: compiled(q, k_all, v_all, block_mask=block_mask, scale=SCALE,
                                                     enable_gqa=True,
                                                     kernel_options={"FORCE_USE_FLEX_ATTENTION": True})),
        ("K/V repeated", lambda: compiled(q, k_rep, v_rep, block_mask=block_mask, scale=SCALE)),
    ]
    errors = []
    for name, run in variants:
        try:
            run()
            torch.cuda.synchronize()
            run.variant = name
            return run
        except Exception as exc:  # inductor raises many types; try the next variant
            errors.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    raise RuntimeError(" | ".join(errors))


# ----------------------------------------------------------------------------- timing


def timings(fn) -> dict:
    """Eager and graph-replayed medians; `ms` is the graph time when fn can be captured."""
    eager = bench_ms(fn)
    try:
        graph = graph_bench_ms(fn)
    except Exception as e:  # noqa: BLE001 - some baselines cannot be captured
        return dict(ms=eager, ms_eager=eager, ms_graph=None,
                    graph_error=f"{type(e).__name__}: {e}"[:200])
    return dict(ms=graph, ms_eager=eager, ms_graph=graph)


def close(a: torch.Tensor, b: torch.Tensor) -> tuple[float, bool]:
    """Max abs difference and a bf16-level closeness verdict (atol = rtol = 2e-2)."""
    a, b = a.float(), b.float()
    return (a - b).abs().max().item(), bool(torch.allclose(a, b, atol=2e-2, rtol=2e-2))


def check_correctness(nodes: int) -> dict:
    """Two-pass vs SDPA (and vs the fp32 reference) at one awkward shape, before any timing."""
    gen = torch.Generator().manual_seed(123)
    batch, hq, hkv, d, context = 3, HQ, HKV, HEAD_DIM, 1000  # 1000: not a block multiple
    c = make_case(batch, context, nodes, seed=7)
    c["prefix_lens"] = torch.tensor([context, 517, 0], dtype=torch.int32, device=DEVICE)
    c["bits"] = random_ancestor_bits(batch, nodes, gen).to(DEVICE)
    args = tree_args(c)
    out = A.two_pass_tree_attention(*args)
    sdpa = A.tree_attention_sdpa_masked(*args)
    ref = A.two_pass_tree_attention_ref(*args)  # fp32 math on the same bf16 inputs
    err_sdpa, ok_sdpa = close(out, sdpa)
    err_ref, ok_ref = close(out, ref)
    dec, _ = A.paged_decode_attention(c["q1"], c["k_cache"], c["v_cache"], c["block_tables"],
                                      c["prefix_lens"], SCALE)
    dec_ref, _ = A.paged_decode_attention_ref(c["q1"], c["k_cache"], c["v_cache"],
                                              c["block_tables"], c["prefix_lens"], SCALE)
    err_dec, ok_dec = close(dec, dec_ref)
    result = {"shape": dict(batch=batch, context=context, prefix_lens=[context, 517, 0],
                            nodes=nodes, hq=hq, hkv=hkv, head_dim=d),
              "max_abs_err_two_pass_vs_sdpa": err_sdpa,
              "max_abs_err_two_pass_vs_ref": err_ref,
              "max_abs_err_decode_vs_ref": err_dec}
    ok = ok_sdpa and ok_ref and ok_dec
    result["ok"] = ok
    print("correctness:", json.dumps(result))
    if not ok:
        raise SystemExit("two-pass tree attention disagrees with SDPA/reference: not timing")
    return result


def device_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/"
                                                "attention-<device>-<date>.json)")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--contexts", default="1024,2048,4096,8192")
    ap.add_argument("--nodes", type=int, default=64)
    ap.add_argument("--flex-budget-s", type=float, default=45.0,
                    help="stop adding FlexAttention shapes (compiles) after this many seconds")
    ap.add_argument("--no-flex", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention.py needs a CUDA GPU")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter is not a benchmark")
    import triton

    try:  # FlexAttention recompiles per shape; keep dynamo from giving up after 8
        torch._dynamo.config.recompile_limit = 64
    except AttributeError:
        torch._dynamo.config.cache_size_limit = 64

    t_start = time.time()
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    nodes = args.nodes
    correctness = check_correctness(nodes)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count

    results: list[dict] = []

    def record(batch, context, method, times, keys, **extra):
        """times: a timings() dict, or None (failed); keys: prefix + tree keys read."""
        times = times or dict(ms=None)
        ms = times["ms"]
        floor_ms = kv_bytes(batch, keys) / HBM_BYTES_PER_S * 1e3
        row = dict(batch=batch, context=context, nodes=nodes, method=method, **times,
                   kv_bytes=kv_bytes(batch, keys), hbm_floor_ms=floor_ms,
                   frac_of_hbm_floor=(floor_ms / ms) if ms else None, **extra)
        results.append(row)
        return row

    # Main grid: our kernels and the SDPA baselines at every shape.
    for batch in batches:
        for context in contexts:
            c = make_case(batch, context, nodes)
            split_tree = A.default_decode_split_size(batch, HKV, nodes * HQ // HKV, context,
                                                     BLOCK_SIZE, num_sms)
            split_dec = A.default_decode_split_size(batch, HKV, HQ // HKV, context, BLOCK_SIZE,
                                                    num_sms)
            dec_args = (c["q1"], c["k_cache"], c["v_cache"], c["block_tables"],
                        c["prefix_lens"], SCALE)
            record(batch, context, "decode", timings(lambda: A.paged_decode_attention(*dec_args)),
                   context, split_size=split_dec)
            targs = tree_args(c)
            record(batch, context, "two_pass",
                   timings(lambda: A.two_pass_tree_attention(*targs)), context + nodes,
                   split_size=split_tree)
            for method, rep in (("sdpa_masked", False), ("sdpa_masked_rep", True)):
                try:
                    times = timings(lambda: A.tree_attention_sdpa_masked(*targs, repeat_kv=rep))
                    record(batch, context, method, times, context + nodes, includes_gather=True)
                except torch.cuda.OutOfMemoryError:
                    record(batch, context, method, None, context + nodes, error="OOM")
            del c, targs, dec_args
            torch.cuda.empty_cache()

    # Split-size sweep at the longest context (to tune default_decode_split_size).
    sweep_ctx = max(contexts)
    for batch in sorted({batches[0], batches[len(batches) // 2]}):
        c = make_case(batch, sweep_ctx, nodes)
        targs = tree_args(c)
        dec_args = (c["q1"], c["k_cache"], c["v_cache"], c["block_tables"], c["prefix_lens"],
                    SCALE)
        for split in (256, 512, 1024, 2048):
            ms = graph_bench_ms(lambda: A.two_pass_tree_attention(*targs, split_size=split))
            record(batch, sweep_ctx, "sweep_two_pass", dict(ms=ms, ms_graph=ms),
                   sweep_ctx + nodes, split_size=split)
            ms = graph_bench_ms(lambda: A.paged_decode_attention(*dec_args, split_size=split))
            record(batch, sweep_ctx, "sweep_decode", dict(ms=ms, ms_graph=ms), sweep_ctx,
                   split_size=split)
        del c, targs, dec_args
        torch.cuda.empty_cache()

    # FlexAttention: one compile per shape, so shapes in a spread-out order under a time budget.
    flex_note = None
    if not args.no_flex:
        order = [(b, max(contexts)) for b in batches] + [(b, min(contexts)) for b in batches]
        order += [(b, t) for b in batches for t in contexts if (b, t) not in order]
        t_flex = time.time()
        for batch, context in order:
            if time.time() - t_flex > args.flex_budget_s:
                flex_note = f"stopped after {args.flex_budget_s:.0f} s budget"
                break
            c = make_case(batch, context, nodes)
            try:
                run = flex_setup(c)
                # compiles outside the timing; checked against the SDPA baseline at every shape
                err, ok = close(run().transpose(1, 2), A.tree_attention_sdpa_masked(*tree_args(c)))
                record(batch, context, "flex_contiguous", timings(run), context + nodes,
                       includes_gather=False, max_abs_err_vs_sdpa=err, ok=ok, variant=run.variant)
            except Exception as e:  # noqa: BLE001 - optional baseline
                flex_note = f"{type(e).__name__}: {e}"[:300]
                print("FlexAttention unavailable:", flex_note)
                break
            finally:
                del c
                torch.cuda.empty_cache()

    # Table.
    by = {(r["batch"], r["context"], r["method"]): r["ms"] for r in results}
    print(f"\nLlama-3.1-8B layer, {nodes}-node tree, bf16, block {BLOCK_SIZE}, "
          f"{torch.cuda.get_device_name()}  (ms, median; frac = HBM floor / time)")
    print(f"{'B':>3} {'ctx':>5} | {'decode':>7} {'frac':>5} | {'2pass':>7} {'frac':>5} "
          f"{'/dec':>5} | {'sdpa':>7} {'sdpaR':>7} {'flex':>7} | {'sdpa/2p':>7}")
    for batch in batches:
        for context in contexts:
            dec = by.get((batch, context, "decode"))
            tp = by.get((batch, context, "two_pass"))
            sd = by.get((batch, context, "sdpa_masked"))
            sr = by.get((batch, context, "sdpa_masked_rep"))
            fx = by.get((batch, context, "flex_contiguous"))
            f_dec = kv_bytes(batch, context) / HBM_BYTES_PER_S * 1e3 / dec
            f_tp = kv_bytes(batch, context + nodes) / HBM_BYTES_PER_S * 1e3 / tp
            best_sdpa = min(x for x in (sd, sr) if x is not None) if (sd or sr) else None

            def fmt(x):
                return f"{x:7.4f}" if x is not None else f"{'-':>7}"

            print(f"{batch:>3} {context:>5} | {fmt(dec)} {f_dec:5.2f} | {fmt(tp)} {f_tp:5.2f} "
                  f"{tp / dec:5.2f} | {fmt(sd)} {fmt(sr)} {fmt(fx)} | "
                  f"{(best_sdpa / tp) if best_sdpa else float('nan'):7.2f}")

    out_path = Path(args.out) if args.out else (
        Path(__file__).resolve().parent / "results"
        / f"attention-{device_slug()}-{_dt.date.today().strftime('%Y%m%d')}.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(
        benchmark="tree-verify attention, one Llama-3.1-8B layer",
        device=torch.cuda.get_device_name(), num_sms=num_sms,
        torch=torch.__version__, triton=triton.__version__,
        date=_dt.datetime.now().isoformat(timespec="seconds"),
        config=dict(hq=HQ, hkv=HKV, head_dim=HEAD_DIM, block_size=BLOCK_SIZE, dtype=str(DTYPE),
                    nodes=nodes, batches=batches, contexts=contexts,
                    hbm_bytes_per_s=HBM_BYTES_PER_S,
                    timing="triton.testing.do_bench median, L2 flushed per call; ms = "
                           "CUDA-graph replay (ms_graph) when capturable, else eager",
                    kv_bytes="prefix + tree keys and values read once (bf16)"),
        correctness=correctness, flex_note=flex_note, results=results,
        wall_s=round(time.time() - t_start, 1),
    )
    out_path.write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {out_path} ({payload['wall_s']} s)")


if __name__ == "__main__":
    main()
