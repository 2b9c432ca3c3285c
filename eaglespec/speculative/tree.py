"""Token trees: their static shape (chain, static choices, EAGLE-2 dynamic) and the fixed-shape
tensors a batch of trees is verified with.

Drafting proceeds level by level. At each depth a fixed number of *frontier* nodes per
sequence runs through the draft head, and each proposes ``branch`` children ranked by draft
log-probability. What becomes the next frontier, and which proposals enter the verified tree,
depends on the kind:
  chain    one frontier node and its best child;
  static   the nodes a choices list names (child ranks per path), the same for every sequence;
  dynamic  EAGLE-2: the TOPK proposals with the best cumulative log-probability become the next
           frontier; at the end the NODES best proposals overall form the tree.
Every proposal is a *candidate*; candidates are kept in one pool per sequence, and the tree is
chosen from the pool in the end. A child's cumulative score never exceeds its parent's, so the
best NODES candidates always include each chosen node's parent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from eaglespec.ops.tree_expand import ancestor_bits_from_parents  # noqa: F401  (one definition, used with trees)

MAX_TREE_NODES = 64  # ancestor masks are int64 bitmasks


@dataclass(slots=True)
class TreeShape:
    """Static description of the trees a run drafts (same for every step and sequence)."""

    kind: str  # "chain", "static" or "dynamic"
    depth: int  # draft levels below the root
    branch: int  # children proposed per frontier node
    frontier: list[int]  # frontier nodes per depth 1..depth (how many run through the head)
    num_nodes: int  # draft nodes in the verified tree (the root not counted)
    # static trees: for depth d >= 1 the frontier node of each node at depth d (its parent's
    # index among depth d-1 nodes; 0 = root for depth 1) and its child rank
    static_parent: list[list[int]] | None = None
    static_rank: list[list[int]] | None = None

    @property
    def verify_nodes(self) -> int:
        """Tree nodes verified per sequence, the root included."""
        return self.num_nodes + 1

    @property
    def draft_slots(self) -> int:
        """Draft-side tree K/V slots (one per frontier node that runs through the head)."""
        return sum(self.frontier[: self.depth - 1])

    @property
    def pool_size(self) -> int:
        """Candidates kept per sequence."""
        if self.kind != "dynamic":
            return self.num_nodes
        return self.branch + sum(f * self.branch for f in self.frontier[: self.depth - 1])


def parse_tree(spec: str) -> TreeShape:
    """``chain:K`` | ``dynamic:DEPTH,TOPK,NODES`` | path to a JSON list of choices."""
    if spec.startswith("chain:"):
        k = int(spec.split(":", 1)[1])
        if not 1 <= k < MAX_TREE_NODES:
            raise ValueError(f"tree {spec!r}: chain length must be in [1, {MAX_TREE_NODES - 1}]")
        return TreeShape("chain", k, 1, [1] * k, k)
    if spec.startswith("dynamic:"):
        try:
            depth, topk, nodes = (int(x) for x in spec.split(":", 1)[1].split(","))
        except ValueError:
            raise ValueError(f"tree {spec!r}: expected dynamic:DEPTH,TOPK,NODES") from None
        if depth < 1 or topk < 1 or nodes < 1:
            raise ValueError(f"tree {spec!r}: DEPTH, TOPK and NODES must be positive")
        if nodes + 1 > MAX_TREE_NODES:
            raise ValueError(f"tree {spec!r}: at most {MAX_TREE_NODES - 1} nodes")
        if depth * topk > MAX_TREE_NODES:
            raise ValueError(f"tree {spec!r}: DEPTH*TOPK must be <= {MAX_TREE_NODES}")
        pool = topk + (depth - 1) * topk * topk
        return TreeShape("dynamic", depth, topk, [topk] * depth, min(nodes, pool))
    with open(spec) as f:
        try:
            choices = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"tree file {spec!r} is not JSON: {exc}") from None
    return static_tree(choices, source=spec)


def static_tree(choices: list[list[int]], source: str = "choices") -> TreeShape:
    """A tree from EAGLE/Medusa-style choices: each entry is a path of child ranks from the root."""
    if not isinstance(choices, list) or not choices or not all(isinstance(c, list) and c for c in choices):
        raise ValueError(f"{source}: expected a non-empty JSON list of non-empty lists of child ranks")
    paths = sorted({tuple(int(r) for r in c) for c in choices}, key=lambda p: (len(p), p))
    if len(paths) + 1 > MAX_TREE_NODES:
        raise ValueError(f"{source}: {len(paths)} nodes, at most {MAX_TREE_NODES - 1}")
    known = {()}
    for p in paths:
        if min(p) < 0:
            raise ValueError(f"{source}: negative child rank in {list(p)}")
        if p[:-1] not in known:
            raise ValueError(f"{source}: path {list(p)} has no parent path {list(p[:-1])}")
        known.add(p)
    depth = max(len(p) for p in paths)
    by_depth = [[p for p in paths if len(p) == d] for d in range(1, depth + 1)]
    parent_idx, ranks = [], []
    for d, level in enumerate(by_depth):
        prev = [()] if d == 0 else by_depth[d - 1]
        parent_idx.append([prev.index(p[:-1]) for p in level])
        ranks.append([p[-1] for p in level])
    branch = max(max(r) for r in ranks) + 1
    return TreeShape("static", depth, branch, [len(level) for level in by_depth], len(paths),
                     static_parent=parent_idx, static_rank=ranks)


@dataclass(slots=True)
class TreeBatch:
    """A batch of trees ready to verify; node 0 of each is the root (the last emitted token)."""

    tokens: torch.Tensor  # [B, N] int64
    parents: torch.Tensor  # [B, N] int64 parent node index, -1 for the root
    depth: torch.Tensor  # [B, N] int64, root 0
    ancestor_bits: torch.Tensor  # [B, N] int64, bit j of row i set when node j is i or its ancestor
