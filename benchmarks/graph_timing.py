"""Kernel timing for the benchmark scripts beside this file: triton's do_bench, eagerly or over
one CUDA-graph replay (which leaves out Python and launch overhead, so that a call of a few
small kernels is timed on the device, not on the host)."""
from __future__ import annotations

import torch
import triton.testing


def bench_ms(fn, warmup_ms: int = 10, rep_ms: int = 60) -> float:
    """Median ms of fn; do_bench zeroes a 256 MB buffer before every call (cold L2)."""
    try:
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    except TypeError:  # older triton: quantiles only
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5]))


def graph_bench_ms(fn, warmup_ms: int = 10, rep_ms: int = 60) -> float:
    """Median ms of one CUDA-graph replay of fn (cold L2), as bench_ms times it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # compile kernels, settle the allocator
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    try:
        return bench_ms(graph.replay, warmup_ms, rep_ms)
    finally:
        del graph
