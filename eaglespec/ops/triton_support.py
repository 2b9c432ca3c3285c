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


def interpreted(kernel) -> bool:
    """Whether ``kernel`` runs under the CPU interpreter (TRITON_INTERPRET=1)."""
    return type(kernel).__name__ == "InterpretedFunction"


def mma_options(dtype, kernel) -> dict:
    """Operand dtype and precision of a kernel's tl.dot calls (constexprs MMA_DTYPE, DOT_PRECISION).

    16-bit inputs multiply in their own dtype (fp32 accumulation). fp32 inputs use exact fp32
    products: tf32 would miss the fp32 tolerance. The Triton interpreter multiplies bf16 as raw
    uint16 bits, so there bf16 operands are widened to fp32 (after the same bf16 rounding).
    """
    import torch

    if dtype == torch.bfloat16 and interpreted(kernel):
        return {"MMA_DTYPE": tl.float32, "DOT_PRECISION": "ieee"}
    mma = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]
    return {"MMA_DTYPE": mma, "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32"}
