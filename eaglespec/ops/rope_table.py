"""RoPE's cos/sin tables of a step's positions: one launch instead of five (seven in 16 bits).

Every forward needs, for its positions [T], the rotate-half tables cos/sin [T, head_dim]:
angle[t, i] = position[t] * inv_freq[i mod head_dim/2]. With torch that is a cast, a product,
a concatenation, a cos, a sin (and two casts to the model dtype); here one kernel writes both
tables. ``rope_table_ref`` is the PyTorch reference (the torch forwards use it); the kernel
forms the same fp32 angle, then rounds its cos/sin to the dtype.
"""

from __future__ import annotations

import torch

from eaglespec.ops.triton_support import jit as _jit, tl, triton  # noqa: F401


def rope_table_ref(positions: torch.Tensor, inv_freq: torch.Tensor,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] (int), inv_freq [head_dim / 2] fp32 -> cos, sin [T, head_dim] in ``dtype``."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@_jit
def _rope_table_kernel(pos_ptr, inv_ptr, cos_ptr, sin_ptr, T, HALF, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < T
    col_ok = cols < 2 * HALF
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=0).to(tl.float32)
    inv = tl.load(inv_ptr + cols % HALF, mask=col_ok, other=0.0)
    angle = pos[:, None] * inv[None, :]
    out = rows.to(tl.int64)[:, None] * (2 * HALF) + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(cos_ptr + out, tl.cos(angle).to(cos_ptr.dtype.element_ty), mask=ok)
    tl.store(sin_ptr + out, tl.sin(angle).to(sin_ptr.dtype.element_ty), mask=ok)


def rope_table(positions: torch.Tensor, inv_freq: torch.Tensor,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``rope_table_ref`` (same arguments and results), one launch."""
    if not (isinstance(positions, torch.Tensor) and positions.dim() == 1 and not positions.dtype.is_floating_point
            and positions.is_contiguous()):
        raise ValueError(f"positions must be a contiguous 1-d integer tensor, got "
                         f"{getattr(positions, 'dtype', type(positions).__name__)} {tuple(getattr(positions, 'shape', ()))}")
    if not (isinstance(inv_freq, torch.Tensor) and inv_freq.dim() == 1 and inv_freq.dtype == torch.float32
            and inv_freq.is_contiguous() and inv_freq.device == positions.device):
        raise ValueError(f"inv_freq must be a contiguous fp32 [head_dim / 2] tensor on {positions.device}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if triton is None:
        raise RuntimeError("triton is not installed: use rope_table_ref")
    if not (positions.is_cuda or type(_rope_table_kernel).__name__ == "InterpretedFunction"):
        raise ValueError(f"rope_table needs CUDA tensors (got {positions.device}); set TRITON_INTERPRET=1")
    t, half = positions.shape[0], inv_freq.shape[0]
    cos = torch.empty((t, 2 * half), dtype=dtype, device=positions.device)
    sin = torch.empty_like(cos)
    if t:
        block = max(16, 1 << (2 * half - 1).bit_length())
        # No more rows a program than the step has: masked rows still compute their cos/sin.
        rows = max(1, min(64, 2048 // block, 1 << (t - 1).bit_length()))
        _rope_table_kernel[(triton.cdiv(t, rows),)](positions, inv_freq, cos, sin, t, half, ROWS=rows, BLOCK=block,
                                                    num_warps=4)
    return cos, sin
