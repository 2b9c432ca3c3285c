"""Tree expansion and tree layout kernels against their PyTorch references."""

from __future__ import annotations

import pytest
import torch

from eaglespec.ops.tree_expand import (CandidatePool, Level, ancestor_bits_from_parents, expand_level,
                                       expand_level_ref, select_tree, select_tree_ref)
from tests.conftest import DEVICE, needs_triton_kernels


def _children(bsz, rows, branch, vocab, gen, ties=False):
    """Per frontier row, ``branch`` children best first (log-probs <= 0) and distinct tokens."""
    vals = -torch.rand(bsz, rows, branch, generator=gen).mul(3.0)
    if ties:  # coarse values: many equal scores across rows and levels
        vals = vals.mul(2).round().div(2)
    vals = vals.sort(dim=-1, descending=True).values
    toks = torch.stack([torch.randperm(vocab, generator=gen)[:rows * branch] for _ in range(bsz)])
    return vals.reshape(bsz, -1).to(DEVICE), toks.to(DEVICE)


def _grow(fn, bsz, depth, branch, width, static_cols, pool_depth, seed, ties):
    """Run ``fn`` (expand_level or its reference) over every level; returns the pool and frontiers."""
    gen = torch.Generator().manual_seed(seed)
    pool = CandidatePool.allocate(bsz, pool_depth)
    pool.tokens.fill_(-7)
    pool.scores.fill_(0)
    pool.parents.fill_(-7)
    frontiers, parent, offset, slot = [], None, 0, 0
    for d in range(depth):
        rows = 1 if parent is None else parent.tokens.shape[1]
        vals, toks = _children(bsz, rows, branch, 500, gen, ties)
        cols = None if static_cols is None else static_cols[d]
        w = width[d]
        level = Level(offset, w, slot, cols)
        parent_next = fn(vals, toks, parent, pool, level, branch)
        frontiers.append(parent_next)
        offset += w if cols is not None else vals.shape[1]
        slot += 0 if d == 0 else rows
        parent = parent_next
    return pool, frontiers


def _dynamic_setup(depth, topk):
    sizes = [topk] + [topk * topk] * (depth - 1)
    pool_depth = torch.cat([torch.full((s,), d + 1) for d, s in enumerate(sizes)]).to(DEVICE)
    return pool_depth, [topk] * depth


@needs_triton_kernels
@pytest.mark.parametrize("bsz,depth,topk,ties", [(1, 5, 8, False), (3, 4, 3, True), (2, 3, 1, False)])
def test_dynamic_levels_match_reference(bsz, depth, topk, ties):
    pool_depth, width = _dynamic_setup(depth, topk)
    ref_pool, ref_f = _grow(expand_level_ref, bsz, depth, topk, width, None, pool_depth, 11, ties)
    pool, fronts = _grow(expand_level, bsz, depth, topk, width, None, pool_depth, 11, ties)
    for name in ("tokens", "scores", "parents"):
        assert torch.equal(getattr(pool, name), getattr(ref_pool, name)), name
    for a, b in zip(fronts, ref_f):
        for name in ("tokens", "scores", "pool_index", "rows", "bits"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    # The frontier really is the best of the level, and its parents are the rows it came from.
    assert bool((ref_f[1].scores[:, :-1] >= ref_f[1].scores[:, 1:]).all())


@needs_triton_kernels
def test_static_levels_match_reference():
    # depth 1: ranks 0,1,2; depth 2: (0,0),(0,1),(1,0); depth 3: (0,0,0)
    branch = 3
    cols = [torch.tensor(c, device=DEVICE) for c in ([0, 1, 2], [0, 1, branch], [0])]
    width = [3, 3, 1]
    pool_depth = torch.tensor([1, 1, 1, 2, 2, 2, 3], device=DEVICE)
    ref_pool, ref_f = _grow(expand_level_ref, 2, 3, branch, width, cols, pool_depth, 5, False)
    pool, fronts = _grow(expand_level, 2, 3, branch, width, cols, pool_depth, 5, False)
    for name in ("tokens", "scores", "parents"):
        assert torch.equal(getattr(pool, name), getattr(ref_pool, name)), name
    for a, b in zip(fronts, ref_f):
        for name in ("tokens", "scores", "pool_index", "rows", "bits"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert ref_pool.parents[0].tolist() == [-1, -1, -1, 0, 0, 1, 3]


@needs_triton_kernels
@pytest.mark.parametrize("bsz,depth,topk,nodes,ties", [(1, 5, 8, 32, False), (4, 3, 3, 8, True),
                                                       (2, 4, 4, 12, False), (2, 3, 1, 3, False)])
def test_select_tree_matches_reference(bsz, depth, topk, nodes, ties):
    pool_depth, width = _dynamic_setup(depth, topk)
    pool, _ = _grow(expand_level_ref, bsz, depth, topk, width, None, pool_depth, 17, ties)
    root = torch.arange(bsz, device=DEVICE) + 900
    got = select_tree(pool, root, nodes, depth)
    ref = select_tree_ref(pool, root, nodes, depth)
    for name, a, b in zip(("tokens", "parents", "depth", "bits"), got, ref):
        assert torch.equal(a, b), name
    tokens, parents, depths, bits = ref
    # A valid tree: parents precede children, depth = parent's + 1, bits = own | the parent's.
    assert bool((parents[:, 1:] < torch.arange(1, nodes + 1, device=DEVICE)).all())
    parent_depth = torch.gather(depths, 1, parents[:, 1:].clamp_min(0))
    assert torch.equal(depths[:, 1:], parent_depth + 1)
    assert torch.equal(bits, ancestor_bits_from_parents(parents, depth))
    assert torch.equal(tokens[:, 0], root)


@needs_triton_kernels
def test_launchers_reject_bad_input():
    pool_depth, _ = _dynamic_setup(2, 2)
    pool = CandidatePool.allocate(1, pool_depth)
    vals = torch.zeros(1, 2, device=DEVICE)
    toks = torch.zeros(1, 2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="child_values must be a contiguous torch.float32"):
        expand_level(vals.double(), toks, None, pool, Level(0, 2, 0), 2)
    with pytest.raises(ValueError, match="level writes pool columns"):
        expand_level(vals, toks, None, pool, Level(5, 2, 0), 2)
    with pytest.raises(ValueError, match="num_nodes must be"):
        select_tree(pool, torch.zeros(1, dtype=torch.int64, device=DEVICE), 0, 2)
