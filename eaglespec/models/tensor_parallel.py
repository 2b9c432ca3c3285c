"""Which shard of a tensor-parallel model this process holds, and the collectives between shards.

A ``TensorParallel`` is passed to the model when it is built (metadata as an argument, never a
module global). With ``world_size == 1`` every collective is the identity, so the single-GPU
path runs the same code without a process group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


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
