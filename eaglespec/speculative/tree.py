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


def ancestor_bits_from_parents(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """[B, N] parents (parents before children, -1 = none) -> [B, N] int64 ancestor bitmasks."""
    n = parents.shape[1]
    own = torch.ones((), dtype=torch.int64, device=parents.device) << torch.arange(n, device=parents.device)
    bits = own.expand_as(parents).clone()
    has_parent = parents >= 0
    safe = parents.clamp_min(0)
    for _ in range(max_depth):  # each pass pulls in one more generation
        inherited = torch.gather(bits, 1, safe)
        bits = torch.where(has_parent, own | inherited, own)
    return bits


def select_tree(pool_tokens: torch.Tensor, pool_scores: torch.Tensor, pool_parent: torch.Tensor,
                pool_depth: torch.Tensor, root_tokens: torch.Tensor, num_nodes: int,
                max_depth: int) -> TreeBatch:
    """Choose the ``num_nodes`` best candidates per sequence and lay them out as a tree.

    pool_* [B, P]: candidate tokens, cumulative draft log-probabilities, parent candidate index
    (-1 = the root) and depth (>= 1). Nodes come out ordered by depth, then by score, so every
    parent precedes its children and siblings are tried best first. Should degenerate scores
    (ties a finite precision cannot break) choose a node without its parent, that node gets
    parent -1 and is never accepted: a broken draft costs speed, never correctness.
    """
    bsz, _ = pool_tokens.shape
    dev = pool_tokens.device
    # A tiny depth penalty breaks ties towards parents: a child's key is then strictly smaller.
    key = pool_scores - 1e-4 * pool_depth.float()
    _, chosen = torch.topk(key, num_nodes, dim=1)  # [B, K] best first
    chosen_depth = torch.gather(pool_depth, 1, chosen)
    order = torch.sort(chosen_depth, dim=1, stable=True).indices
    chosen = torch.gather(chosen, 1, order)
    node_of_candidate = torch.full_like(pool_tokens, -1)
    node_ids = torch.arange(1, num_nodes + 1, device=dev).expand(bsz, -1)
    node_of_candidate.scatter_(1, chosen, node_ids)
    cand_parent = torch.gather(pool_parent, 1, chosen)
    parent_node = torch.where(cand_parent >= 0, torch.gather(node_of_candidate, 1, cand_parent.clamp_min(0)),
                              torch.zeros_like(cand_parent))
    minus_one = torch.full((bsz, 1), -1, dtype=torch.int64, device=dev)
    parents = torch.cat([minus_one, parent_node], dim=1)
    tokens = torch.cat([root_tokens[:, None], torch.gather(pool_tokens, 1, chosen)], dim=1)
    depth = torch.cat([torch.zeros_like(minus_one), torch.gather(pool_depth, 1, chosen)], dim=1)
    return TreeBatch(tokens, parents, depth, ancestor_bits_from_parents(parents, max_depth))
