"""Fused single-token matrix-vector kernels vs their PyTorch references (CPU: TRITON_INTERPRET=1).

Shapes are chosen awkward on purpose: row counts that are not multiples of the row tile,
inputs that are not multiples of the column tile, GQA head counts, a head_dim whose half is
smaller than the row tile.
"""

from __future__ import annotations

import pytest
import torch

from eaglespec.models.llama import rope_cos_sin, rope_inverse_frequencies
from eaglespec.ops import gemv as G
from tests.conftest import DEVICE, needs_triton_kernels, seeded_randn

pytestmark = needs_triton_kernels

DTYPES = [torch.float32, torch.bfloat16]
SMALL_TILE = G.GemvTile(block_n=8, block_k=64)


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    if want.dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    else:  # summation order and where the norm scale is applied differ: a few bf16 ulps
        torch.testing.assert_close(got.float(), want.float(), atol=4e-2, rtol=2 ** -6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,norm,residual", [(100, 300, False, False), (64, 576, True, False),
                                               (33, 1000, True, True), (17, 64, False, True)])
def test_gemv_matches_reference(dtype, n, k, norm, residual):
    w = seeded_randn(n, k, seed=1, dtype=dtype, scale=0.05)
    x = seeded_randn(1, k, seed=2, dtype=dtype, scale=2.0)
    g = (1.0 + 0.3 * seeded_randn(k, seed=3)).to(dtype) if norm else None
    r = seeded_randn(1, n, seed=4, dtype=dtype) if residual else None
    for tile in (SMALL_TILE, None):
        _assert_close(G.gemv(w, x, g, 1e-5, r, tile=tile), G.gemv_ref(w, x, g, 1e-5, r))


def test_gemv_writes_float32_logits_rounded_like_the_model():
    w = seeded_randn(50, 96, seed=5, dtype=torch.bfloat16, scale=0.1)
    x = seeded_randn(1, 96, seed=6, dtype=torch.bfloat16)
    g = torch.ones(96, dtype=torch.bfloat16, device=DEVICE)
    got = G.gemv(w, x, g, 1e-6, out_dtype=torch.float32, tile=SMALL_TILE)
    want = G.gemv_ref(w, x, g, 1e-6, out_dtype=torch.float32)
    assert got.dtype == torch.float32
    assert torch.equal(got, got.to(torch.bfloat16).float())  # values are bf16 products, widened
    _assert_close(got.to(torch.bfloat16), want.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter,k,norm", [(200, 300, True), (36, 64, False)])
def test_gemv_silu_mul_matches_reference(dtype, inter, k, norm):
    w = seeded_randn(2 * inter, k, seed=7, dtype=dtype, scale=0.1)
    x = seeded_randn(1, k, seed=8, dtype=dtype)
    g = (1.0 + 0.3 * seeded_randn(k, seed=9)).to(dtype) if norm else None
    _assert_close(G.gemv_silu_mul(w, x, g, 1e-5, tile=SMALL_TILE), G.gemv_silu_mul_ref(w, x, g, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d", [(6, 2, 32), (4, 4, 8), (9, 3, 64)])
def test_gemv_qkv_rope_matches_reference_and_fills_only_its_slot(dtype, hq, hkv, d):
    k_in = 96
    w = seeded_randn((hq + 2 * hkv) * d, k_in, seed=10, dtype=dtype, scale=0.1)
    x = seeded_randn(1, k_in, seed=11, dtype=dtype)
    g = (1.0 + 0.3 * seeded_randn(k_in, seed=12)).to(dtype)
    cos, sin = rope_cos_sin(torch.tensor([1234], device=DEVICE), rope_inverse_frequencies(d, 10000.0, None).to(DEVICE),
                            dtype)
    caches = [[torch.zeros(3, 4, hkv, d, dtype=dtype, device=DEVICE) for _ in range(2)] for _ in range(2)]
    slot = torch.tensor([6], device=DEVICE)
    got = G.gemv_qkv_rope(w, x, g, 1e-5, cos, sin, *caches[0], slot, hq, hkv, tile=SMALL_TILE)
    want = G.gemv_qkv_rope_ref(w, x, g, 1e-5, cos, sin, *caches[1], slot, hq, hkv)
    _assert_close(got, want)
    for got_cache, want_cache in zip(caches[0], caches[1]):
        _assert_close(got_cache, want_cache)
        flat = got_cache.view(-1, hkv, d)
        assert flat[6].abs().sum() > 0
        assert flat[:6].abs().sum() == 0 and flat[7:].abs().sum() == 0


def test_gemv_bad_inputs_name_the_problem():
    w = torch.zeros(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="one contiguous row of 16"):
        G.gemv(w, torch.zeros(2, 16, device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        G.gemv(w, torch.zeros(1, 16, device=DEVICE, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="norm weight must have shape"):
        G.gemv(w, torch.zeros(1, 16, device=DEVICE), torch.ones(8, device=DEVICE))
    with pytest.raises(ValueError, match="residual"):
        G.gemv(w, torch.zeros(1, 16, device=DEVICE), residual=torch.zeros(1, 9, device=DEVICE))
    with pytest.raises(ValueError, match="even row count"):
        G.gemv_silu_mul(torch.zeros(7, 16, device=DEVICE), torch.zeros(1, 16, device=DEVICE))
    cache = torch.zeros(2, 4, 2, 8, device=DEVICE)
    cos = torch.zeros(1, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"expected \(Hq \+ 2 Hkv\) \* D = 48"):
        G.gemv_qkv_rope(torch.zeros(40, 16, device=DEVICE), torch.zeros(1, 16, device=DEVICE), None, 1e-5,
                        cos, cos, cache, cache.clone(), torch.tensor([0], device=DEVICE), 2, 2)
