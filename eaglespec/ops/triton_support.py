"""Triton, when installed. The PyTorch references of every op work without it; the kernels need
it (on a GPU, or on the CPU through ``TRITON_INTERPRET=1``)."""

try:
    import triton
    import triton.language as tl

    jit = triton.jit
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

    def jit(fn):
        return fn
