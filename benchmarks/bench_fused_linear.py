"""Products of a few token rows: cuBLAS plus the separate kernels it needs (norm, RoPE/cache
store, SwiGLU, residual add) against the fused small-matrix kernels of
``eaglespec.ops.fused_linear``, per layer product, for the 8B and SmolLM2 shapes.

GPU only:  python benchmarks/bench_fused_linear.py [--preset llama-3.1-8b] [--rows 2,16,64] [--sweep]
Each variant runs inside a CUDA graph over enough weight copies that nothing stays in L2.
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gemv import time_over_copies, weight_copies  # noqa: E402
from eaglespec.bench.decode import PRESETS  # noqa: E402
from eaglespec.bench.results import write_result  # noqa: E402
from eaglespec.models.llama import rope_cos_sin, rope_inverse_frequencies  # noqa: E402
from eaglespec.ops import fused  # noqa: E402
from eaglespec.ops import fused_linear as L  # noqa: E402

F = torch.nn.functional


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.1-8b", choices=sorted(PRESETS))
    ap.add_argument("--rows", default="2,16,64")
    ap.add_argument("--sweep", action="store_true", help="also sweep tiles")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    cfg = PRESETS[args.preset]
    h, inter, hq, hkv, d = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dev, dt = torch.device("cuda"), torch.bfloat16
    tiles = [L.LinearTile(bn, bk, w, s) for bn, bk, w, s in itertools.product((16, 32, 64), (64, 128, 256), (4, 8), (3, 4))]
    rows_out = []
    for t in [int(r) for r in args.rows.split(",")]:
        x = torch.randn(t, h, device=dev, dtype=dt)
        x_inter = torch.randn(t, inter, device=dev, dtype=dt)
        g = torch.ones(h, device=dev, dtype=dt)
        res = torch.randn(t, h, device=dev, dtype=dt)
        cos, sin = rope_cos_sin(torch.arange(t, device=dev) + 200, rope_inverse_frequencies(d, 5e5, None).to(dev), dt)
        k_cache = torch.zeros(64, 16, hkv, d, device=dev, dtype=dt)
        v_cache = torch.zeros_like(k_cache)
        slots = torch.arange(t, device=dev) + 100

        def qkv_unfused(w):
            n, _ = fused.rms_norm(x, g, 1e-5)
            q, k, v = F.linear(n, w).split((hq * d, hkv * d, hkv * d), dim=-1)
            fused.rope_and_cache_write(q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d), cos, sin,
                                       k_cache, v_cache, slots)

        ops = {  # name: (weight shape, unfused step, fused step taking a tile)
            "qkv": (((hq + 2 * hkv) * d, h), qkv_unfused,
                    lambda w, tile: L.qkv_rope_linear(w, x, g, 1e-5, cos, sin, hq, hkv, k_cache, v_cache, slots,
                                                      tile=tile)),
            "o_proj": ((h, h), lambda w: F.linear(x, w) + res, lambda w, tile: L.linear(w, x, residual=res, tile=tile)),
            "gate_up": ((2 * inter, h), lambda w: fused.silu_mul(F.linear(fused.rms_norm(x, g, 1e-5)[0], w)),
                        lambda w, tile: L.silu_mul_linear(w, x, g, 1e-5, tile=tile)),
            "down": ((h, inter), lambda w: F.linear(x_inter, w) + res,
                     lambda w, tile: L.linear(w, x_inter, residual=res, tile=tile)),
        }
        for name, (shape, unfused, fused_step) in ops.items():
            ws = weight_copies(shape, dev, dt, min_copies=4)
            row = {"rows": t, "op": name, "weight_shape": list(shape),
                   "unfused_us": time_over_copies(unfused, ws),
                   "fused_us": time_over_copies(lambda w: fused_step(w, None), ws), "sweep": []}
            for tile in (tiles if args.sweep else []):
                if name == "qkv" and tile.block_n > max(16, d // 2):
                    continue
                try:
                    us = time_over_copies(lambda w, tl_=tile: fused_step(w, tl_), ws)
                except Exception as e:  # a tile that does not compile or fit: skip it, say so
                    print(f"{name} {tile}: {type(e).__name__}: {str(e)[:100]}")
                    continue
                row["sweep"].append({"tile": [tile.block_n, tile.block_k, tile.num_warps, tile.num_stages], "us": us})
            row["sweep"].sort(key=lambda r: r["us"])
            best = ", ".join(f"{r['tile']} {r['us']:.1f}" for r in row["sweep"][:3])
            print(f"T={t:3d} {name:8s} cuBLAS+kernels {row['unfused_us']:8.1f} us   fused {row['fused_us']:8.1f} us"
                  + (f"   best: {best}" if best else ""), flush=True)
            rows_out.append(row)
            del ws
            torch.cuda.empty_cache()
    print("wrote", write_result(f"fused-linear-{args.preset}", {"rows": rows_out}, dev, args.out))


if __name__ == "__main__":
    main()
