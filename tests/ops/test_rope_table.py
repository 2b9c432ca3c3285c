"""RoPE table kernel against its reference."""

from __future__ import annotations

import pytest
import torch

from eaglespec.models.llama import rope_inverse_frequencies
from eaglespec.ops.rope_table import rope_table, rope_table_ref
from tests.conftest import DEVICE, needs_triton_kernels


@needs_triton_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,count", [(16, 1), (64, 37), (128, 5)])
def test_kernel_matches_reference(dtype, head_dim, count):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    inv = rope_inverse_frequencies(head_dim, 500000.0, scaling if head_dim == 128 else None).to(DEVICE)
    positions = torch.randint(0, 9000, (count,), generator=torch.Generator().manual_seed(count)).to(DEVICE)
    cos, sin = rope_table(positions, inv, dtype)
    ref_cos, ref_sin = rope_table_ref(positions, inv, dtype)
    assert cos.dtype == dtype and cos.shape == (count, head_dim)
    tol = dict(atol=1e-5, rtol=0) if dtype == torch.float32 else dict(atol=8e-3, rtol=0)
    torch.testing.assert_close(cos, ref_cos, **tol)
    torch.testing.assert_close(sin, ref_sin, **tol)


@needs_triton_kernels
def test_launcher_rejects_bad_input():
    inv = rope_inverse_frequencies(16, 10000.0, None).to(DEVICE)
    with pytest.raises(ValueError, match="positions must be"):
        rope_table(torch.zeros(3, device=DEVICE), inv, torch.float32)
    with pytest.raises(ValueError, match="inv_freq must be"):
        rope_table(torch.zeros(3, dtype=torch.int64, device=DEVICE), inv.double(), torch.float32)
