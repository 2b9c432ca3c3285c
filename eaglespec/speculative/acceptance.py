"""Accepting a verified token tree on device: greedy, top-k children, sampled children.

Tree of one batch, fixed shapes (B sequences, N nodes each):
  tokens  [B, N] int64  node 0 = the root = the last token already emitted (its target
                        distribution proposes depth 1); nodes 1.. are draft tokens
  parents [B, N] int64  parent node index; -1 for the root and for padding
  depth   [B, N] int    root 0
  valid   [B, N] bool   False for padding nodes
Children have larger indices than their parent; siblings are tried in increasing index order
(the tree builder puts the best first). ``max_depth`` is a host int: the loops below run over
static ranges only, so the ops are CUDA-graph safe (no host synchronisation anywhere).

All three rules walk down from the root one depth at a time. At each depth the current node
either hands over to one accepted child, or the walk stops and emits a bonus token drawn from
what remains of the target distribution there. The outputs are -1 padded:
  tokens      [B, max_depth + 1]  accepted draft tokens, then the bonus token
  num_emitted [B]                 accepted + 1
  path        [B, max_depth + 1]  root, then each accepted node: the nodes whose K/V to keep

``accept_by_target_draws`` and ``accept_sampled_by_rows`` are the same walks reading the target
(and draft) only at the nodes visited, through callables. The engine's verifier walks this way
only for sampled trees of many rows (``speculative.verifier.accept_at_visited_nodes``); below
that it draws the target's token at every node at once and runs the greedy walk kernel on them
(``speculative.verifier.accept_tree``), tested against ``accept_by_target_draws``.

Randomness comes only from ``uniform_noise`` / ``sample_from_probs`` with the row's seed and
offset, so results do not depend on batch composition. Streams: the draw from the target at
depth d uses ``accept_stream(d, 0)``; the sibling tests of ``accept_sampled_children`` share
``accept_stream(0, 1)``, one noise column per (depth, sibling), made in one call.
"""

from __future__ import annotations

from typing import Callable

import torch

# The greedy rule by masks (and its kernel) lives with its kernel; re-exported for the other rules.
from eaglespec.ops.greedy_accept import AcceptResult, accept_greedy_by_masks  # noqa: F401
from eaglespec.ops.sampling import STREAM_ACCEPT, sample_from_probs, uniform_noise

ACCEPT_STREAM_STRIDE = 1024  # streams reserved per depth


def accept_stream(depth: int, slot: int = 0) -> int:
    """The noise stream of one draw of the acceptance walk."""
    return STREAM_ACCEPT + depth * ACCEPT_STREAM_STRIDE + slot


# ----------------------------------------------------------------------------- checks and helpers


