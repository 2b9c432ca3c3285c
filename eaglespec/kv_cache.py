"""The paged KV pool: its tensors (``KVCache``), the bookkeeping of which block holds which
token (a free list of blocks and each sequence's block list), and the commit of accepted tree
nodes' K/V into place. Block 0 is never handed out: padded rows of a CUDA-graph batch write there.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from eaglespec.ops.greedy_accept import CommitIndices
from eaglespec.ops.kv_commit import copy_kv_rows, copy_kv_rows_ref


@dataclass(slots=True)
class KVCache:
    """The paged KV pool of one model: block 0 is a scratch block that padded rows write to."""

    k: torch.Tensor  # [L, num_blocks, block_size, Hkv, D]
    v: torch.Tensor  # [L, num_blocks, block_size, Hkv, D]

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @classmethod
    def allocate(cls, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str) -> "KVCache":
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k/v [T, Hkv, D] at flat slots [T] (slot = block * block_size + offset)."""
        hkv, d = self.k.shape[-2:]
        self.k[layer].view(-1, hkv, d).index_copy_(0, slots, k.to(self.k.dtype))
        self.v[layer].view(-1, hkv, d).index_copy_(0, slots, v.to(self.v.dtype))


class KVPoolExhausted(RuntimeError):
    """Raised when a sequence needs more blocks than the pool has free."""


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"KV pool needs at least 2 blocks (block 0 is scratch), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(1, num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return blocks_for(num_tokens, self.block_size)

    def can_hold(self, blocks: list[int], num_tokens: int) -> bool:
        """Whether a sequence owning ``blocks`` can grow to ``num_tokens`` from the free list."""
        return self.blocks_needed(num_tokens) - len(blocks) <= self.num_free

    def grow(self, blocks: list[int], num_tokens: int) -> None:
        """Append blocks to ``blocks`` until it holds ``num_tokens`` tokens."""
        need = self.blocks_needed(num_tokens) - len(blocks)
        if need > self.num_free:
            raise KVPoolExhausted(f"KV pool exhausted: need {need} more blocks of {self.block_size} tokens, "
                                  f"{self.num_free} free of {self.num_blocks - 1}")
        for _ in range(max(need, 0)):
            blocks.append(self._free.popleft())

    def release(self, blocks: list[int]) -> None:
        self._free.extend(blocks)
        blocks.clear()


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold ``num_tokens`` positions."""
    return (num_tokens + block_size - 1) // block_size


def slots_for(blocks: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Flat cache slots of token positions [start, end) of a sequence owning ``blocks``."""
    return [blocks[p // block_size] * block_size + p % block_size for p in range(start, end)]


def block_table_tensor(block_lists: list[list[int]], width: int, device) -> torch.Tensor:
    """[B, width] int32 block table, padded with the scratch block 0."""
    table = torch.zeros(len(block_lists), width, dtype=torch.int32)
    for i, blocks in enumerate(block_lists):
        if len(blocks) > width:
            raise ValueError(f"sequence holds {len(blocks)} blocks, more than the table width {width}")
        if blocks:
            table[i, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    return table.to(device)


def pool_blocks_from_memory(free_bytes: int, fraction: float, num_layers: int, block_size: int,
                            num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """How many blocks fit in ``fraction`` of ``free_bytes`` (K and V, every layer)."""
    per_block = 2 * num_layers * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
    return max(int(free_bytes * fraction) // per_block, 2)


def copy_tree_kv(cache: KVCache, tree_k: torch.Tensor, tree_v: torch.Tensor, where: CommitIndices,
                 backend: str) -> None:
    """tree_k/v [L, B, N, Hkv, D] rows ``where.rows`` (flat b * N + node) -> cache slots
    ``where.slots``, every layer: one launch on the "triton" backend, two gathers and two
    scatters on the "torch" one."""
    num_layers, _, _, hkv, d = tree_k.shape
    copy = copy_kv_rows if backend == "triton" else copy_kv_rows_ref
    copy(tree_k.reshape(num_layers, -1, hkv, d), tree_v.reshape(num_layers, -1, hkv, d), cache.k, cache.v,
         where.rows, where.slots)
