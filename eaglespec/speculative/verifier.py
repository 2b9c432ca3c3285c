"""Verifies a batch of token trees with one target forward, accepts, and commits the K/V.

All fixed-shape device work (no host synchronisation), so it runs inside the step's CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from eaglespec.kv_cache import KVCache, copy_tree_kv
from eaglespec.models.attention_step import TreeStep
from eaglespec.models.llama import LlamaForCausalLM
from eaglespec.ops.greedy_accept import CommitIndices, commit_indices, greedy_accept, greedy_accept_ref
from eaglespec.ops.sampling import SamplingTensors, greedy_argmax, sample
from eaglespec.speculative.acceptance import AcceptResult, accept_by_target_draws
from eaglespec.speculative.tree import TreeBatch


@dataclass(slots=True)
class VerifyResult:
    accept: AcceptResult  # tokens [B, D+1] (-1 padded), num_emitted [B], path [B, D+1]
    path_features: torch.Tensor  # [B, D+1, feature] target features of the path nodes


def verify_tree(target: LlamaForCausalLM, cache: KVCache, tree: TreeBatch, cached_lens: torch.Tensor,
                block_tables: torch.Tensor, st: SamplingTensors, greedy: bool, feature: str,
                max_depth: int, scale: float, backend: str) -> VerifyResult:
    """Target forward over every node, acceptance, and commit of the accepted path's K/V.

    cached_lens [B] = L (the root sits at position L); ``feature`` is "hidden" (EAGLE-1) or
    "taps" (EAGLE-3): which target features the head reads next.
    """
    bsz = tree.tokens.shape[0]
    step = TreeStep(block_tables, cached_lens, tree.ancestor_bits, scale, backend)
    # Greedy: each rank's argmax over its vocabulary rows, never the gathered [nodes, vocab] logits.
    out = target(tree.tokens.reshape(-1), tree.positions.reshape(-1), step, cache,
                 want_hidden=feature == "hidden", want_taps=feature == "taps", gather_logits=not greedy)
    accept, where = accept_tree(tree, out.logits, st, greedy, max_depth, cached_lens, block_tables,
                                cache.block_size, backend, argmax=target.greedy_tokens)
    copy_tree_kv(cache, *step.stacked(), where, backend)
    feats = out.hidden if feature == "hidden" else out.taps
    path_features = feats.index_select(0, where.rows).view(bsz, max_depth + 1, -1)
    return VerifyResult(accept, path_features)


def accept_tree(tree: TreeBatch, logits: torch.Tensor, st: SamplingTensors, greedy: bool, max_depth: int,
                cached_lens: torch.Tensor, block_tables: torch.Tensor, block_size: int,
                backend: str, argmax: Callable[[torch.Tensor], torch.Tensor] | None = None,
                visited_draws_from: int | None = None) -> tuple[AcceptResult, CommitIndices]:
    """The accepted path of every tree and where its K/V go, from the target's logits [B * N, V]
    at every node (node-major within each sequence). st has one row per sequence. ``argmax``:
    the greedy tokens of the logits (default: over the whole vocabulary; the verifier passes the
    target's ``greedy_tokens``, which reads one tensor-parallel rank's vocabulary rows).

    The target's token at every node at once (its argmax, or its seeded draw: see
    ``per_node_sampling``), then greedy acceptance against those tokens: one walk for both rules.
    Sampled trees of ``visited_draws_from`` rows or more (default ``VISITED_DRAWS_MIN_ROWS``)
    draw only at the nodes the walk visits (``accept_at_visited_nodes``).
    """
    bsz, n = tree.tokens.shape
    if logits.dim() != 2 or logits.shape[0] != bsz * n:
        raise ValueError(f"accept_tree: logits must be [batch * nodes = {bsz * n}, vocab], got {tuple(logits.shape)}")
    if greedy and argmax is not None:
        targets = argmax(logits)
    elif greedy:
        targets = greedy_argmax(logits) if backend == "triton" else logits.argmax(dim=-1)
    elif bsz * n >= (VISITED_DRAWS_MIN_ROWS if visited_draws_from is None else visited_draws_from):
        accept = accept_at_visited_nodes(tree, logits, st, max_depth)
        return accept, commit_indices(accept.path, cached_lens, block_tables, block_size, n)
    else:
        targets = sample(logits, per_node_sampling(st, tree.depth))
    walk = greedy_accept if backend == "triton" else greedy_accept_ref
    return walk(tree.tokens, tree.parents, tree.depth, tree.ancestor_bits, targets.view(bsz, n), max_depth,
                cached_lens, block_tables, block_size)


# From this many tree rows (batch x nodes) on, the sampled verify draws only at the nodes the walk
# visits, max_depth + 1 sampling passes over B rows, instead of one over every node. SmolLM2's
# sampled step (bench.spec_step, H100, design note 52): 1,024 rows 5.54 -> 4.53 ms, 2,112 rows
# 9.42 -> 6.44, 528 and 512 rows 2-4 % faster; below that one pass over every node stays.
VISITED_DRAWS_MIN_ROWS = 512


def accept_at_visited_nodes(tree: TreeBatch, logits: torch.Tensor, st: SamplingTensors,
                            max_depth: int) -> AcceptResult:
    """Sampled acceptance drawing from the target only at the nodes the walk visits: the walk
    of ``accept_by_target_draws``, whose draw at depth d is the current node's row of ``logits``
    [B * N, V] sampled with counter offset + d (as ``per_node_sampling`` gives it). Where the
    draws at every node let the walk kernel follow a later sibling carrying the same token
    deeper, this takes the first one's chain; both are lossless."""
    bsz, n = tree.tokens.shape
    nodes = torch.arange(n, device=tree.tokens.device)
    row_start = torch.arange(bsz, device=tree.tokens.device) * n
    valid = (tree.parents >= 0) | (nodes == 0)  # padding nodes have no parent
    return accept_by_target_draws(
        tree.tokens, tree.parents, tree.depth, valid, max_depth,
        lambda d, current: sample(logits.index_select(0, row_start + current), sampling_at_depth(st, d)))


def sampling_at_depth(st: SamplingTensors, d: int) -> SamplingTensors:
    """The settings of a draw at depth d: the request's, noise counter offset + d (the draw plain
    sampling makes d tokens ahead; see ``per_node_sampling``)."""
    return replace(st, offsets=st.offsets + d)


def per_node_sampling(st: SamplingTensors, depth: torch.Tensor) -> SamplingTensors:
    """Sampling settings for every tree node: st [B] rows, depth [B, N] -> [B * N] rows.

    The node at depth d draws with its request's settings and noise counter offset + d: the draw
    plain sampling makes d tokens ahead. That draw depends on the node only through its logits,
    so every node can draw at once (one batched ``sample``), and acceptance is then exactly the
    walk "draw y at the current node; move to the first child carrying y, else emit y as the
    bonus" (``speculative.acceptance.accept_by_target_draws``), which is lossless for children
    chosen deterministically (``accept_topk_children``). A seeded request therefore samples the
    same tokens whether a step ran plain or with any tree (up to the logits' rounding on each
    path). Siblings carrying equal tokens share a context, hence their draws: the walk kernel,
    which takes the deepest matching chain among them, emits a continuation of what the
    first-child walk emits, drawn by the same rule.
    """
    batch, nodes = depth.shape
    if st.num_rows != batch:
        raise ValueError(f"per_node_sampling: {st.num_rows} rows of sampling settings for {batch} trees")
    rows = st.expand(nodes)
    return replace(rows, offsets=rows.offsets + depth.reshape(-1).to(rows.offsets.dtype))
