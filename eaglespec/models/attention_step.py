"""How the tokens of one forward attend: the per-step attention metadata.

A forward pass is told *what kind* of step it is by one of these dataclasses, passed as an
argument (never stored on the model). Each writes the new K/V where they belong and calls the
matching op of ``eaglespec.ops.attention`` on the chosen backend ("torch" reference or "triton").

``kv_slots`` tells a fused kernel where the new K/V go in the paged cache, so it can store them
while it applies RoPE; ``attend(..., kv_written=True)`` then skips the step's own store.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from eaglespec.kv_cache import KVCache
from eaglespec.ops import attention as ops


class AttentionStep:
    """Interface: ``attend(layer, q [T,Hq,D], k [T,Hkv,D], v, cache, kv_written=False) -> [T,Hq,D]``.

    kv_written: the caller already stored k/v at ``kv_slots`` of the cache (only allowed when
    ``kv_slots`` is not None).
    """

    @property
    def kv_slots(self) -> torch.Tensor | None:
        """[T] int64 flat cache slots of the new K/V, or None when the step stores them elsewhere."""
        return None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               cache: KVCache, kv_written: bool = False) -> torch.Tensor:
        raise NotImplementedError


class CacheSlotStep(AttentionStep):
    """A step whose new K/V go straight into the paged cache at ``self.slots``."""

    @property
    def kv_slots(self) -> torch.Tensor:
        return self.slots

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
    ancestors. Each layer's tree K/V stay where the forward made them (kept by reference, no
    copy); the accepted path is committed to the cache after the forward (see ``stacked``)."""

    block_tables: torch.Tensor  # [B, max_blocks] int32
    prefix_lens: torch.Tensor  # [B] int32 cached tokens before the tree
    ancestor_bits: torch.Tensor  # [B, N] int64, bit j of row i: node j is visible to node i
    scale: float
    backend: str = "torch"
    tree_k: list = field(default_factory=list)  # per layer: [B, N, Hkv, D], filled by the forward
    tree_v: list = field(default_factory=list)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward's tree K/V of every layer: two [L, B, N, Hkv, D] tensors."""
        return torch.stack(self.tree_k), torch.stack(self.tree_v)

    def attend(self, layer, q, k, v, cache, kv_written=False):
        if kv_written:
            raise ValueError("TreeStep keeps tree K/V in its side buffer (kv_slots is None): "
                             "pass kv_written=False and the rotated k/v")
        bsz, n = self.ancestor_bits.shape
        k = k.reshape(bsz, n, *k.shape[1:])
        v = v.reshape(bsz, n, *v.shape[1:])  # a strided view into the qkv output: no copy
        if layer != len(self.tree_k):
            raise ValueError(f"TreeStep: layer {layer} attended out of order")
        self.tree_k.append(k)
        self.tree_v.append(v)
        q = q.view(bsz, n, *q.shape[1:])
        fn = ops.two_pass_tree_attention if self.backend == "triton" else ops.two_pass_tree_attention_ref
        out = fn(q, cache.k[layer], cache.v[layer], self.block_tables, self.prefix_lens,
                 k, v, self.ancestor_bits, self.scale)
        return out.reshape(bsz * n, *out.shape[2:]).to(q.dtype)
