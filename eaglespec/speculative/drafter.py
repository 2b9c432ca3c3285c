"""Runs an EAGLE head to extend its KV cache with accepted tokens and to draft token trees.

Positions: the target has L tokens cached and the root (the last emitted token, x_L) is not yet
cached. The head's cache holds the pairs (feature_t, x_{t+1}) at position t for t < L once the
pending pairs of the last step are extended. A tree node at depth d reads (its parent's draft
hidden, its token) at position L + d - 1, attending to the head's cache and to its ancestors'
K/V, which live in a side buffer and are never committed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from eaglespec.kv_cache import KVCache, copy_tree_kv
from eaglespec.models.attention_step import AttentionStep, KVStore, TreeStep
from eaglespec.models.eagle import DraftVocab, EagleHead
from eaglespec.ops import attention as ops
from eaglespec.ops.draft_topk import draft_topk, draft_topk_ref
from eaglespec.ops.greedy_accept import extend_indices, extend_indices_ref
from eaglespec.ops.tree_expand import (CandidatePool, Level, expand_level, expand_level_ref, select_tree,
                                       select_tree_ref)
from eaglespec.speculative.tree import TreeBatch, TreeShape


@dataclass(slots=True)
class DraftTreeStep(AttentionStep):
    """Frontier nodes of one depth: cached prefix (no mask) + earlier tree nodes (ancestors)."""

    block_tables: torch.Tensor  # [B, max_blocks] int32
    prefix_lens: torch.Tensor  # [B] int32 pairs in the head's cache
    side_k: torch.Tensor  # [L, B, S, Hkv, D] draft tree K of all frontier slots
    side_v: torch.Tensor
    slot_offset: int  # first side slot of this depth's frontier
    side_slots: torch.Tensor  # [B * F] int64 flat side slots of the frontier, b * S + slot_offset + j
    visible_bits: torch.Tensor  # [B, F] int64 over the S side slots (own slot included)
    scale: float
    backend: str

    def kv_store(self, layer: int, cache: KVCache) -> KVStore:
        # A layer's side buffer [B, S, Hkv, D] as a cache of B * S one-slot blocks.
        bsz, slots, hkv, d = self.side_k.shape[1:]
        return (self.side_k[layer].view(bsz * slots, 1, hkv, d), self.side_v[layer].view(bsz * slots, 1, hkv, d),
                self.side_slots)

    def attend(self, layer, q, k, v, cache, kv_written=False):
        bsz, width = self.visible_bits.shape
        if not kv_written:  # the unfused path hands over the rotated k/v
            self.side_k[layer][:, self.slot_offset:self.slot_offset + width] = k.view(bsz, width, *k.shape[1:])
            self.side_v[layer][:, self.slot_offset:self.slot_offset + width] = v.view(bsz, width, *v.shape[1:])
        q = q.view(bsz, width, *q.shape[1:])
        fn = ops.two_pass_tree_attention if self.backend == "triton" else ops.two_pass_tree_attention_ref
        out = fn(q, cache.k[layer], cache.v[layer], self.block_tables, self.prefix_lens,
                 self.side_k[layer], self.side_v[layer], self.visible_bits, self.scale)
        return out.reshape(bsz * width, *out.shape[2:]).to(q.dtype)


def chain_bits(n: int, device) -> torch.Tensor:
    """[n] int64: row i sees rows 0..i (a causal chain as an ancestor mask)."""
    return (torch.ones((), dtype=torch.int64, device=device) << (torch.arange(n, device=device) + 1)) - 1


def tree_levels(shape: TreeShape, device) -> tuple[list[Level], torch.Tensor]:
    """How each level of a tree shape grows its pool, and the depth of each pool column [P].

    Level i takes the children of the nodes at depth i (the root for i = 0) and picks the
    frontier of depth i + 1, whose side slots start at sum(frontier[:i]). Its pool columns:
    every child (chain, dynamic: frontier * branch of them) or the static tree's nodes.
    """
    levels, depths, offset = [], [], 0
    for i in range(shape.depth):
        columns = None
        if shape.kind == "static":
            cols = shape.static_rank[0] if i == 0 else [
                p * shape.branch + r for p, r in zip(shape.static_parent[i], shape.static_rank[i])]
            columns = torch.tensor(cols, dtype=torch.int64, device=device)
            kept = len(cols)
        else:
            kept = (1 if i == 0 else shape.frontier[i - 1]) * shape.branch
        # The last level's frontier never runs: its bits are unused (slot 0 keeps them in range).
        slot = sum(shape.frontier[:i]) if i < shape.depth - 1 else 0
        levels.append(Level(i, offset, shape.frontier[i], slot, columns))
        depths += [i + 1] * kept
        offset += kept
    return levels, torch.tensor(depths, dtype=torch.int64, device=device)


@dataclass(slots=True)
class DraftOps:
    """The drafting ops of one kernel set (Triton kernels or their PyTorch references)."""

    topk: Callable
    expand: Callable
    select: Callable
    extend_indices: Callable

    @classmethod
    def for_backend(cls, backend: str) -> "DraftOps":
        if backend == "triton":
            return cls(draft_topk, expand_level, select_tree, extend_indices)
        return cls(draft_topk_ref, expand_level_ref, select_tree_ref, extend_indices_ref)


class DraftBuffers(NamedTuple):
    """A batch size's fixed-shape drafting buffers."""

    pool: CandidatePool
    side_k: torch.Tensor  # [L, B, S, Hkv, D] draft tree K of every frontier slot
    side_v: torch.Tensor
    side_slots: list[torch.Tensor]  # per drafting depth d >= 1: [B * F_d] int64 flat side slots of its frontier


