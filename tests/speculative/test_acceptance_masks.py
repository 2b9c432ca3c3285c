"""Greedy acceptance from bit masks equals the greedy walk on trees with distinct siblings."""

from __future__ import annotations

import torch

from eaglespec.speculative.acceptance import accept_greedy, accept_greedy_by_masks
from eaglespec.speculative.tree import ancestor_bits_from_parents


def random_tree(batch: int, nodes: int, max_depth: int, vocab: int, gen: torch.Generator):
    """Random trees whose siblings carry distinct tokens, and logits that often agree with them."""
    parents = torch.full((batch, nodes), -1, dtype=torch.int64)
    depth = torch.zeros((batch, nodes), dtype=torch.int64)
    tokens = torch.zeros((batch, nodes), dtype=torch.int64)
    for b in range(batch):
        used: dict[int, set[int]] = {}
        for i in range(1, nodes):
            while True:
                p = int(torch.randint(0, i, (1,), generator=gen))
                if depth[b, p] < max_depth:
                    break
            parents[b, i], depth[b, i] = p, depth[b, p] + 1
            taken = used.setdefault(p, set())
            tok = int(torch.randint(0, vocab, (1,), generator=gen))
            while tok in taken:
                tok = (tok + 1) % vocab
            taken.add(tok)
            tokens[b, i] = tok
    logits = torch.randn(batch, nodes, vocab, generator=gen)
    # Make the target agree with a random child of many nodes so that paths get deep.
    for b in range(batch):
        for i in range(nodes):
            kids = (parents[b] == i).nonzero().flatten().tolist()
            if kids and torch.rand(1, generator=gen) < 0.8:
                k = kids[int(torch.randint(0, len(kids), (1,), generator=gen))]
                logits[b, i, tokens[b, k]] += 10.0
    return tokens, parents, depth, logits


def test_masks_equal_the_walk_on_random_trees():
    gen = torch.Generator().manual_seed(0)
    deepest = 0
    for nodes, max_depth in [(2, 1), (9, 3), (33, 5), (61, 7), (64, 12)]:
        tokens, parents, depth, logits = random_tree(16, nodes, max_depth, vocab=12, gen=gen)
        bits = ancestor_bits_from_parents(parents, max_depth)
        valid = torch.ones_like(tokens, dtype=torch.bool)
        walk = accept_greedy(tokens, parents, depth, valid, logits, max_depth)
        fast = accept_greedy_by_masks(tokens, parents, depth, bits, logits.argmax(-1), max_depth)
        assert torch.equal(fast.num_emitted, walk.num_emitted)
        assert torch.equal(fast.tokens, walk.tokens)
        assert torch.equal(fast.path, walk.path)
        deepest = max(deepest, int(walk.num_emitted.max()))
    assert deepest >= 5  # the trees really were accepted deeply
