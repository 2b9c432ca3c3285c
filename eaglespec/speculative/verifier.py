"""Verifies a batch of token trees with one target forward, accepts, and commits the K/V.

All fixed-shape device work (no host synchronisation), so it runs inside the step's CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eaglespec.kv_cache import KVCache, commit_tree_kv
from eaglespec.models.attention_step import TreeStep
from eaglespec.models.llama import LlamaForCausalLM
from eaglespec.ops.sampling import SamplingTensors, greedy_argmax, sample
from eaglespec.speculative.acceptance import (AcceptResult, accept_by_target_draws, accept_greedy_by_masks,
                                              accept_stream)
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
    positions = cached_lens[:, None].long() + tree.depth
    out = target(tree.tokens.reshape(-1), positions.reshape(-1), step, cache,
                 want_hidden=feature == "hidden", want_taps=feature == "taps")
    logits = out.logits.view(bsz, n, -1)
    if greedy:
        # One argmax over every node, then the accepted path from bit masks (no per-depth walk).
        best = greedy_argmax(out.logits).view(bsz, n) if backend == "triton" else logits.argmax(dim=-1)
        accept = accept_greedy_by_masks(tree.tokens, tree.parents, tree.depth, tree.ancestor_bits, best, max_depth)
    else:
        # One draw from the target distribution at the current node per depth: exact for
        # children chosen deterministically (see speculative.acceptance.accept_topk_children).
        valid = torch.ones_like(tree.tokens, dtype=torch.bool)
        accept = accept_by_target_draws(
            tree.tokens, tree.parents, tree.depth, valid, max_depth,
            lambda d, node: sample(_rows(logits, node), st, stream=accept_stream(d, 0)))
    commit_tree_kv(cache, *step.stacked(), accept.path, cached_lens, block_tables)
    feats = out.hidden if feature == "hidden" else out.taps
    feats = feats.view(bsz, n, -1)
    path = accept.path.clamp_min(0)
    path_features = torch.gather(feats, 1, path[:, :, None].expand(-1, -1, feats.shape[-1]))
    return VerifyResult(accept, path_features)


def _rows(x: torch.Tensor, node: torch.Tensor) -> torch.Tensor:
    """x [B, N, V], node [B] -> [B, V]."""
    return torch.gather(x, 1, node[:, None, None].expand(-1, 1, x.shape[-1]))[:, 0]
