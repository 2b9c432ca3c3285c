"""Fused few-token products (1 to 64 token rows) vs their PyTorch references (CPU: TRITON_INTERPRET=1).

Shapes are chosen awkward on purpose: feature counts that are not multiples of the feature tile,
inputs that are not multiples of the column tile, row counts that are not powers of two (padded
to the tl.dot tile), GQA head counts, a head_dim whose half is smaller than the feature tile.
"""

from __future__ import annotations

import pytest
import torch

from eaglespec.models.llama import rope_cos_sin, rope_inverse_frequencies
from eaglespec.ops import gemv as G
from eaglespec.ops.fused import rms_norm_ref
from tests.conftest import DEVICE, needs_triton_kernels, seeded_randn

pytestmark = needs_triton_kernels

DTYPES = [torch.float32, torch.bfloat16]
ROWS = [1, 2, 5, 16, 33, 64]


def small_tile(m: int) -> G.GemvTile:
    """Short column steps and narrow feature tiles, so every test crosses tile edges."""
    if m == 1:
        return G.GemvTile(block_n=8, block_k=64)
    return G.GemvTile(block_n=16, block_k=32, block_m=max(16, 1 << (m - 1).bit_length()))


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    if want.dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    else:  # summation order and where the norm scale is applied differ, and the epilogues round up
        # to four times (gate, up, silu, product), which the CPU interpreter does toward zero: 4 bf16 ulps
        torch.testing.assert_close(got.float(), want.float(), atol=4e-2, rtol=2 ** -5)


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,norm,residual", [(100, 300, False, False), (64, 576, True, False),
                                               (33, 1000, True, True), (17, 64, False, True)])
def test_gemv_matches_reference(m, dtype, n, k, norm, residual):
    w = seeded_randn(n, k, seed=1, dtype=dtype, scale=0.05)
    x = seeded_randn(m, k, seed=2, dtype=dtype, scale=2.0)
    g = (1.0 + 0.3 * seeded_randn(k, seed=3)).to(dtype) if norm else None
    r = seeded_randn(m, n, seed=4, dtype=dtype) if residual else None
    for tile in (small_tile(m), None):
        _assert_close(G.gemv(w, x, g, 1e-5, r, tile=tile), G.gemv_ref(w, x, g, 1e-5, r))


def test_gemv_rows_are_independent_and_may_be_strided():
    """Each row of a multi-row product equals that row's own one-row product (its own norm scale,
    its own residual), and x / residual may be row slices of wider tensors."""
    w = seeded_randn(40, 96, seed=20, scale=0.1)
    wide = seeded_randn(7, 200, seed=21)
    x = wide[:, 10:106]  # row stride 200
    g = 1.0 + 0.3 * seeded_randn(96, seed=22)
    r = seeded_randn(7, 90, seed=23)[:, 5:45]
    got = G.gemv(w, x, g, 1e-5, r)
    for i in range(7):
        _assert_close(got[i:i + 1], G.gemv(w, x[i:i + 1].contiguous(), g, 1e-5, r[i:i + 1].contiguous()))
    _assert_close(got, G.gemv_ref(w, x, g, 1e-5, r))


@pytest.mark.parametrize("m", [1, 5, 33])
def test_gemv_writes_float32_logits_rounded_like_the_model(m):
    w = seeded_randn(50, 96, seed=5, dtype=torch.bfloat16, scale=0.1)
    x = seeded_randn(m, 96, seed=6, dtype=torch.bfloat16)
    g = torch.ones(96, dtype=torch.bfloat16, device=DEVICE)
    got = G.gemv(w, x, g, 1e-6, out_dtype=torch.float32, tile=small_tile(m))
    want = G.gemv_ref(w, x, g, 1e-6, out_dtype=torch.float32)
    assert got.dtype == torch.float32
    assert torch.equal(got, got.to(torch.bfloat16).float())  # values are bf16 products, widened
    _assert_close(got.to(torch.bfloat16), want.to(torch.bfloat16))


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter,k,norm", [(200, 300, True), (36, 64, False)])
def test_gemv_silu_mul_matches_reference(m, dtype, inter, k, norm):
    w = seeded_randn(2 * inter, k, seed=7, dtype=dtype, scale=0.1)
    x = seeded_randn(m, k, seed=8, dtype=dtype)
    g = (1.0 + 0.3 * seeded_randn(k, seed=9)).to(dtype) if norm else None
    want = G.gemv_silu_mul_ref(w, x, g, 1e-5)
    for tile in (small_tile(m), None):
        got = G.gemv_silu_mul(w, x, g, 1e-5, tile=tile)
        if dtype == torch.float32:
            _assert_close(got, want)
        else:
            # _assert_close's bound, plus: one bf16 ulp of gate or up (the summation order differs
            # from cuBLAS's) moves the product by about 2^-8 |gate x up|; and the kernel rounds
            # each normalised input x * g to bf16 where the reference rounds x * g / rms, up to
            # 2^-8 apart per term, errors that add up randomly over K: a few times 2^-9 times
            # the terms' root sum of squares, for gate (times |up|) and for up (times |silu(gate)|).
            normed = x.float() if g is None else rms_norm_ref(x.float(), g.float(), 1e-5)[0]
            terms = (normed[:, None, :] * w.float()[None]).pow(2).sum(-1).sqrt()
            rss_gate, rss_up = terms.chunk(2, dim=-1)
            gate, up = (normed @ w.float().T).chunk(2, dim=-1)
            bound = (4e-2 + 2 ** -5 * want.float().abs() + 2 ** -6 * (gate.abs() * up.abs())
                     + 2 ** -7 * (torch.nn.functional.silu(gate).abs() * rss_up + up.abs() * rss_gate))
            assert ((got.float() - want.float()).abs() <= bound).all()


