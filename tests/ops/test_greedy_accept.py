"""Greedy acceptance + commit indices kernel against its PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from eaglespec.ops.greedy_accept import extend_indices, extend_indices_ref, greedy_accept, greedy_accept_ref
from eaglespec.ops.tree_expand import ancestor_bits_from_parents
from tests.conftest import DEVICE, needs_triton_kernels


def random_trees(bsz, nodes, max_depth, vocab, seed):
    """Random trees with distinct sibling tokens and a target argmax that often follows them."""
    gen = torch.Generator().manual_seed(seed)
    parents = torch.full((bsz, nodes), -1, dtype=torch.int64)
    depth = torch.zeros((bsz, nodes), dtype=torch.int64)
    tokens = torch.zeros((bsz, nodes), dtype=torch.int64)
    for b in range(bsz):
        tokens[b, 0] = int(torch.randint(vocab, (1,), generator=gen))
        for i in range(1, nodes):
            while True:
                p = int(torch.randint(i, (1,), generator=gen))
                if depth[b, p] < max_depth:
                    break
            parents[b, i], depth[b, i] = p, depth[b, p] + 1
            used = set(tokens[b, 1:i][parents[b, 1:i] == p].tolist())
            tokens[b, i] = next(t for t in torch.randperm(vocab, generator=gen).tolist() if t not in used)
    # The argmax at a node: mostly one of its children's tokens, so paths get accepted.
    best = torch.randint(vocab, (bsz, nodes), generator=gen)
    for b in range(bsz):
        for i in range(nodes):
            kids = (parents[b] == i).nonzero().flatten().tolist()
            if kids and (i == 0 or torch.rand((), generator=gen) < 0.8):
                best[b, i] = tokens[b, kids[int(torch.randint(len(kids), (1,), generator=gen))]]
    bits = ancestor_bits_from_parents(parents, max_depth)
    return [t.to(DEVICE) for t in (tokens, parents, depth, bits, best)]


@needs_triton_kernels
@pytest.mark.parametrize("bsz,nodes,max_depth,seed", [(1, 33, 5, 0), (6, 9, 3, 1), (3, 4, 3, 2), (16, 64, 7, 3),
                                                       (2, 1, 2, 4)])
def test_kernel_matches_reference(bsz, nodes, max_depth, seed):
    tree = random_trees(bsz, nodes, max_depth, 50, seed)
    block_size, max_blocks = 4, 30
    gen = torch.Generator().manual_seed(seed + 100)
    tables = torch.randint(1, 500, (bsz, max_blocks), generator=gen, dtype=torch.int32).to(DEVICE)
    lens = torch.randint(0, 100, (bsz,), generator=gen, dtype=torch.int32).to(DEVICE)
    acc, where = greedy_accept(*tree, max_depth, lens, tables, block_size)
    ref_acc, ref_where = greedy_accept_ref(*tree, max_depth, lens, tables, block_size)
    assert torch.equal(acc.tokens, ref_acc.tokens)
    assert torch.equal(acc.num_emitted, ref_acc.num_emitted)
    assert torch.equal(acc.path, ref_acc.path)
    assert torch.equal(where.slots, ref_where.slots) and torch.equal(where.rows, ref_where.rows)
    if nodes > 8:  # the test has power: some sequences accept drafted tokens
        assert int(ref_acc.num_emitted.max()) > 1


@needs_triton_kernels
def test_orphans_are_never_accepted():
    tokens = torch.tensor([[5, 9, 7]], device=DEVICE)
    parents = torch.tensor([[-1, 0, -1]], device=DEVICE)
    depth = torch.tensor([[0, 1, 2]], device=DEVICE)
    best = torch.tensor([[7, 3, 3]], device=DEVICE)
    bits = ancestor_bits_from_parents(parents, 2)
    tables = torch.tensor([[3, 4]], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([6], dtype=torch.int32, device=DEVICE)
    acc, where = greedy_accept(tokens, parents, depth, bits, best, 2, lens, tables, 4)
    assert acc.tokens.tolist() == [[7, -1, -1]] and acc.num_emitted.tolist() == [1]
    assert acc.path.tolist() == [[0, -1, -1]]
    assert where.slots.tolist() == [4 * 4 + 2, 0, 0]  # position 6: block table entry 1 (block 4), offset 2 and where.rows.tolist() == [0, 0, 0]


@needs_triton_kernels
def test_launcher_rejects_bad_input():
    tree = random_trees(2, 5, 3, 20, 5)
    tables = torch.zeros(2, 4, dtype=torch.int32, device=DEVICE)
    lens = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="best must be a contiguous int64"):
        greedy_accept(*tree[:4], tree[4].int(), 3, lens, tables, 4)
    with pytest.raises(ValueError, match="block_tables must be int32"):
        greedy_accept(*tree, 3, lens, tables.long(), 4)


@needs_triton_kernels
@pytest.mark.parametrize("bsz,width", [(1, 4), (5, 6), (16, 2)])
def test_extend_indices_match_reference(bsz, width):
    gen = torch.Generator().manual_seed(bsz * 10 + width)
    counts = torch.randint(1, width + 1, (bsz,), generator=gen).to(DEVICE)
    lens = torch.randint(0, 60, (bsz,), generator=gen, dtype=torch.int32).to(DEVICE)
    tables = torch.randint(1, 300, (bsz, 20), generator=gen, dtype=torch.int32).to(DEVICE)
    got = extend_indices(counts, lens, tables, 4, width)
    ref = extend_indices_ref(counts, lens, tables, 4, width)
    assert torch.equal(got.positions, ref.positions) and torch.equal(got.last_rows, ref.last_rows)
    assert torch.equal(got.commit.slots, ref.commit.slots) and torch.equal(got.commit.rows, ref.commit.rows)
    # Pairs past the count go to the scratch slot; the last real pair is row count - 1.
    slots = ref.commit.slots.view(bsz, width)
    assert bool((slots[torch.arange(width, device=DEVICE)[None, :] >= counts[:, None]] == 0).all())
    assert torch.equal(ref.last_rows, torch.arange(bsz, device=DEVICE) * width + counts - 1)
