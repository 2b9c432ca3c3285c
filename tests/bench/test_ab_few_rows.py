"""The few-row A/B (benchmarks/ab_few_rows.py) runs what its label says: the sweep's fastest
per-row tile where it beat the default, only for 2-8 rows, and the defaults everywhere else."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from eaglespec.ops import gemv as G

_spec = importlib.util.spec_from_file_location("ab_few_rows", Path(__file__).parents[2] / "benchmarks" / "ab_few_rows.py")
ab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ab)


def _row(shape, default_us, sweep):
    return {"weight_shape": shape, "default_tile_us": default_us,
            "sweep": [{"tile": tile, "us": us} for tile, us in sweep]}


SWEEP = {"rows": {"4": {"shapes": {
    # A tl.dot tile is fastest, but the A/B is about per-row tiles: the best of those, as it beat the default.
    "o_proj": _row([576, 576], 5.0, [([8, 128, 4, 3, 16], 3.0), ([8, 128, 2, 3, 4], 4.0), ([4, 64, 2, 3, 4], 4.5)]),
    "gate_up": _row([3072, 576], 5.0, [([8, 128, 2, 3, 4], 6.0)]),  # slower than the default: left out
    "qkv": _row([960, 576], 5.0, [([8, 64, 2, 2, 4], 4.2)]),
}}}}


def test_the_sweeps_winners_replace_the_defaults_only_where_they_won_and_only_for_2_to_8_rows(monkeypatch):
    for name in ("plain_tile", "silu_mul_tile", "qkv_rope_tile"):
        monkeypatch.setattr(G, name, getattr(G, name))  # restored after the test
    plain, silu_mul = G.plain_tile, G.silu_mul_tile
    ab.install(ab.from_table(ab.winning_tiles(SWEEP)))
    assert G.plain_tile(576, 576, 3) == G.GemvTile(8, 128, 2, 3, 4)  # 3 rows take the 4-row bucket
    assert G.qkv_rope_tile(64, 576, 4) == G.GemvTile(8, 64, 2, 2, 4)
    assert G.silu_mul_tile(576, 4) == silu_mul(576, 4)  # its per-row tile lost
    assert G.plain_tile(576, 576, 2) == plain(576, 576, 2)  # no 2-row sweep
    assert G.plain_tile(576, 576, 1) == plain(576, 576, 1) and G.plain_tile(576, 576, 9) == plain(576, 576, 9)
    assert G.plain_tile(576, 1536, 4) == plain(576, 1536, 4)  # a product the sweep did not cover


def test_one_tile_everywhere_takes_each_rows_bucket(monkeypatch):
    for name in ("plain_tile", "silu_mul_tile", "qkv_rope_tile"):
        monkeypatch.setattr(G, name, getattr(G, name))
    ab.install(ab.everywhere(G.GemvTile(8, 128, 2, 3)))
    assert [G.silu_mul_tile(576, m).block_m for m in (2, 3, 5, 8)] == [2, 4, 8, 8]
    assert G.plain_tile(576, 576, 1).block_m == 1 and G.qkv_rope_tile(64, 576, 9).block_m == 16