def _walk_start(batch: int, width: int, device) -> tuple[torch.Tensor, ...]:
    """A tree walk at its roots: current node [B] (0), still walking [B], emitted tokens
    [B, width] and path [B, width] (-1 padded; the root is the path's first node)."""
    current = torch.zeros(batch, dtype=torch.int64, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    out_tokens = torch.full((batch, width), -1, dtype=torch.int64, device=device)
    path = torch.full((batch, width), -1, dtype=torch.int64, device=device)
    path[:, 0] = 0
    return current, active, out_tokens, path


def _check_tree(tokens: torch.Tensor, parents: torch.Tensor, depth: torch.Tensor, valid: torch.Tensor,
                max_depth: int) -> tuple[int, int]:
    if tokens.dim() != 2:
        raise ValueError(f"tree tokens must be [batch, nodes], got shape {tuple(tokens.shape)}")
    for name, t in (("parents", parents), ("depth", depth), ("valid", valid)):
        if t.shape != tokens.shape:
            raise ValueError(f"tree {name} must have the shape of tokens {tuple(tokens.shape)}, "
                             f"got {tuple(t.shape)}")
        if t.device != tokens.device:
            raise ValueError(f"tree {name} is on {t.device}, tokens on {tokens.device}")
    for name, t in (("tokens", tokens), ("parents", parents), ("depth", depth)):
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
            raise ValueError(f"tree {name} must be an integer tensor, got {t.dtype}")
    if valid.dtype != torch.bool:
        raise ValueError(f"tree valid must be bool, got {valid.dtype}")
    if not isinstance(max_depth, int) or max_depth < 0:
        raise ValueError(f"max_depth must be a host int >= 0, got {max_depth!r}")
    return tokens.shape[0], tokens.shape[1]


def _check_per_node(name: str, x: torch.Tensor, batch: int, nodes: int, device: torch.device) -> None:
    if x.dim() != 3 or x.shape[:2] != (batch, nodes):
        raise ValueError(f"{name} must be [batch={batch}, nodes={nodes}, vocab], got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, the tree on {device}")


def _check_rng(seeds: torch.Tensor, offsets: torch.Tensor, batch: int) -> None:
    for name, t in (("seeds", seeds), ("offsets", offsets)):
        if t.shape != (batch,) or t.dtype != torch.int64:
            raise ValueError(f"{name} must be int64 of shape ({batch},), got {t.dtype} {tuple(t.shape)}")


def _rows_at(x: torch.Tensor, node: torch.Tensor) -> torch.Tensor:
    """x [B, N, V] at one node per row, node [B] -> [B, V]."""
    batch, nodes, vocab = x.shape
    flat_index = torch.arange(batch, device=x.device) * nodes + node
    return x.reshape(batch * nodes, vocab).index_select(0, flat_index)


def _first_true(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first True per row of mask [B, N] (0 where there is none): [B] int64."""
    return mask.to(torch.int8).argmax(dim=1)  # argmax returns the first of equal maxima


def _children_of(current: torch.Tensor, parents: torch.Tensor, depth: torch.Tensor,
                 valid: torch.Tensor, child_depth: int) -> torch.Tensor:
    """[B, N] bool: valid nodes whose parent is the row's current node."""
    return valid & (parents == current[:, None]) & (depth == child_depth)


def accept_by_target_draws(tokens: torch.Tensor, parents: torch.Tensor, depth: torch.Tensor,
                           valid: torch.Tensor, max_depth: int,
                           draw: Callable[[int, torch.Tensor], torch.Tensor]) -> AcceptResult:
    """The walk behind greedy and top-k-children acceptance, for any way of drawing from the target.

    At depth d, ``draw(d, current)`` returns y [B] int64, a token drawn from the target's
    distribution at each row's current node (current [B] int64 node indices); the walk moves to
    the first valid child carrying y, or stops with y as the bonus token. Callers that only
    need the target distribution at the visited nodes (one row per depth) use this directly.
    """
    _check_tree(tokens, parents, depth, valid, max_depth)
    batch, width = tokens.shape[0], max_depth + 1
    device = tokens.device
    tokens = tokens.long()
    current, active, out_tokens, path = _walk_start(batch, width, device)
    for d in range(width):
        y = draw(d, current)
        out_tokens[:, d] = torch.where(active, y, -1)
        if d == max_depth:
            break
        match = _children_of(current, parents, depth, valid, d + 1) & (tokens == y[:, None])
        found = active & match.any(dim=1)
        child = _first_true(match)  # duplicates among siblings: the first one is the one tried first
        path[:, d + 1] = torch.where(found, child, -1)
        current = torch.where(found, child, current)
        active = found
    num_emitted = (out_tokens >= 0).sum(dim=1)
    return AcceptResult(tokens=out_tokens, num_emitted=num_emitted, path=path)


# ----------------------------------------------------------------------------- the three rules


def accept_greedy(tokens: torch.Tensor, parents: torch.Tensor, depth: torch.Tensor,
                  valid: torch.Tensor, target_logits: torch.Tensor, max_depth: int) -> AcceptResult:
    """Longest root path whose tokens equal the target argmax at their parent, then the bonus
    token = the argmax at the last accepted node. target_logits [B, N, V] (any float dtype)."""
    batch, nodes = _check_tree(tokens, parents, depth, valid, max_depth)
    _check_per_node("target_logits", target_logits, batch, nodes, tokens.device)
    return accept_by_target_draws(tokens, parents, depth, valid, max_depth,
                                  lambda d, node: _rows_at(target_logits, node).argmax(dim=-1))


def accept_topk_children(tokens: torch.Tensor, parents: torch.Tensor, depth: torch.Tensor,
                         valid: torch.Tensor, target_probs: torch.Tensor, seeds: torch.Tensor,
                         offsets: torch.Tensor, max_depth: int) -> AcceptResult:
    """Speculative sampling for children chosen deterministically (e.g. top-k of the draft q).

    target_probs [B, N, V] is the target's sampling distribution p at each node (already cut
    and renormalised by ``target_probs``); seeds/offsets [B] int64.

    The rule for a child set that is not random: q is a point mass on each child in turn, so
    child x_i is accepted with probability p(x_i) / (mass of p left), and on rejection p(x_i)
    is set to 0. Chaining these, child x_i is accepted with probability
    (1 - p(x_1) - ... - p(x_{i-1})) * p(x_i) / (1 - p(x_1) - ... - p(x_{i-1})) = p(x_i), and
    when all are rejected the bonus is drawn from p restricted to the other tokens, so a
    token y that is no child comes out with probability (1 - sum p(x_j)) * p(y) / (1 - sum
    p(x_j)) = p(y). Both are exactly what one draw y ~ p followed by "take the child whose
    token is y, else emit y as the bonus" gives, so that is what runs: one draw per depth.
    Duplicate siblings: the sequential rule would zero p(x) at the first copy, so a later copy
    is never accepted; taking the first child carrying y does the same.
    With temperature 0 the rows of p are one-hot and this is exactly ``accept_greedy``.
    """
    batch, nodes = _check_tree(tokens, parents, depth, valid, max_depth)
    _check_per_node("target_probs", target_probs, batch, nodes, tokens.device)
    _check_rng(seeds, offsets, batch)
    return accept_by_target_draws(
        tokens, parents, depth, valid, max_depth,
        lambda d, node: sample_from_probs(_rows_at(target_probs, node), seeds, offsets, accept_stream(d, 0)))


def _residual_after_rejection(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """normalize(max(p - q, 0)) per row; rows where that has no mass keep p.

    The mass is sum max(p - q, 0) = TV(p, q), zero only when p == q (both sum to 1). Then every
    child drawn from q passes min(1, p/q) = 1, so a rejection has probability zero and can
    only come from rounding (or from a child q gives no mass to, which is not a draw from q).
    Keeping p is the choice that stays a valid distribution on p's support and changes the
    output distribution by at most that rounding.
    """
    residual = (p - q).clamp_min(0.0)
    mass = residual.sum(dim=-1, keepdim=True)
    has_mass = mass > 0
    return torch.where(has_mass, residual / torch.where(has_mass, mass, torch.ones_like(mass)), p)


def accept_sampled_children(tokens: torch.Tensor, parents: torch.Tensor, depth: torch.Tensor,
                            valid: torch.Tensor, target_probs: torch.Tensor, draft_probs: torch.Tensor,
                            seeds: torch.Tensor, offsets: torch.Tensor, max_depth: int,
                            max_children: int) -> AcceptResult:
    """Multi-round speculative sampling (SpecInfer) for children drawn iid from q.

    target_probs [B, N, V]: the target's p at each node; draft_probs [B, N, V]: the q each
    node's children were drawn from (independently, with replacement; the number of children
    must not depend on which tokens were drawn). max_children: host bound on children per node
    (children beyond it are not tried, which keeps the rule exact: the others are still iid).

    At the current node, for each child x in order: accept with probability min(1, p(x)/q(x));
    on rejection p := normalize(max(p - q, 0)) and q stays (the siblings are iid draws from it).
    An accepted child becomes the current node with a fresh p; when all are rejected the bonus
    is drawn from the residual p.
    """
    batch, nodes = _check_tree(tokens, parents, depth, valid, max_depth)
    _check_per_node("target_probs", target_probs, batch, nodes, tokens.device)
    _check_per_node("draft_probs", draft_probs, batch, nodes, tokens.device)
    if draft_probs.shape != target_probs.shape:
        raise ValueError(f"draft_probs {tuple(draft_probs.shape)} and target_probs "
                         f"{tuple(target_probs.shape)} must have the same shape")
    return accept_sampled_by_rows(tokens, parents, depth, valid,
                                  lambda d, node: _rows_at(target_probs, node),
                                  lambda d, node: _rows_at(draft_probs, node),
                                  seeds, offsets, max_depth, max_children)


def accept_sampled_by_rows(tokens: torch.Tensor, parents: torch.Tensor, depth: torch.Tensor,
                           valid: torch.Tensor, target_at: Callable[[int, torch.Tensor], torch.Tensor],
                           draft_at: Callable[[int, torch.Tensor], torch.Tensor], seeds: torch.Tensor,
                           offsets: torch.Tensor, max_depth: int, max_children: int) -> AcceptResult:
    """``accept_sampled_children`` reading p and q only where the walk goes.

    ``target_at(d, current)`` / ``draft_at(d, current)`` return [B, V] p and q at each row's
    current node (current [B] int64) at depth d: the target's cuts need computing for
    max_depth + 1 rows per sequence instead of every tree node.
    """
    batch, _ = _check_tree(tokens, parents, depth, valid, max_depth)
    _check_rng(seeds, offsets, batch)
    if not isinstance(max_children, int) or not 1 <= max_children <= 4096:
        raise ValueError(f"max_children must be a host int in [1, 4096], got {max_children!r}")
    device, width = tokens.device, max_depth + 1
    # All sibling-test uniforms at once: column d * max_children + s tests sibling s at depth d.
    test_noise = uniform_noise(seeds, offsets, accept_stream(0, 1), max(1, max_depth * max_children))
    tokens = tokens.long()
    current, active, out_tokens, path = _walk_start(batch, width, device)
    for d in range(width):
        p = target_at(d, current).float()
        accepted = torch.zeros(batch, dtype=torch.bool, device=device)
        accepted_node = torch.zeros(batch, dtype=torch.int64, device=device)
        accepted_token = torch.zeros(batch, dtype=torch.int64, device=device)
        if d < max_depth:
            q = draft_at(d, current).float()
            if q.shape != p.shape:
                raise ValueError(f"draft rows {tuple(q.shape)} and target rows {tuple(p.shape)} differ")
            # A child whose token is outside the vocabulary is no draw from q: it is not tried,
            # exactly as if it were padding.
            in_vocab = (tokens >= 0) & (tokens < p.shape[1])
            children = _children_of(current, parents, depth, valid & in_vocab, d + 1)
            sibling_rank = children.long().cumsum(dim=1) - 1
            for s in range(max_children):
                slot = children & (sibling_rank == s)
                node = _first_true(slot)
                x = tokens.gather(1, node[:, None]).clamp(0, p.shape[1] - 1)  # [B, 1]
                px, qx = p.gather(1, x).squeeze(1), q.gather(1, x).squeeze(1)
                u = test_noise[:, d * max_children + s]
                # u < p/q written without the division; p >= q accepts outright (min(1, .) = 1)
                # but a token p gives no mass is never accepted.
                passes = ((px >= qx) & (px > 0)) | (u * qx < px)
                tried = active & ~accepted & slot.any(dim=1)
                take = tried & passes
                accepted_node = torch.where(take, node, accepted_node)
                accepted_token = torch.where(take, x.squeeze(1), accepted_token)
                accepted = accepted | take
                p = torch.where((tried & ~passes)[:, None], _residual_after_rejection(p, q), p)
        bonus = sample_from_probs(p, seeds, offsets, accept_stream(d, 0))
        out_tokens[:, d] = torch.where(active, torch.where(accepted, accepted_token, bonus), -1)
        moves = active & accepted
        if d < max_depth:
            path[:, d + 1] = torch.where(moves, accepted_node, -1)
        current = torch.where(moves, accepted_node, current)
        active = moves
    num_emitted = (out_tokens >= 0).sum(dim=1)
    return AcceptResult(tokens=out_tokens, num_emitted=num_emitted, path=path)
