"""Fused small-matrix product kernels vs their PyTorch references (CPU: TRITON_INTERPRET=1).

Row counts cover one row, a partial M tile, a full tile and more than one tile (weights read
again per tile); column counts are not multiples of the tiles; GQA heads, a head_dim whose half
is below tl.dot's minimum tile, and cache slots scattered over the pool.
"""

from __future__ import annotations

import pytest
import torch

from eaglespec.models.llama import rope_cos_sin, rope_inverse_frequencies
from eaglespec.ops import fused_linear as L
from tests.conftest import DEVICE, needs_triton_kernels, seeded_randn

pytestmark = needs_triton_kernels

DTYPES = [torch.float32, torch.bfloat16]
ROWS = [1, 5, 16, 70]


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    if want.dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:  # summation order and where the norm scale is applied differ: a few bf16 ulps
        torch.testing.assert_close(got.float(), want.float(), atol=1e-1, rtol=2 ** -5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", ROWS)
def test_linear_matches_reference(dtype, t):
    w = seeded_randn(100, 300, seed=1, dtype=dtype, scale=0.05)
    x = seeded_randn(t, 300, seed=2, dtype=dtype, scale=2.0)
    g = (1.0 + 0.3 * seeded_randn(300, seed=3)).to(dtype)
    r = seeded_randn(t, 100, seed=4, dtype=dtype)
    _assert_close(L.linear(w, x, g, 1e-5, r), L.linear_ref(w, x, g, 1e-5, r))
    _assert_close(L.linear(w, x), L.linear_ref(w, x))
    wide = seeded_randn(t, 400, seed=5, dtype=dtype)[:, 50:350]  # strided rows, as a slice of a wider output
    _assert_close(L.linear(w, wide, residual=r), L.linear_ref(w, wide, residual=r))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", ROWS)
def test_silu_mul_linear_matches_reference(dtype, t):
    w = seeded_randn(2 * 72, 96, seed=6, dtype=dtype, scale=0.1)
    x = seeded_randn(t, 96, seed=7, dtype=dtype)
    g = (1.0 + 0.3 * seeded_randn(96, seed=8)).to(dtype)
    _assert_close(L.silu_mul_linear(w, x, g, 1e-5), L.silu_mul_linear_ref(w, x, g, 1e-5))
    _assert_close(L.silu_mul_linear(w, x), L.silu_mul_linear_ref(w, x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", ROWS)
@pytest.mark.parametrize("hq,hkv,d,norm", [(6, 2, 16, True), (4, 4, 64, False)])
def test_qkv_rope_linear_matches_reference_with_and_without_cache(dtype, t, hq, hkv, d, norm):
    k_in = 80
    w = seeded_randn((hq + 2 * hkv) * d, k_in, seed=9, dtype=dtype, scale=0.1)
    x = seeded_randn(t, k_in, seed=10, dtype=dtype)
    g = (1.0 + 0.3 * seeded_randn(k_in, seed=11)).to(dtype) if norm else None
    positions = torch.arange(t, device=DEVICE) * 37 + 5
    cos, sin = rope_cos_sin(positions, rope_inverse_frequencies(d, 10000.0, None).to(DEVICE), dtype)
    got, want = L.qkv_rope_linear(w, x, g, 1e-5, cos, sin, hq, hkv), L.qkv_rope_linear_ref(w, x, g, 1e-5, cos, sin,
                                                                                            hq, hkv)
    for a, b in zip(got, want):
        _assert_close(a, b)
    slots = torch.randperm(10 * 16, generator=torch.Generator().manual_seed(t))[:t].to(DEVICE)
    caches = [[torch.zeros(10, 16, hkv, d, dtype=dtype, device=DEVICE) for _ in range(2)] for _ in range(2)]
    got = L.qkv_rope_linear(w, x, g, 1e-5, cos, sin, hq, hkv, *caches[0], slots)
    want = L.qkv_rope_linear_ref(w, x, g, 1e-5, cos, sin, hq, hkv, *caches[1], slots)
    for a, b in zip(got, want):
        _assert_close(a, b)
    for got_cache, want_cache in zip(caches[0], caches[1]):
        _assert_close(got_cache, want_cache)
        flat = got_cache.view(-1, hkv, d)
        untouched = torch.ones(flat.shape[0], dtype=torch.bool, device=DEVICE)
        untouched[slots] = False
        assert flat[untouched].abs().sum() == 0 and flat[slots].abs().sum() > 0


def test_fused_linear_bad_inputs_name_the_problem():
    w = torch.zeros(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"input must be \[T, 16\] rows"):
        L.linear(w, torch.zeros(2, 15, device=DEVICE))
    with pytest.raises(ValueError, match="residual must be"):
        L.linear(w, torch.zeros(2, 16, device=DEVICE), residual=torch.zeros(3, 8, device=DEVICE))
    with pytest.raises(ValueError, match="even row count"):
        L.silu_mul_linear(torch.zeros(7, 16, device=DEVICE), torch.zeros(1, 16, device=DEVICE))
    cos = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="not \\(Hq \\+ 2 Hkv\\)"):
        L.qkv_rope_linear(torch.zeros(44, 16, device=DEVICE), torch.zeros(2, 16, device=DEVICE), None, 1e-5,
                          cos, cos, 2, 2)
    with pytest.raises(ValueError, match="slots must be"):
        L.qkv_rope_linear(torch.zeros(48, 16, device=DEVICE), torch.zeros(2, 16, device=DEVICE), None, 1e-5,
                          cos, cos, 2, 2, torch.zeros(2, 4, 2, 8, device=DEVICE), torch.zeros(2, 4, 2, 8, device=DEVICE),
                          torch.zeros(3, dtype=torch.int64, device=DEVICE))
