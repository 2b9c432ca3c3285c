"""The head's pending window: a plain step's pair is appended behind the pending ones, the
oldest dropped from a full window; the Triton kernel equals its PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from eaglespec.ops.pending import append_pending, append_pending_ref
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
