"""CUDA graphs for fixed-shape steps, one per batch-size bucket.

A step function takes a dict of static input tensors and returns a tuple of tensors. On a CUDA
device each bucket's call is captured once and replayed after copying fresh inputs into the
static buffers; elsewhere the function simply runs eagerly.
"""

from __future__ import annotations

from typing import Callable

import torch

StepFn = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, ...]]


def bucket_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 8 up to max_batch (always included)."""
    sizes = [s for s in (1, 2, 4) if s < max_batch]
    sizes += list(range(8, max_batch, 8))
    sizes.append(max_batch)
    return sorted(set(sizes))


def bucket_for(batch: int, buckets: list[int]) -> int:
    for size in buckets:
        if size >= batch:
            return size
    raise ValueError(f"batch of {batch} exceeds the largest bucket {buckets[-1]}")


class StepGraphs:
    def __init__(self, fn: StepFn, make_inputs: Callable[[int], dict[str, torch.Tensor]],
                 use_graphs: bool):
        self.fn = fn
        self.make_inputs = make_inputs
        self.use_graphs = use_graphs
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict, tuple]] = {}
        self._pool = None

    def run(self, bucket: int, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Run the step on a batch padded to ``bucket`` rows (inputs already padded)."""
        if not self.use_graphs:
            return self.fn(inputs)
        if bucket not in self._graphs:
            self._capture(bucket)
        graph, static_in, static_out = self._graphs[bucket]
        for name, value in inputs.items():
            static_in[name].copy_(value, non_blocking=True)
        graph.replay()
        return static_out

    def _capture(self, bucket: int) -> None:
        static_in = self.make_inputs(bucket)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: Triton compiles, cuBLAS picks its kernels
                self.fn(static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = self.fn(static_in)
        self._pool = graph.pool()
        self._graphs[bucket] = (graph, static_in, static_out)
