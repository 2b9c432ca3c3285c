"""The fused draft top-k kernel against its PyTorch reference (and the reference against the
plain torch sequence it replaces)."""

from __future__ import annotations

import pytest
import torch

from eaglespec.ops.draft_topk import draft_topk, draft_topk_ref, top_k_lowest_index_first
from tests.conftest import DEVICE, needs_triton_kernels, seeded_randn


def test_reference_matches_log_softmax_topk():
    hidden = seeded_randn(5, 24, seed=1, dtype=torch.float32).cpu()
    weight = seeded_randn(301, 24, seed=2, dtype=torch.float32).cpu()
    values, ids = draft_topk_ref(hidden, weight, 7)
    ref_v, ref_i = torch.topk(torch.log_softmax(hidden @ weight.T, dim=-1), 7, dim=-1)
    torch.testing.assert_close(values, ref_v, atol=1e-5, rtol=1e-5)
    assert torch.equal(ids, ref_i)


def test_top_k_equals_a_stable_sort_where_values_tie():
    """The reference's two top-k passes pick and order exactly what a stable descending sort
    does, on rows full of ties (small integers, -inf and inf), for every k."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(400):
        rows, vocab = int(torch.randint(1, 5, (1,), generator=gen)), int(torch.randint(1, 40, (1,), generator=gen))
        logits = torch.randint(-3, 3, (rows, vocab), generator=gen).float()
        logits[torch.rand(rows, vocab, generator=gen) < 0.1] = float("-inf")
        logits[torch.rand(rows, vocab, generator=gen) < 0.05] = float("inf")
        for k in range(1, vocab + 1):
            want_v, want_i = torch.sort(logits, dim=-1, descending=True, stable=True)
            values, ids = top_k_lowest_index_first(logits, k)
            assert torch.equal(ids, want_i[:, :k]), (logits, k)
            assert torch.equal(values, want_v[:, :k])


@needs_triton_kernels
@pytest.mark.parametrize("rows,size,vocab,k", [(1, 24, 301, 1), (3, 40, 97, 5), (17, 64, 1000, 8), (40, 16, 130, 3)])
def test_kernel_matches_reference_fp32(rows, size, vocab, k):
    hidden = seeded_randn(rows, size, seed=rows + size, scale=2.0)
    weight = seeded_randn(vocab, size, seed=vocab)
    values, ids = draft_topk(hidden, weight, k)
    ref_v, ref_i = draft_topk_ref(hidden, weight, k)
    assert ids.dtype == torch.int64 and values.dtype == torch.float32
    assert torch.equal(ids, ref_i)
    torch.testing.assert_close(values, ref_v, atol=1e-4, rtol=1e-5)


@needs_triton_kernels
def test_kernel_bf16_and_strided_rows():
    base = seeded_randn(6, 96, seed=3, dtype=torch.bfloat16, scale=0.25)
    hidden = base[:, 16:80]  # rows with a stride larger than their width
    weight = seeded_randn(513, 64, seed=4, dtype=torch.bfloat16)
    values, ids = draft_topk(hidden, weight, 4)
    ref_v, ref_i = draft_topk_ref(hidden, weight, 4)
    # Logits up to ~8 here: one bf16 rounding step of a logit is 1/32; allow two.
    torch.testing.assert_close(values, ref_v, atol=2 / 32, rtol=0)
    # bf16 logits tie often; both sides break ties by index, so the ids agree wherever the
    # rounded logits do (compare the logits each chose, not only the ids).
    logits = torch.nn.functional.linear(hidden, weight).float()
    torch.testing.assert_close(torch.gather(logits, 1, ids), torch.gather(logits, 1, ref_i), atol=2 / 32, rtol=0)


@needs_triton_kernels
def test_ties_go_to_the_lowest_index_across_tiles():
    size, vocab = 32, 700
    weight = seeded_randn(vocab, size, seed=5)
    # Equal rows in different vocabulary tiles (tiles are 128 wide), each at the same place in
    # its tile: exactly equal logits. (The interpreter's tile product may round a column by its
    # place in the tile, as CPU matrix products do, so other places need not tie exactly.)
    weight[515] *= 4.0  # make the group the best by far for positive dot products
    weight[3] = weight[131] = weight[259] = weight[643] = weight[515]
    hidden = weight[515:516].clone()
    values, ids = draft_topk(hidden, weight, 5)
    ref_v, ref_i = draft_topk_ref(hidden, weight, 5)
    assert ids.tolist() == [[3, 131, 259, 515, 643]]
    assert torch.equal(ids, ref_i)
    torch.testing.assert_close(values, ref_v, atol=1e-4, rtol=1e-5)


@needs_triton_kernels
def test_ids_map_to_the_target_vocabulary():
    weight = seeded_randn(200, 16, seed=6)
    hidden = seeded_randn(4, 16, seed=7)
    to_target = (torch.arange(200) * 3 + 11).to(DEVICE)
    _, ids = draft_topk(hidden, weight, 6, to_target, target_vocab=700)
    _, ref = draft_topk_ref(hidden, weight, 6, to_target, target_vocab=700)
    _, raw = draft_topk_ref(hidden, weight, 6)
    assert torch.equal(ids, ref) and torch.equal(ids, raw * 3 + 11)


@needs_triton_kernels
def test_launcher_rejects_bad_input():
    hidden = seeded_randn(2, 16, seed=8)
    weight = seeded_randn(50, 16, seed=9)
    with pytest.raises(ValueError, match="weight is \\[50, 8\\]"):
        draft_topk(hidden, weight[:, :8].contiguous(), 3)
    with pytest.raises(ValueError, match="k must be"):
        draft_topk(hidden, weight, 0)
    with pytest.raises(ValueError, match="weight dtype"):
        draft_topk(hidden, weight.double(), 3)
    with pytest.raises(ValueError, match="to_target must be int64"):
        draft_topk(hidden, weight, 3, torch.arange(49, device=hidden.device))


@needs_triton_kernels
@pytest.mark.parametrize("poison", ["nan_rows", "inf_row", "nan_hidden", "neg_inf_row"])
def test_broken_heads_give_finite_ordered_scores(poison):
    """NaN or inf anywhere: the same finite log-probs in [floor, 0] and ids from kernel and reference."""
    hidden = seeded_randn(3, 16, seed=10)
    weight = seeded_randn(300, 16, seed=11)
    if poison == "nan_rows":
        weight[[5, 140]] = float("nan")
    elif poison == "inf_row":
        weight[200, 0] = float("inf")
    elif poison == "nan_hidden":
        hidden[1, 3] = float("nan")
    else:
        weight[7] = float("-inf")
    values, ids = draft_topk(hidden, weight, 4)
    ref_v, ref_i = draft_topk_ref(hidden, weight, 4)
    assert torch.isfinite(values).all() and (values <= 0).all() and (values >= -1e4).all()
    assert torch.equal(ids, ref_i)
    torch.testing.assert_close(values, ref_v, atol=1e-4, rtol=1e-5)
    assert bool((values[:, :-1] >= values[:, 1:]).all())


@needs_triton_kernels
def test_mapped_ids_are_clamped_into_the_target_vocabulary():
    weight = seeded_randn(40, 16, seed=12)
    hidden = seeded_randn(2, 16, seed=13)
    to_target = torch.where(torch.arange(40) % 2 == 0, torch.arange(40) + 100, -torch.arange(40)).to(DEVICE)
    _, ids = draft_topk(hidden, weight, 6, to_target, target_vocab=61)
    _, ref = draft_topk_ref(hidden, weight, 6, to_target, target_vocab=61)
    assert torch.equal(ids, ref) and bool(((ids == 0) | (ids == 60)).all())
