"""CUDA graphs for fixed-shape steps, one per batch-size bucket.

A step function takes a dict of static input tensors and returns a tuple of tensors. On a CUDA
device each bucket's call is captured once and replayed; elsewhere the function simply runs
eagerly. Callers fill the host-side twins of the inputs (``staging``: pinned memory on CUDA, the
inputs themselves elsewhere) and ``run`` copies them over asynchronously before the step.
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
        self._inputs: dict[int, dict[str, torch.Tensor]] = {}  # bucket -> the static inputs
        self._staging: dict[int, tuple[dict[str, torch.Tensor], torch.cuda.Event | None]] = {}
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self._pool = None

    def inputs(self, bucket: int) -> dict[str, torch.Tensor]:
        """The static inputs of a bucket (what the step function and its graph read)."""
        if bucket not in self._inputs:
            self._inputs[bucket] = self.make_inputs(bucket)
        return self._inputs[bucket]

    def staging(self, bucket: int) -> dict[str, torch.Tensor]:
        """Host buffers to fill with the next step's inputs, then ``run(bucket)``. Waits until the
        previous run's copy out of them has finished."""
        if bucket not in self._staging:
            static = self.inputs(bucket)
            on_gpu = any(t.is_cuda for t in static.values())
            host = {name: torch.empty_like(t, device="cpu").pin_memory() if t.is_cuda else t
                    for name, t in static.items()}
            self._staging[bucket] = (host, torch.cuda.Event() if on_gpu else None)
        host, copied = self._staging[bucket]
        if copied is not None:
            copied.synchronize()
        return host

    def run(self, bucket: int, prepare: Callable[[dict[str, torch.Tensor]], None] | None = None,
            ) -> tuple[torch.Tensor, ...]:
        """Run the step on the staged inputs of a batch padded to ``bucket`` rows. ``prepare``
        may then overwrite static inputs on the device (values that never reached the host)."""
        if self.use_graphs and bucket not in self._graphs:
            self._capture(bucket)  # before the copy: the warm-up runs must see padding rows only
        static = self.inputs(bucket)
        if bucket not in self._staging:
            self.staging(bucket)
        host, copied = self._staging[bucket]
        for name, value in host.items():
            if value is not static[name]:
                static[name].copy_(value, non_blocking=True)
        if copied is not None:
            copied.record()
        if prepare is not None:
            prepare(static)
        if not self.use_graphs:
            return self.fn(static)
        graph, static_out = self._graphs[bucket]
        graph.replay()
        return static_out

    def _capture(self, bucket: int) -> None:
        static_in = self.inputs(bucket)
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
        self._graphs[bucket] = (graph, static_out)
