"""Design note 54's end-to-end question: do the few-row tiles (``GemvTile.block_m`` 2, 4 or 8:
per-row accumulators, no tl.dot) pay inside a real step, not only one product at a time?

Runs one benchmark module (``eaglespec.bench.spec_step``, ``eaglespec.bench.decode``, ...) in
this process, with the folded products' default tiles (``--variant default``) or with the fastest
few-row tile of a ``bench_gemv.py --few-rows-only`` sweep for each product and row bucket (2, 4,
8) where that tile beat the default in the sweep (``--variant few-rows``). Products the sweep did
not cover (another model's shapes, the head's fc) keep their default tiles. Run the variants in
separate processes, interleaved (default, few-rows, default), since the tiles are chosen when a
graph is captured.

``--tile 8,128,2,3`` instead: one per-row tile for every product (no sweep needed).

GPU only:  python benchmarks/ab_few_rows.py --tiles SWEEP.json --variant few-rows -- \\
               eaglespec.bench.spec_step --preset smollm2-135m --trees chain:3 --batches 1 --out DIR
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eaglespec.ops import gemv as G  # noqa: E402

# Which tile function a swept product's tile answers to (bench_gemv.py's product names).
PLAIN_PRODUCTS = ("o_proj", "down", "lm_head")


def row_bucket(m: int) -> int | None:
    """The few-row tile height that holds m rows (2, 4 or 8), None outside 2-8."""
    return 1 << (m - 1).bit_length() if 2 <= m <= 8 else None


def winning_tiles(sweep: dict) -> dict[tuple, G.GemvTile]:
    """(product kind, key, row bucket) -> the fastest few-row tile of the sweep, for the products
    where it beat the default tile. Keys: plain (n, k), silu_mul k, qkv_rope k."""
    table = {}
    for m, rows in sweep["rows"].items():
        for name, row in rows["shapes"].items():
            few = [r for r in row["sweep"] if r["tile"][4] < 16]
            if not few or min(r["us"] for r in few) >= row["default_tile_us"]:
                continue
            best = min(few, key=lambda r: r["us"])
            n, k = row["weight_shape"]
            kind = ("plain", n, k) if name in PLAIN_PRODUCTS else ("silu_mul", k) if name == "gate_up" else ("qkv_rope", k)
            table[(*kind, int(m))] = G.GemvTile(*best["tile"])
            print(f"few-rows: {name} rows {m}: {best['tile']} {best['us']:.1f} us "
                  f"(default {row['default_tile_us']:.1f} us)", flush=True)
    return table


def install(choose: Callable[[tuple, int], G.GemvTile | None]) -> None:
    """Make ``eaglespec.ops.gemv`` take ``choose(key, rows)``'s tile where it gives one (keys as
    in ``winning_tiles``), its defaults otherwise."""
    plain, silu_mul, qkv_rope = G.plain_tile, G.silu_mul_tile, G.qkv_rope_tile
    G.plain_tile = lambda n, k, m=1: choose(("plain", n, k), m) or plain(n, k, m)
    G.silu_mul_tile = lambda k, m=1: choose(("silu_mul", k), m) or silu_mul(k, m)
    G.qkv_rope_tile = lambda hd, k, m=1: choose(("qkv_rope", k), m) or qkv_rope(hd, k, m)


def from_table(table: dict[tuple, G.GemvTile]) -> Callable[[tuple, int], G.GemvTile | None]:
    """The table's tile for a product's row bucket, if it has one."""
    return lambda key, m: table.get((*key, row_bucket(m))) if row_bucket(m) else None


def everywhere(tile: G.GemvTile) -> Callable[[tuple, int], G.GemvTile | None]:
    """``tile`` for every product of 2-8 rows, its height the rows' bucket."""
    return lambda key, m: replace(tile, block_m=row_bucket(m)) if row_bucket(m) else None


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", help="a bench_gemv.py --few-rows-only result JSON")
    ap.add_argument("--tile", help="instead of --tiles: one per-row tile BLOCK_N,BLOCK_K,WARPS,STAGES for every "
                                   "product of 2-8 rows (its height the rows' power of two)")
    ap.add_argument("--variant", choices=("default", "few-rows"), required=True)
    args = ap.parse_args(argv[:split])
    module_argv = argv[split + 1:]
    if not module_argv:
        ap.error("name the benchmark module after --")
    if (args.tiles is None) == (args.tile is None):
        ap.error("give --tiles or --tile")
    if args.variant == "few-rows" and args.tiles:
        install(from_table(winning_tiles(json.loads(Path(args.tiles).read_text()))))
    elif args.variant == "few-rows":
        install(everywhere(G.GemvTile(*(int(v) for v in args.tile.split(",")))))
    sys.argv = module_argv
    runpy.run_module(module_argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