class Drafter:
    """Owns references (the head, the vocabulary it drafts over, its KV cache, the static tree
    shape) and the fixed-shape buffers its steps reuse (per batch size: the candidate pool and
    the side K/V)."""

    def __init__(self, head: EagleHead, vocab: DraftVocab, shape: TreeShape, cache: KVCache, backend: str,
                 scale: float):
        widest = max(shape.branch, shape.frontier[0] if shape.kind == "static" else 0)
        if vocab.size < widest:
            raise ValueError(f"draft vocabulary of {vocab.size} tokens is smaller than the tree's {widest} "
                             f"children per node")
        self.head = head
        self.vocab = vocab
        self.shape = shape
        self.cache = cache
        self.backend = backend
        self.scale = scale
        self.ops = DraftOps.for_backend(backend)
        self.vocab_size = head.config.layer.vocab_size  # the target's vocabulary
        # Device tensors made once: a host-to-device copy inside a CUDA-graph capture is not allowed.
        self.levels, self.pool_depth = tree_levels(shape, cache.k.device)
        self._buffers: dict[int, DraftBuffers] = {}
        self._chain_bits: dict[tuple[int, int], torch.Tensor] = {}

    def chain_bits(self, batch: int, width: int) -> torch.Tensor:
        """[batch, width] int64 causal masks of the extend step, made once per shape."""
        if (batch, width) not in self._chain_bits:
            bits = chain_bits(width, self.cache.k.device).expand(batch, width).contiguous()
            self._chain_bits[(batch, width)] = bits
        return self._chain_bits[(batch, width)]

    def buffers(self, batch: int) -> DraftBuffers:
        """The candidate pool, the side K/V and each drafting depth's side slots for a batch
        size. Reused by every step: each step writes a slot before any node may read it."""
        if batch not in self._buffers:
            c = self.cache.k
            slots = max(self.shape.draft_slots, 1)
            side = (c.shape[0], batch, slots, c.shape[3], c.shape[4])
            rows = torch.arange(batch, device=c.device)[:, None] * slots
            self._buffers[batch] = DraftBuffers(
                CandidatePool.allocate(batch, self.pool_depth), torch.zeros(side, dtype=c.dtype, device=c.device),
                torch.zeros(side, dtype=c.dtype, device=c.device),
                [(rows + level.slot + torch.arange(level.width, device=c.device)).reshape(-1)
                 for level in self.levels[:-1]])
        return self._buffers[batch]

    def extend(self, feats: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor, prefix_lens: torch.Tensor,
               block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run and commit the pending pairs of each sequence; return the last pair's outputs.

        feats [B, P, feature], tokens [B, P], counts [B] (1..P valid pairs), prefix_lens [B] =
        pairs already cached. Returns hidden [B, H] and the projection input [B, H] of the last
        valid pair, which propose the children of the root.
        """
        bsz, width = tokens.shape
        where = self.ops.extend_indices(counts, prefix_lens, block_tables, self.cache.block_size, width)
        step = TreeStep(block_tables, prefix_lens, self.chain_bits(bsz, width), self.scale, self.backend)
        out = self.head(feats.reshape(bsz * width, -1), tokens.reshape(-1), where.positions, step, self.cache)
        copy_tree_kv(self.cache, *step.stacked(), where.commit, self.backend)
        hidden_last = out.hidden.index_select(0, where.last_rows)
        return hidden_last, hidden_last if out.last is out.hidden else out.last.index_select(0, where.last_rows)

    def _children(self, last: torch.Tensor, bsz: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's ``branch`` best children as [B, rows per sequence * branch] draft
        log-probabilities over the draft vocabulary and target ids: the one place where the
        vocabulary's [N, H] projection and its id map are applied (fused with the top-k, no
        [rows, N] logits in memory). Ids are clamped into the target vocabulary: a head mapping
        outside it proposes some in-vocabulary token instead, which verification judges."""
        weight = self.vocab.weight
        values, ids = self.ops.topk(last.to(weight.dtype), weight, self.shape.branch, self.vocab.to_target,
                                    self.vocab_size)
        return values.view(bsz, -1), ids.view(bsz, -1)

    def build(self, hidden_root: torch.Tensor, last_root: torch.Tensor, root_tokens: torch.Tensor,
              cached_lens: torch.Tensor, block_tables: torch.Tensor) -> TreeBatch:
        """Draft one tree per sequence (children ranked by draft log-probability).

        hidden_root / last_root [B, H] from ``extend``; root_tokens [B]; cached_lens [B] = L,
        the target's (and after ``extend`` the head's) cached length.
        """
        shape, ops = self.shape, self.ops
        bsz = root_tokens.shape[0]
        pool, side_k, side_v, side_slots = self.buffers(bsz)
        values, ids = self._children(last_root, bsz)
        frontier = ops.expand(values, ids, None, pool, self.levels[0], shape.branch, cached_lens)
        hidden = hidden_root
        for d in range(1, shape.depth):
            step = DraftTreeStep(block_tables, cached_lens, side_k, side_v, self.levels[d - 1].slot,
                                 side_slots[d - 1], frontier.bits, self.scale, self.backend)
            out = self.head(hidden, frontier.tokens.reshape(-1), frontier.positions, step, self.cache,
                            feature_rows=frontier.rows)
            hidden = out.hidden
            values, ids = self._children(out.last, bsz)
            frontier = ops.expand(values, ids, frontier, pool, self.levels[d], shape.branch, cached_lens)
        return TreeBatch(*ops.select(pool, root_tokens.long(), shape.num_nodes, shape.depth, cached_lens))
