"""Few-token products of a model's shapes (--preset, default Llama-3.1-8B): cuBLAS plus the separate kernels it needs
(norm, RoPE/cache store, SwiGLU, residual add) against the folded Triton kernels of
``eaglespec.ops.gemv`` over a sweep of tiles, for each token count of ``--rows`` (1: a batch-1
decode step; 4: batch-4 decode or chain:3 verify; 33: a 32-node tree and its root; 64: the
most the folded kernels take).

GPU only:  python benchmarks/bench_gemv.py [--preset smollm2-135m] [--out benchmarks/results] [--quick]
[--rows 1,4,16,33,64]. Each variant runs inside a CUDA graph over enough weight copies that nothing stays in L2, so a
call's time is what it costs inside a decode step.
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eaglespec.bench.decode import PRESETS  # noqa: E402
from eaglespec.bench.results import write_result  # noqa: E402
from eaglespec.config import LlamaConfig  # noqa: E402
from eaglespec.models.llama import rope_cos_sin, rope_inverse_frequencies  # noqa: E402
from eaglespec.ops import fused  # noqa: E402
from eaglespec.ops import gemv as G  # noqa: E402

F = torch.nn.functional


def time_graph(fn, calls: int) -> float:
    """Microseconds per call of ``fn`` (which makes ``calls`` calls) inside a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return sorted(times)[len(times) // 2]


def weight_copies(shape: tuple[int, int], device, dtype, min_copies: int = 2,
                  total_bytes: int = 400_000_000) -> list[torch.Tensor]:
    """Enough random copies of a weight that a pass over them cannot stay in L2."""
    copies = max(min_copies, -(-total_bytes // (shape[0] * shape[1] * 2)))
    return [torch.randn(*shape, device=device, dtype=dtype) * 0.02 for _ in range(copies)]


def time_over_copies(step, weights: list[torch.Tensor]) -> float:
    """Microseconds per call of ``step(w)``, called on each weight copy in turn inside a graph."""
    def fn():
        for w in weights:
            step(w)
    return time_graph(fn, len(weights))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="the default tiles only")
    ap.add_argument("--rows", default="1", help="comma-separated token counts (1 to 64)")
    ap.add_argument("--preset", default="llama-3.1-8b", choices=sorted(PRESETS), help="whose weight shapes")
    ap.add_argument("--products", default="qkv,o_proj,gate_up,down,lm_head", help="comma-separated products to time")
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    results = {"preset": args.preset, "rows": {}}
    name = f"gemv-{args.preset}-shapes" + ("" if args.rows == "1" else "-rows-" + args.rows.replace(",", "-"))
    for m in (int(r) for r in args.rows.split(",")):
        results["rows"][str(m)] = {"shapes": {}}
        for product in args.products.split(","):
            results["rows"][str(m)]["shapes"][product] = bench_product(PRESETS[args.preset], m, dev, dt, args.quick,
                                                                        product)
            # Written after every product: a sweep cut short by a time limit keeps what it measured.
            path = write_result(name, results, dev, args.out)
    print("wrote", path)


def sweep_tiles(m: int, k: int) -> list[G.GemvTile]:
    """The tiles tried for m rows of a product with k inputs."""
    if m == 1:
        return [G.GemvTile(bn, bk, w, s) for bn, bk, w, s in itertools.product(
            (4, 8, 16), (256, 512, 1024), (2, 4, 8), (2, 3, 4))]
    block_m = max(16, 1 << (m - 1).bit_length())
    if k <= 2048:  # a small model: few column steps, each a serial latency; deeper pipelines hide it
        return [G.GemvTile(bn, bk, w, s, block_m) for bn, bk, w, s in itertools.product(
            (16, 32), (32, 64, 128, 256) if block_m <= 16 else (32, 64, 128), (2, 4) if block_m <= 16 else (4, 8),
            (2, 3, 4, 5))]
    return [G.GemvTile(bn, bk, w, s, block_m) for bn, bk, w, s in itertools.product(
        (16, 32, 64), (32, 64, 128), (4, 8), (2, 3, 4))]


def bench_product(cfg: LlamaConfig, m: int, dev, dt, quick: bool, name: str) -> dict:
    """cuBLAS plus kernels, the default tile and (unless quick) the sweep's tiles for product ``name`` at m rows."""
    hidden, inter, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hq, hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    x = torch.randn(m, hidden, device=dev, dtype=dt)
    x_inter = torch.randn(m, inter, device=dev, dtype=dt)
    g = torch.ones(hidden, device=dev, dtype=dt)
    res = torch.randn(m, hidden, device=dev, dtype=dt)
    cos, sin = rope_cos_sin(torch.arange(200, 200 + m, device=dev),
                            rope_inverse_frequencies(hd, cfg.rope_theta, None).to(dev), dt)
    k_cache = torch.zeros(64, 16, hkv, hd, device=dev, dtype=dt)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.arange(77, 77 + m, device=dev)

    def qkv_unfused(w):
        h, _ = fused.rms_norm(x, g, 1e-5)
        q, k, v = F.linear(h, w).split((hq * hd, hkv * hd, hkv * hd), dim=-1)
        fused.rope_and_cache_write(q.view(m, hq, hd), k.view(m, hkv, hd), v.view(m, hkv, hd), cos, sin,
                                   k_cache, v_cache, slots)

    shapes = {  # name: (weight shape, unfused (cuBLAS) step, fused step taking a tile)
        "qkv": (((hq + 2 * hkv) * hd, hidden), qkv_unfused,
        lambda w, t: G.gemv_qkv_rope(w, x, g, 1e-5, cos, sin, k_cache, v_cache, slots, hq, hkv, tile=t)),
        "o_proj": ((hidden, hidden), lambda w: F.linear(x, w) + res, lambda w, t: G.gemv(w, x, residual=res, tile=t)),
        "gate_up": ((2 * inter, hidden), lambda w: fused.silu_mul(F.linear(fused.rms_norm(x, g, 1e-5)[0], w)),
                    lambda w, t: G.gemv_silu_mul(w, x, g, 1e-5, tile=t)),
        "down": ((hidden, inter), lambda w: F.linear(x_inter, w) + res,
                 lambda w, t: G.gemv(w, x_inter, residual=res, tile=t)),
        "lm_head": ((vocab, hidden), lambda w: F.linear(fused.rms_norm(x, g, 1e-5)[0], w).float(),
                    lambda w, t: G.gemv(w, x, g, 1e-5, out_dtype=torch.float32, tile=t)),
    }
    shape, unfused, fused_step = shapes[name]
    nbytes = shape[0] * shape[1] * 2
    ws = weight_copies(shape, dev, dt)
    row = {"weight_shape": list(shape), "weight_MB": nbytes / 1e6,
           "unfused_us": time_over_copies(unfused, ws),
           "default_tile_us": time_over_copies(lambda w: fused_step(w, None), ws), "sweep": []}
    for tile in ([] if quick else sweep_tiles(m, shape[1])):
        if tile.block_k > 1 << (shape[1] - 1).bit_length() or (name == "qkv" and tile.block_n > max(16, hd // 2)):
            continue
        try:
            us = time_over_copies(lambda w, t=tile: fused_step(w, t), ws)
        except Exception as e:  # a tile that does not compile or fit: skip it, say so
            print(f"{name} {tile}: {type(e).__name__}: {str(e)[:100]}")
            continue
        row["sweep"].append({"tile": [tile.block_n, tile.block_k, tile.num_warps, tile.num_stages, tile.block_m],
                             "us": us})
    row["sweep"].sort(key=lambda r: r["us"])
    for key in ("unfused_us", "default_tile_us"):
        row[key.replace("_us", "_TBps")] = nbytes / row[key] / 1e6
    best = ", ".join(f"{r['tile']} {r['us']:.1f}" for r in row["sweep"][:4])
    print(f"rows {m:2d} {name:8s} {nbytes / 1e6:7.1f} MB  cuBLAS+kernels {row['unfused_us']:7.1f} us "
          f"({row['unfused_TBps']:.2f} TB/s)  fused default {row['default_tile_us']:7.1f} us "
          f"({row['default_tile_TBps']:.2f} TB/s)  best: {best}", flush=True)
    del ws
    torch.cuda.empty_cache()
    return row


if __name__ == "__main__":
    main()
