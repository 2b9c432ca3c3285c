"""Verifies a batch of token trees with one target forward, accepts, and commits the K/V.

All fixed-shape device work (no host synchronisation), so it runs inside the step's CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from eaglespec.kv_cache import KVCache, copy_tree_kv
from eaglespec.models.attention_step import TreeStep
from eaglespec.models.llama import LlamaForCausalLM
from eaglespec.ops.greedy_accept import commit_indices, greedy_accept, greedy_accept_ref
from eaglespec.ops.sampling import SamplingTensors, sample
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
    bsz, n = tree.tokens.shape
    step = TreeStep(block_tables, cached_lens, tree.ancestor_bits, scale, backend)
    # Greedy: each rank's argmax over its vocabulary rows, never the gathered [nodes, vocab] logits.
    out = target(tree.tokens.reshape(-1), tree.positions.reshape(-1), step, cache,
                 want_hidden=feature == "hidden", want_taps=feature == "taps", gather_logits=not greedy)
    logits = out.logits.view(bsz, n, -1)
    width = max_depth + 1
    if greedy:
        # One argmax over every node, then the accepted path and its K/V destinations in one go.
        argmax = target.greedy_tokens(out.logits).view(bsz, n)
        accept_path = greedy_accept if backend == "triton" else greedy_accept_ref
        accept, where = accept_path(tree.tokens, tree.parents, tree.depth, tree.ancestor_bits, argmax, max_depth,
                                    cached_lens, block_tables, cache.block_size)
    else:
        # One draw from the target distribution at the current node per depth: exact for
        # children chosen deterministically (see speculative.acceptance.accept_topk_children).
        # The draw at depth d is the one plain sampling makes for the token d places ahead (same
        # noise stream, counter + d), so a seeded request samples the same tokens whether a
        # step ran plain or with any tree (up to the logits' rounding on each path).
        valid = torch.ones_like(tree.tokens, dtype=torch.bool)
        accept = accept_by_target_draws(
            tree.tokens, tree.parents, tree.depth, valid, max_depth,
            lambda d, node: sample(_rows(logits, node), replace(st, offsets=st.offsets + d)))
        where = commit_indices(accept.path, cached_lens, block_tables, cache.block_size, n)
    copy_tree_kv(cache, *step.stacked(), where)
    feats = out.hidden if feature == "hidden" else out.taps
    path_features = feats.index_select(0, where.rows).view(bsz, width, -1)
    return VerifyResult(accept, path_features)


def _rows(x: torch.Tensor, node: torch.Tensor) -> torch.Tensor:
    """x [B, N, V], node [B] -> [B, V]."""
    return torch.gather(x, 1, node[:, None, None].expand(-1, 1, x.shape[-1]))[:, 0]
