"""The commit of accepted tree nodes' K/V: each chosen row of every layer lands at its cache slot,
nothing else in the cache moves; the one-launch Triton kernel equals its PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from eaglespec.ops.kv_commit import copy_kv_rows, copy_kv_rows_ref
from tests.conftest import DEVICE, needs_triton_kernels


def _case(layers: int, rows: int, blocks: int, block_size: int, hkv: int, d: int, entries: int, seed: int,
          dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    tree_k = torch.randn(layers, rows, hkv, d, generator=gen).to(DEVICE, dtype)
    tree_v = torch.randn(layers, rows, hkv, d, generator=gen).to(DEVICE, dtype)
    cache_k = torch.randn(layers, blocks, block_size, hkv, d, generator=gen).to(DEVICE, dtype)
    cache_v = torch.randn(layers, blocks, block_size, hkv, d, generator=gen).to(DEVICE, dtype)
    picked = torch.randint(0, rows, (entries,), generator=gen).to(DEVICE)
    slots = torch.randperm(blocks * block_size, generator=gen)[:entries].to(DEVICE)  # distinct slots
    return tree_k, tree_v, cache_k, cache_v, picked, slots


def test_reference_moves_each_chosen_row_of_every_layer_and_nothing_else():
    tree_k, tree_v, cache_k, cache_v, rows, slots = _case(3, 8, 4, 4, 2, 8, entries=5, seed=0)
    before_k, before_v = cache_k.clone(), cache_v.clone()
    copy_kv_rows_ref(tree_k, tree_v, cache_k, cache_v, rows, slots)
    flat_k, flat_v = cache_k.view(3, 16, 2, 8), cache_v.view(3, 16, 2, 8)
    for e in range(5):
        assert torch.equal(flat_k[:, slots[e]], tree_k[:, rows[e]])
        assert torch.equal(flat_v[:, slots[e]], tree_v[:, rows[e]])
    untouched = torch.ones(16, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    assert torch.equal(flat_k[:, untouched], before_k.view(3, 16, 2, 8)[:, untouched])
    assert torch.equal(flat_v[:, untouched], before_v.view(3, 16, 2, 8)[:, untouched])


@needs_triton_kernels
@pytest.mark.parametrize("layers,rows,hkv,d,entries,dtype", [(2, 4, 3, 64, 4, torch.float32),
                                                               (3, 17, 2, 16, 9, torch.bfloat16),
                                                               (1, 6, 1, 40, 3, torch.float32)])
def test_kernel_matches_reference(layers, rows, hkv, d, entries, dtype):
    tree_k, tree_v, cache_k, cache_v, picked, slots = _case(layers, rows, 5, 4, hkv, d, entries, seed=rows, dtype=dtype)
    want_k, want_v = cache_k.clone(), cache_v.clone()
    copy_kv_rows_ref(tree_k, tree_v, want_k, want_v, picked, slots)
    copy_kv_rows(tree_k, tree_v, cache_k, cache_v, picked, slots)
    assert torch.equal(cache_k, want_k) and torch.equal(cache_v, want_v)


@needs_triton_kernels
def test_kernel_names_a_wrong_shape_or_index_dtype():
    tree_k, tree_v, cache_k, cache_v, rows, slots = _case(2, 4, 3, 2, 2, 8, entries=2, seed=1)
    with pytest.raises(ValueError, match="caches must be contiguous"):
        copy_kv_rows(tree_k, tree_v, cache_k[:1], cache_v[:1], rows, slots)
    with pytest.raises(ValueError, match="tree K/V must be contiguous"):
        copy_kv_rows(tree_k[:, :, 0], tree_v[:, :, 0], cache_k, cache_v, rows, slots)
    with pytest.raises(ValueError, match="rows and slots must be"):
        copy_kv_rows(tree_k, tree_v, cache_k, cache_v, rows.int(), slots)
