"""The head's pending window: a plain step's pair is appended behind the pending ones, the
oldest dropped from a full window; the Triton kernel equals its PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from eaglespec.ops.pending import (append_pending, append_pending_ref, store_pending, store_pending_ref, take_pending,
                                   take_pending_ref)
from tests.conftest import DEVICE, needs_triton_kernels


def _state(num_slots: int, width: int, size: int, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(num_slots, width, size, generator=gen).to(DEVICE, dtype)
    tokens = torch.randint(0, 1000, (num_slots, width), generator=gen).to(DEVICE)
    counts = torch.randint(1, width + 1, (num_slots,), generator=gen).to(DEVICE)
    return feats, tokens, counts


def test_reference_appends_behind_the_pending_pairs_and_drops_the_oldest_of_a_full_window():
    feats, tokens, counts = _state(4, 3, 2, seed=0)
    counts.copy_(torch.tensor([1, 2, 3, 3], device=DEVICE))
    before_f, before_t = feats.clone(), tokens.clone()
    slots = torch.tensor([0, 1, 2], device=DEVICE)  # slot 3 is not in the batch
    new_f = torch.full((3, 2), 7.0, device=DEVICE)
    new_t = torch.tensor([70, 71, 72], device=DEVICE)
    append_pending_ref(feats, tokens, counts, slots, new_f, new_t)
    assert counts.tolist() == [2, 3, 3, 3]
    assert tokens[0, :2].tolist() == [before_t[0, 0].item(), 70]
    assert tokens[1].tolist() == [*before_t[1, :2].tolist(), 71]
    assert tokens[2].tolist() == [*before_t[2, 1:].tolist(), 72]  # full: the oldest pair left
    assert torch.equal(feats[2, :2], before_f[2, 1:]) and bool((feats[2, 2] == 7.0).all())
    assert torch.equal(feats[3], before_f[3]) and torch.equal(tokens[3], before_t[3])


@needs_triton_kernels
@pytest.mark.parametrize("bsz,width,size,dtype", [(1, 6, 576, torch.float32), (5, 4, 100, torch.bfloat16),
                                                  (9, 2, 300, torch.float32)])
def test_kernel_matches_reference(bsz, width, size, dtype):
    num_slots = 2 * bsz + 1
    got = _state(num_slots, width, size, seed=bsz + width, dtype=dtype)
    ref = tuple(t.clone() for t in got)
    gen = torch.Generator().manual_seed(7)
    slots = torch.randperm(num_slots - 1, generator=gen)[:bsz].to(DEVICE)
    new_f = torch.randn(bsz, size, generator=gen).to(DEVICE, dtype)
    new_t = torch.randint(0, 1000, (bsz,), generator=gen).to(DEVICE)
    append_pending(*got, slots, new_f, new_t)
    append_pending_ref(*ref, slots, new_f, new_t)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


@needs_triton_kernels
def test_kernel_refuses_mismatched_arguments():
    feats, tokens, counts = _state(3, 4, 8, seed=1)
    slots = torch.tensor([0, 1], device=DEVICE)
    with pytest.raises(ValueError, match="new_feats"):
        append_pending(feats, tokens, counts, slots, torch.zeros(2, 9, device=DEVICE), torch.zeros(2, dtype=torch.int64,
                                                                                                  device=DEVICE))
    with pytest.raises(ValueError, match="counts"):
        append_pending(feats, tokens, counts.int(), slots, torch.zeros(2, 8, device=DEVICE),
                       torch.zeros(2, dtype=torch.int64, device=DEVICE))


def test_reference_store_refills_the_first_columns_and_the_count_and_clamps_padding_tokens():
    feats, tokens, counts = _state(3, 4, 2, seed=2)
    before_f, before_t = feats.clone(), tokens.clone()
    slots = torch.tensor([2, 0], device=DEVICE)
    new_f = torch.arange(12.0, device=DEVICE).view(2, 3, 2)
    new_t = torch.tensor([[5, 6, -1], [7, 8, 9]], device=DEVICE)
    store_pending_ref(feats, tokens, counts, slots, new_f, new_t, torch.tensor([2, 3], device=DEVICE))
    assert tokens[2].tolist() == [5, 6, 0, before_t[2, 3].item()] and tokens[0, :3].tolist() == [7, 8, 9]
    assert torch.equal(feats[2, :3], new_f[0]) and torch.equal(feats[2, 3], before_f[2, 3])
    assert counts[2].item() == 2 and counts[0].item() == 3
    assert torch.equal(feats[1], before_f[1]) and torch.equal(tokens[1], before_t[1])
    took = take_pending_ref(feats, tokens, counts, slots)
    assert torch.equal(took[0][0], feats[2]) and took[1][1].tolist() == tokens[0].tolist()
    assert took[2].tolist() == [2, 3]


@needs_triton_kernels
@pytest.mark.parametrize("bsz,width,emit,size,dtype", [(1, 6, 4, 576, torch.float32), (5, 4, 4, 100, torch.bfloat16),
                                                       (3, 8, 2, 300, torch.float32)])
def test_take_and_store_kernels_match_their_references(bsz, width, emit, size, dtype):
    num_slots = 2 * bsz + 1
    got = _state(num_slots, width, size, seed=bsz + emit, dtype=dtype)
    ref = tuple(t.clone() for t in got)
    gen = torch.Generator().manual_seed(9)
    slots = torch.randperm(num_slots - 1, generator=gen)[:bsz].to(DEVICE)
    for a, b in zip(take_pending(*got, slots), take_pending_ref(*ref, slots)):
        assert torch.equal(a, b)
    new_f = torch.randn(bsz, emit, size, generator=gen).to(DEVICE, dtype)  # the engine's features share the window's dtype
    new_t = torch.randint(-1, 1000, (bsz, emit), generator=gen).to(DEVICE)
    new_c = torch.randint(1, emit + 1, (bsz,), generator=gen).to(DEVICE)
    store_pending(*got, slots, new_f, new_t, new_c)
    store_pending_ref(*ref, slots, new_f, new_t, new_c)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


@needs_triton_kernels
def test_store_kernel_names_a_window_too_narrow_for_the_path():
    feats, tokens, counts = _state(3, 2, 8, seed=3)
    slots = torch.tensor([0], device=DEVICE)
    with pytest.raises(ValueError, match="new_tokens must be"):
        store_pending(feats, tokens, counts, slots, torch.zeros(1, 3, 8, device=DEVICE),
                      torch.zeros(1, 3, dtype=torch.int64, device=DEVICE), torch.ones(1, dtype=torch.int64, device=DEVICE))
