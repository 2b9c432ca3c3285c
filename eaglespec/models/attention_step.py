"""How the tokens of one forward attend: the per-step attention metadata.

A forward pass is told *what kind* of step it is by one of these dataclasses, passed as an
argument (never stored on the model). Each writes the new K/V where they belong and calls the
matching op of ``eaglespec.ops.attention`` on the chosen backend ("torch" reference or "triton").

``kv_store`` tells a fused kernel where the new K/V go (the paged cache, or a tree step's own
buffers), so it can store them while it applies RoPE; ``attend(..., kv_written=True)`` then
skips the step's own store.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eaglespec.kv_cache import KVCache
from eaglespec.ops import attention as ops


# Where a fused kernel stores a layer's new K/V: K and V destinations [NB, BS, Hkv, D] and the
# flat slot (block * BS + offset) of each of the T new tokens, [T] int64.
KVStore = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class AttentionStep:
    """Interface: ``attend(layer, q [T,Hq,D], k [T,Hkv,D], v, cache, kv_written=False) -> [T,Hq,D]``.

    kv_written: the caller already stored k/v where ``kv_store`` said (only allowed when it
    said somewhere).
    """

    def kv_store(self, layer: int, cache: KVCache) -> KVStore | None:
        """Where the new K/V of ``layer`` go, or None when ``attend`` takes the rotated k/v."""
        return None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               cache: KVCache, kv_written: bool = False) -> torch.Tensor:
        raise NotImplementedError


class CacheSlotStep(AttentionStep):
    """A step whose new K/V go straight into the paged cache at ``self.slots``."""

    def kv_store(self, layer: int, cache: KVCache) -> KVStore:
        return cache.k[layer], cache.v[layer], self.slots

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, cache: KVCache, kv_written: bool) -> None:
        if not kv_written:  # the fused RoPE kernel may have stored them already
            cache.write(layer, self.slots, k, v)


@dataclass(slots=True)
class PrefillStep(CacheSlotStep):
    """New tokens of several sequences, packed; each attends causally to its sequence's cache."""

    slots: torch.Tensor  # [T] int64 cache slot of each new token
    block_tables: torch.Tensor  # [B, max_blocks] int32
    cu_seqlens_q: torch.Tensor  # [B+1] int32 offsets of each sequence's new tokens
    seq_lens: torch.Tensor  # [B] int32 cached tokens after this step (prefix + new)
    max_query_len: int
    scale: float
    backend: str = "torch"

    def attend(self, layer, q, k, v, cache, kv_written=False):
        self.store(layer, k, v, cache, kv_written)
        fn = ops.paged_prefill_attention if self.backend == "triton" else ops.paged_prefill_attention_ref
        return fn(q, cache.k[layer], cache.v[layer], self.block_tables, self.cu_seqlens_q,
                  self.seq_lens, self.max_query_len, self.scale)


@dataclass(slots=True)
class DecodeStep(CacheSlotStep):
    """One new token per sequence; fixed shapes so the step can be a CUDA graph."""

    slots: torch.Tensor  # [B] int64 cache slot of each new token
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32 cached tokens including the new one
    scale: float
    backend: str = "torch"

    def attend(self, layer, q, k, v, cache, kv_written=False):
        self.store(layer, k, v, cache, kv_written)
        if self.backend == "triton":
            out, _ = ops.paged_decode_attention(q[:, None], cache.k[layer], cache.v[layer], self.block_tables,
                                                self.context_lens, self.scale, out_dtype=q.dtype)
        else:
            out, _ = ops.paged_decode_attention_ref(q[:, None], cache.k[layer], cache.v[layer], self.block_tables,
                                                    self.context_lens, self.scale)
        return out[:, 0].to(q.dtype)


@dataclass(slots=True)
class TreeStep(AttentionStep):
    """N tree nodes per sequence: the cached prefix is visible to all, inside the tree only
    ancestors. Every layer's tree K/V go to two buffers the step makes at its first layer (the
    fused RoPE kernels store them there: no stacking, no copy); the accepted path is committed to
    the cache after the forward (see ``stacked``)."""

    block_tables: torch.Tensor  # [B, max_blocks] int32
    prefix_lens: torch.Tensor  # [B] int32 cached tokens before the tree
    ancestor_bits: torch.Tensor  # [B, N] int64, bit j of row i: node j is visible to node i
    scale: float
    backend: str = "torch"
    # [L, B * N, 1, Hkv, D]: a layer's buffer is a cache of B * N one-slot blocks, node row r at slot r
    tree_k: torch.Tensor | None = None
    tree_v: torch.Tensor | None = None
    node_slots: torch.Tensor | None = None  # [B * N] int64: 0 .. B * N - 1

    def _buffers(self, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tree_k is None:
            rows = self.ancestor_bits.numel()
            shape = (cache.k.shape[0], rows, 1, *cache.k.shape[3:])
            self.tree_k, self.tree_v = cache.k.new_empty(shape), cache.v.new_empty(shape)
            self.node_slots = torch.arange(rows, device=cache.k.device)
        return self.tree_k, self.tree_v

    def kv_store(self, layer: int, cache: KVCache) -> KVStore:
        tree_k, tree_v = self._buffers(cache)
        return tree_k[layer], tree_v[layer], self.node_slots

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward's tree K/V of every layer: two [L, B, N, Hkv, D] views of its buffers."""
        if self.tree_k is None:
            raise ValueError("TreeStep.stacked: no forward has attended through this step")
        shape = (self.tree_k.shape[0], *self.ancestor_bits.shape, *self.tree_k.shape[3:])
        return self.tree_k.view(shape), self.tree_v.view(shape)

    def attend(self, layer, q, k, v, cache, kv_written=False):
        tree_k, tree_v = self._buffers(cache)
        bsz, n = self.ancestor_bits.shape
        if not kv_written:  # the unfused path hands over the rotated k/v
            tree_k[layer, :, 0].copy_(k.reshape(bsz * n, *k.shape[1:]))
            tree_v[layer, :, 0].copy_(v.reshape(bsz * n, *v.shape[1:]))
        k, v = (t[layer].view(bsz, n, *t.shape[3:]) for t in (tree_k, tree_v))
        q = q.view(bsz, n, *q.shape[1:])
        fn = ops.two_pass_tree_attention if self.backend == "triton" else ops.two_pass_tree_attention_ref
        out = fn(q, cache.k[layer], cache.v[layer], self.block_tables, self.prefix_lens,
                 k, v, self.ancestor_bits, self.scale)
        return out.reshape(bsz * n, *out.shape[2:]).to(q.dtype)
