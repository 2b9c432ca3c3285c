"""Runs an EAGLE head to extend its KV cache with accepted tokens and to draft token trees.

Positions: the target has L tokens cached and the root (the last emitted token, x_L) is not yet
cached. The head's cache holds the pairs (feature_t, x_{t+1}) at position t for t < L once the
pending pairs of the last step are extended. A tree node at depth d reads (its parent's draft
hidden, its token) at position L + d - 1, attending to the head's cache and to its ancestors'
K/V, which live in a side buffer and are never committed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eaglespec.kv_cache import KVCache, commit_tree_kv
from eaglespec.models.attention_step import AttentionStep, TreeStep
from eaglespec.models.eagle import DraftVocab, EagleHead
from eaglespec.ops import attention as ops
from eaglespec.speculative.tree import TreeBatch, TreeShape, select_tree


@dataclass(slots=True)
class DraftTreeStep(AttentionStep):
    """Frontier nodes of one depth: cached prefix (no mask) + earlier tree nodes (ancestors)."""

    block_tables: torch.Tensor  # [B, max_blocks] int32
    prefix_lens: torch.Tensor  # [B] int32 pairs in the head's cache
    side_k: torch.Tensor  # [L, B, S, Hkv, D] draft tree K of all frontier slots
    side_v: torch.Tensor
    slot_offset: int  # first side slot of this depth's frontier
    visible_bits: torch.Tensor  # [B, F] int64 over the S side slots (own slot included)
    scale: float
    backend: str

    def attend(self, layer, q, k, v, cache, kv_written=False):
        if kv_written:
            raise ValueError("DraftTreeStep stores K/V in its side buffers (kv_slots is None): pass kv_written=False")
        bsz, width = self.visible_bits.shape
        q = q.view(bsz, width, *q.shape[1:])
        self.side_k[layer][:, self.slot_offset:self.slot_offset + width] = k.view(bsz, width, *k.shape[1:])
        self.side_v[layer][:, self.slot_offset:self.slot_offset + width] = v.view(bsz, width, *v.shape[1:])
        fn = ops.two_pass_tree_attention if self.backend == "triton" else ops.two_pass_tree_attention_ref
        out = fn(q, cache.k[layer], cache.v[layer], self.block_tables, self.prefix_lens,
                 self.side_k[layer], self.side_v[layer], self.visible_bits, self.scale)
        return out.reshape(bsz * width, *out.shape[2:]).to(q.dtype)


# Floor of a sanitised draft log-probability: finite, so cumulative scores stay ordered.
DRAFT_LOGP_FLOOR = -1e4


def draft_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax of draft logits with NaN and inf mapped into [DRAFT_LOGP_FLOOR, 0].

    A broken head (NaN or inf weights) must only cost speed: its scores still rank children
    and order the tree, and the tree stays a tree. On the device, no host synchronisation.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    return torch.nan_to_num(logp, nan=DRAFT_LOGP_FLOOR, posinf=0.0, neginf=DRAFT_LOGP_FLOOR).clamp(DRAFT_LOGP_FLOOR, 0.0)


def chain_bits(n: int, device) -> torch.Tensor:
    """[n] int64: row i sees rows 0..i (a causal chain as an ancestor mask)."""
    return (torch.ones((), dtype=torch.int64, device=device) << (torch.arange(n, device=device) + 1)) - 1


class Drafter:
    """Owns nothing but references: the head, the vocabulary it drafts over, its KV cache and
    the static tree shape."""

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
        self.vocab_size = head.config.layer.vocab_size  # the target's vocabulary
        # Static trees: which candidates of each level are nodes, as device tensors made once
        # (a host-to-device copy inside a CUDA-graph capture is not allowed).
        self.static_columns: list[torch.Tensor] = []
        if shape.kind == "static":
            for level in range(shape.depth):
                cols = shape.static_rank[0] if level == 0 else [
                    p * shape.branch + r for p, r in zip(shape.static_parent[level], shape.static_rank[level])]
                self.static_columns.append(torch.tensor(cols, dtype=torch.int64, device=cache.k.device))

    def side_buffers(self, batch: int, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cache.k
        shape = (c.shape[0], batch, max(slots, 1), c.shape[3], c.shape[4])
        return torch.zeros(shape, dtype=c.dtype, device=c.device), torch.zeros(shape, dtype=c.dtype, device=c.device)

    def extend(self, feats: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor, prefix_lens: torch.Tensor,
               block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run and commit the pending pairs of each sequence; return the last pair's outputs.

        feats [B, P, feature], tokens [B, P], counts [B] (1..P valid pairs), prefix_lens [B] =
        pairs already cached. Returns hidden [B, H] and the projection input [B, H] of the last
        valid pair, which propose the children of the root.
        """
        bsz, width = tokens.shape
        bits = chain_bits(width, tokens.device).expand(bsz, width).contiguous()
        step = TreeStep(block_tables, prefix_lens, bits, self.scale, self.backend)
        positions = prefix_lens[:, None].long() + torch.arange(width, device=tokens.device)
        out = self.head(feats.reshape(bsz * width, -1), tokens.reshape(-1), positions.reshape(-1), step, self.cache)
        nodes = torch.arange(width, device=tokens.device).expand(bsz, width)
        nodes = torch.where(nodes < counts[:, None], nodes, torch.full_like(nodes, -1))
        commit_tree_kv(self.cache, *step.stacked(), nodes, prefix_lens, block_tables)
        last = (counts - 1).clamp_min(0)
        rows = torch.arange(bsz, device=tokens.device) * width + last
        return out.hidden.index_select(0, rows), out.last.index_select(0, rows)

    def _children(self, last: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best children of each row: draft log-probabilities [T, k] over the draft
        vocabulary, and their target ids [T, k]. The one place where the draft vocabulary's
        [N, H] projection and its id map are applied. Ids are clamped into the target
        vocabulary: a head mapping outside it proposes some in-vocabulary token instead, which
        verification judges like any other."""
        values, draft_ids = torch.topk(draft_log_probs(self.vocab.logits(last)), k, dim=-1)
        return values, self.vocab.target_ids(draft_ids).clamp(0, self.vocab_size - 1)

    def build(self, hidden_root: torch.Tensor, last_root: torch.Tensor, root_tokens: torch.Tensor,
              cached_lens: torch.Tensor, block_tables: torch.Tensor) -> TreeBatch:
        """Draft one tree per sequence (children ranked by draft log-probability).

        hidden_root [B, H] / last_root [B, H] from ``extend``; root_tokens [B];
        cached_lens [B] = L, the target's (and after ``extend`` the head's) cached length.
        """
        shape = self.shape
        bsz = root_tokens.shape[0]
        dev = root_tokens.device
        first = shape.frontier[0] if shape.kind == "static" else shape.branch
        # Depth-1 candidates are the root's children.
        cand_scores, cand_tokens = self._children(last_root, max(first, shape.branch))
        cand_parent = torch.full_like(cand_tokens, -1)
        keep, frontier = self._level_choice(0, cand_scores, first)
        pool_tokens = [cand_tokens[:, keep]]
        pool_scores = [cand_scores[:, keep]]
        pool_parent = [cand_parent[:, keep]]
        pool_depth = [torch.ones_like(pool_tokens[0])]
        pool_offset = 0
        f_idx = frontier  # [B, F] index of each frontier node among this level's candidates
        f_tokens = torch.gather(cand_tokens, 1, f_idx)
        f_scores = torch.gather(cand_scores, 1, f_idx)
        f_pool = self._pool_index(keep, f_idx, pool_offset)
        f_hidden = hidden_root[:, None, :].expand(bsz, f_idx.shape[1], -1)
        f_parent_bits = torch.zeros_like(f_tokens)
        side_k, side_v = self.side_buffers(bsz, shape.draft_slots)
        slot = 0
        for d in range(1, shape.depth):
            width = f_tokens.shape[1]
            own = torch.ones((), dtype=torch.int64, device=dev) << (slot + torch.arange(width, device=dev))
            f_bits = f_parent_bits | own
            step = DraftTreeStep(block_tables, cached_lens, side_k, side_v, slot, f_bits, self.scale, self.backend)
            positions = (cached_lens[:, None].long() + d - 1).expand(bsz, width).contiguous()
            out = self.head(f_hidden.reshape(bsz * width, -1), f_tokens.reshape(-1), positions.reshape(-1),
                            step, self.cache)
            child_v, child_tokens = self._children(out.last, shape.branch)
            cand_scores = (f_scores[:, :, None] + child_v.view(bsz, width, -1)).reshape(bsz, -1)
            cand_tokens = child_tokens.view(bsz, -1)
            parent_local = torch.arange(width, device=dev).repeat_interleave(shape.branch).expand(bsz, -1)
            cand_parent = torch.gather(f_pool, 1, parent_local)
            pool_offset += pool_tokens[-1].shape[1]
            keep, nxt = self._level_choice(d, cand_scores, shape.frontier[d])
            pool_tokens.append(cand_tokens[:, keep])
            pool_scores.append(cand_scores[:, keep])
            pool_parent.append(cand_parent[:, keep])
            pool_depth.append(torch.full_like(pool_tokens[-1], d + 1))
            # The next frontier: its tokens, scores, pool slots, and its parents' hidden and bits.
            nxt_parent = torch.gather(parent_local, 1, nxt)
            f_tokens = torch.gather(cand_tokens, 1, nxt)
            f_scores = torch.gather(cand_scores, 1, nxt)
            f_pool = self._pool_index(keep, nxt, pool_offset)
            hid = out.hidden.view(bsz, width, -1)
            f_hidden = torch.gather(hid, 1, nxt_parent[:, :, None].expand(-1, -1, hid.shape[-1]))
            f_parent_bits = torch.gather(f_bits, 1, nxt_parent)
            slot += width
        return select_tree(torch.cat(pool_tokens, 1), torch.cat(pool_scores, 1), torch.cat(pool_parent, 1),
                           torch.cat(pool_depth, 1), root_tokens, shape.num_nodes, shape.depth)

    def _level_choice(self, level: int, scores: torch.Tensor, width: int) -> tuple[object, torch.Tensor]:
        """Which candidates of a level enter the pool (``keep``, a slice or index list) and which
        become the frontier ([B, width] indices among the level's candidates)."""
        shape = self.shape
        bsz = scores.shape[0]
        dev = scores.device
        if shape.kind == "dynamic":
            return slice(None), torch.topk(scores, width, dim=1).indices
        if shape.kind == "chain":
            return slice(0, 1), torch.zeros(bsz, 1, dtype=torch.int64, device=dev)
        cols = self.static_columns[level]
        return cols, cols.expand(bsz, -1)

    @staticmethod
    def _pool_index(keep, chosen: torch.Tensor, offset: int) -> torch.Tensor:
        """Pool index of chosen candidates: all kept (dynamic) or kept exactly as the frontier."""
        if isinstance(keep, slice) and keep == slice(None):
            return chosen + offset
        return torch.arange(chosen.shape[1], device=chosen.device).expand_as(chosen) + offset
