"""Which shard of a tensor-parallel model this process holds, and the collectives between shards.

A ``TensorParallel`` is passed to the model when it is built (metadata as an argument, never a
module global). With ``world_size == 1`` every collective is the identity, so the single-GPU
path runs the same code without a process group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from eaglespec.config import LlamaConfig


@dataclass(frozen=True, slots=True)
class TensorParallel:
    rank: int = 0
    world_size: int = 1
    group: object | None = None  # the device-side process group (NCCL on GPUs, gloo on CPUs)

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"tensor parallel rank {self.rank} is not in [0, {self.world_size})")
        if self.world_size > 1 and self.group is None:
            raise ValueError(f"tensor parallelism over {self.world_size} ranks needs a process group")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the ranks, in place (row-parallel products' partial sums)."""
        if self.enabled:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` [..., n] side by side along the last dimension: [..., world * n]."""
        if not self.enabled:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


SINGLE = TensorParallel()


@dataclass(frozen=True, slots=True)
class TensorSlice:
    """The part of a checkpoint tensor one rank reads: indices [lo, hi) along ``dim``, then
    zero-padded to ``size`` along it (only the vocabulary's last shard is padded)."""

    dim: int
    lo: int
    hi: int
    size: int


@dataclass(frozen=True, slots=True)
class LlamaShard:
    """This rank's part of a Llama model, Megatron style: query heads, key/value heads and the
    MLP's intermediate columns split by rank (q/k/v and gate/up column-parallel, o and down
    row-parallel), the vocabulary split into equal padded ranges (embedding and output rows).

    Key/value heads: ``num_kv_heads / p`` per rank when p divides them; when p is a multiple of
    them each rank holds the one KV head its query heads read (replicated on p / num_kv_heads
    ranks). World size 1 is the whole model.
    """

    q_head0: int  # first query head of this rank
    num_heads: int  # query heads on this rank
    kv_head0: int  # first key/value head of this rank
    num_kv_heads: int  # key/value heads on this rank (one when replicated)
    inter0: int  # first intermediate (MLP) column of this rank
    intermediate_size: int  # intermediate columns on this rank
    vocab0: int  # first vocabulary row of this rank
    vocab_rows: int  # vocabulary rows on this rank (padding beyond vocab_size included)

    @classmethod
    def of(cls, cfg: LlamaConfig, tp: TensorParallel) -> "LlamaShard":
        """The shard of ``tp.rank``; ValueError naming the sizes when they do not split."""
        p, r = tp.world_size, tp.rank
        if cfg.num_heads % p:
            raise ValueError(f"tensor parallelism: num_heads ({cfg.num_heads}) must be divisible by the "
                             f"world size ({p})")
        if cfg.intermediate_size % p:
            raise ValueError(f"tensor parallelism: intermediate_size ({cfg.intermediate_size}) must be "
                             f"divisible by the world size ({p})")
        heads = cfg.num_heads // p
        if cfg.num_kv_heads % p == 0:
            kv_heads, kv0 = cfg.num_kv_heads // p, r * (cfg.num_kv_heads // p)
        elif p % cfg.num_kv_heads == 0:  # fewer KV heads than ranks: each is replicated
            kv_heads, kv0 = 1, r // (p // cfg.num_kv_heads)
        else:
            raise ValueError(f"tensor parallelism: num_kv_heads ({cfg.num_kv_heads}) and the world size "
                             f"({p}) must divide one another (KV heads are split or replicated whole)")
        rows = -(-cfg.vocab_size // p)  # ceil: the vocabulary is padded to a multiple of p
        inter = cfg.intermediate_size // p
        return cls(q_head0=r * heads, num_heads=heads, kv_head0=kv0, num_kv_heads=kv_heads,
                   inter0=r * inter, intermediate_size=inter, vocab0=r * rows, vocab_rows=rows)

    def vocab_slice(self, vocab_size: int) -> TensorSlice:
        """Rows of an embedding / output matrix this rank reads (the last shard's tail padded)."""
        lo = min(self.vocab0, vocab_size)
        return TensorSlice(0, lo, min(self.vocab0 + self.vocab_rows, vocab_size), self.vocab_rows)

    def checkpoint_slices(self, cfg: LlamaConfig) -> dict[str, TensorSlice]:
        """Hugging Face tensor name -> the slice this rank reads; names not listed are read whole
        (the norms, replicated)."""
        d = cfg.head_dim

        def part(dim: int, lo: int, n: int) -> TensorSlice:
            return TensorSlice(dim, lo, lo + n, n)

        q = part(0, self.q_head0 * d, self.num_heads * d)
        kv = part(0, self.kv_head0 * d, self.num_kv_heads * d)
        inter = part(0, self.inter0, self.intermediate_size)
        out = {"model.embed_tokens.weight": self.vocab_slice(cfg.vocab_size)}
        if not cfg.tie_word_embeddings:
            out["lm_head.weight"] = self.vocab_slice(cfg.vocab_size)
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}"
            out.update({f"{p}.self_attn.q_proj.weight": q, f"{p}.self_attn.k_proj.weight": kv,
                        f"{p}.self_attn.v_proj.weight": kv,
                        f"{p}.self_attn.o_proj.weight": part(1, q.lo, q.size),
                        f"{p}.mlp.gate_proj.weight": inter, f"{p}.mlp.up_proj.weight": inter,
                        f"{p}.mlp.down_proj.weight": part(1, inter.lo, inter.size)})
        return out