def _rope_tables(m: int, d: int, dtype):
    positions = torch.tensor([1234 + 37 * i for i in range(m)], device=DEVICE)  # a position per row
    return rope_cos_sin(positions, rope_inverse_frequencies(d, 10000.0, None).to(DEVICE), dtype)


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d", [(6, 2, 32), (4, 4, 8), (9, 3, 64)])
def test_gemv_qkv_rope_matches_reference_and_fills_only_its_slots(m, dtype, hq, hkv, d):
    k_in = 96
    w = seeded_randn((hq + 2 * hkv) * d, k_in, seed=10, dtype=dtype, scale=0.1)
    x = seeded_randn(m, k_in, seed=11, dtype=dtype)
    g = (1.0 + 0.3 * seeded_randn(k_in, seed=12)).to(dtype)
    cos, sin = _rope_tables(m, d, dtype)
    caches = [[torch.zeros(20, 8, hkv, d, dtype=dtype, device=DEVICE) for _ in range(2)] for _ in range(2)]
    slots = torch.randperm(160, generator=torch.Generator().manual_seed(m))[:m].to(DEVICE)
    got = G.gemv_qkv_rope(w, x, g, 1e-5, cos, sin, *caches[0], slots, hq, hkv, tile=small_tile(m))
    want = G.gemv_qkv_rope_ref(w, x, g, 1e-5, cos, sin, *caches[1], slots, hq, hkv)
    for got_t, want_t in zip(got, want):
        _assert_close(got_t, want_t)
    unused = torch.ones(160, dtype=torch.bool)
    unused[slots.cpu()] = False
    for got_cache, want_cache in zip(caches[0], caches[1]):
        _assert_close(got_cache, want_cache)
        flat = got_cache.view(-1, hkv, d)
        assert (flat[slots].abs().flatten(1).sum(1) > 0).all()
        assert flat[unused.to(DEVICE)].abs().sum() == 0


@pytest.mark.parametrize("m", ROWS)
def test_gemv_qkv_rope_without_slots_returns_views_of_one_qkv_output(m):
    """Tree verify keeps its K/V in the qkv output: no cache is written, and k / v are views
    that a step can reshape to [B, N, Hkv, D] without a copy."""
    hq, hkv, d, k_in = 6, 2, 16, 48
    w = seeded_randn((hq + 2 * hkv) * d, k_in, seed=13, scale=0.1)
    x = seeded_randn(m, k_in, seed=14)
    cos, sin = _rope_tables(m, d, torch.float32)
    q, k, v = G.gemv_qkv_rope(w, x, None, 1e-5, cos, sin, None, None, None, hq, hkv)
    for got_t, want_t in zip((q, k, v), G.gemv_qkv_rope_ref(w, x, None, 1e-5, cos, sin, None, None, None, hq, hkv)):
        _assert_close(got_t, want_t)
    row = (hq + 2 * hkv) * d
    assert m == 1 or q.stride(0) == k.stride(0) == v.stride(0) == row  # (a dim of size 1 has any stride)
    assert k.data_ptr() == q.data_ptr() + hq * d * 4 and v.data_ptr() == k.data_ptr() + hkv * d * 4
    assert k.reshape(1, m, hkv, d).data_ptr() == k.data_ptr()


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gathered,bias", [(True, True), (False, False)])
def test_gemv_embed_concat_matches_reference(m, dtype, gathered, bias):
    """EAGLE-1's fc on [embedding | feature]: the lookup, the row gather and the concatenation in
    the input tile. E = 40 is not a multiple of any column tile, so tiles straddle the seam."""
    e, f, n, vocab = 40, 56, 70, 300
    w = seeded_randn(n, e + f, seed=30, dtype=dtype, scale=0.1)
    b = seeded_randn(n, seed=31, dtype=dtype) if bias else None
    table = seeded_randn(vocab, e, seed=32, dtype=dtype)
    tokens = torch.randint(0, vocab, (m,), generator=torch.Generator().manual_seed(33)).to(DEVICE)
    feats = seeded_randn(2 * m + 3, f, seed=34, dtype=dtype)
    rows = torch.randperm(2 * m + 3, generator=torch.Generator().manual_seed(35))[:m].to(DEVICE) if gathered else None
    if rows is None:
        feats = feats[:m]
    want = G.gemv_embed_concat_ref(w, b, table, tokens, feats, rows)
    for tile in (small_tile(m), None):
        _assert_close(G.gemv_embed_concat(w, b, table, tokens, feats, rows, tile=tile), want)
    # each output row is its own token's and its own feature row's, whatever the others are
    i = m // 2
    one = G.gemv_embed_concat(w, b, table, tokens[i:i + 1], (feats if rows is None else feats[rows])[i:i + 1])
    _assert_close(one, want[i:i + 1])


