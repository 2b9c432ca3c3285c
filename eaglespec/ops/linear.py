"""``x @ weight.T`` for a step's few token rows, in the layout the device's BLAS reads fastest.

On the CPU, ``F.linear`` of one fp32 row is a matrix-vector routine, and of 2-16 rows a
matrix-matrix one that reads the weight as its second operand. On this repository's 2-core
machine (torch 2.13's CPU build) both read weights at about 10 GB/s once they are out of cache.
The same product written weight-major, ``weight @ x.T``, with at least two rows reads them at
about 40 GB/s: SmolLM2's output projection took 11.4 ms for one row with ``F.linear`` and 2.9 ms
for two rows weight-major; plain decoding of the default model ran 1.8x faster (design note 57).
From 32 rows on, and in bf16, ``F.linear`` is as fast or faster, and CUDA keeps it (cuBLAS picks
its own layout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Most token rows that take the weight-major product on the CPU (16 still measured ahead, 32 behind).
CPU_WEIGHT_MAJOR_MAX_ROWS = 16


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x [..., K], weight [N, K] -> [..., N]; on the CPU, fp32
    with 1..CPU_WEIGHT_MAJOR_MAX_ROWS rows, as ``weight @ x.T`` (one row goes in twice: two rows
    take the fast routine; each output row is computed from its own input row alone)."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 \
            or not 0 < rows <= CPU_WEIGHT_MAJOR_MAX_ROWS:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, k)
    y = (weight @ (torch.cat((flat, flat)) if rows == 1 else flat).T).T[:rows].contiguous()  # (a stride-0 row is slow)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict keys) whose forward is ``linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