def test_gemv_embed_concat_bad_inputs_name_the_problem():
    w = torch.zeros(8, 16, device=DEVICE)
    table, tokens = torch.zeros(10, 6, device=DEVICE), torch.zeros(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match=r"E \+ F = 16"):
        G.gemv_embed_concat(w, None, table, tokens, torch.zeros(2, 9, device=DEVICE))
    with pytest.raises(ValueError, match="without feature_rows, features needs 2 rows"):
        G.gemv_embed_concat(w, None, table, tokens, torch.zeros(3, 10, device=DEVICE))
    with pytest.raises(ValueError, match="feature_rows must be 2 contiguous int64"):
        G.gemv_embed_concat(w, None, table, tokens, torch.zeros(3, 10, device=DEVICE),
                            torch.zeros(2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        G.gemv_embed_concat(w, torch.zeros(9, device=DEVICE), table, tokens, torch.zeros(2, 10, device=DEVICE))
    with pytest.raises(ValueError, match="tokens must be 1 to 64"):
        G.gemv_embed_concat(w, None, table, torch.zeros(65, dtype=torch.int64, device=DEVICE),
                            torch.zeros(65, 10, device=DEVICE))


def test_gemv_bad_inputs_name_the_problem():
    w = torch.zeros(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"1 <= M <= 64"):
        G.gemv(w, torch.zeros(65, 16, device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        G.gemv(w, torch.zeros(1, 16, device=DEVICE, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="norm weight must have shape"):
        G.gemv(w, torch.zeros(1, 16, device=DEVICE), torch.ones(8, device=DEVICE))
    with pytest.raises(ValueError, match="residual"):
        G.gemv(w, torch.zeros(2, 16, device=DEVICE), residual=torch.zeros(2, 9, device=DEVICE))
    with pytest.raises(ValueError, match="does not hold 5 rows"):
        G.gemv(w, torch.zeros(5, 16, device=DEVICE), tile=G.GemvTile(block_n=16, block_k=16, block_m=4))
    with pytest.raises(ValueError, match="even row count"):
        G.gemv_silu_mul(torch.zeros(7, 16, device=DEVICE), torch.zeros(1, 16, device=DEVICE))
    cache = torch.zeros(2, 4, 2, 8, device=DEVICE)
    cos = torch.zeros(1, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"expected \(Hq \+ 2 Hkv\) \* D"):
        G.gemv_qkv_rope(torch.zeros(40, 16, device=DEVICE), torch.zeros(1, 16, device=DEVICE), None, 1e-5,
                        cos, cos, cache, cache.clone(), torch.tensor([0], device=DEVICE), 2, 2)
    with pytest.raises(ValueError, match="caches given without slots"):
        G.gemv_qkv_rope(torch.zeros(48, 16, device=DEVICE), torch.zeros(1, 16, device=DEVICE), None, 1e-5,
                        cos, cos, cache, cache.clone(), None, 2, 2)
    with pytest.raises(ValueError, match=r"slots must be 2 contiguous int64"):
        G.gemv_qkv_rope(torch.zeros(48, 16, device=DEVICE), torch.zeros(2, 16, device=DEVICE), None, 1e-5,
                        torch.zeros(2, 8, device=DEVICE), torch.zeros(2, 8, device=DEVICE), cache, cache.clone(),
                        torch.tensor([0], device=DEVICE), 2, 2)
