"""Fused element-wise Triton kernels vs their PyTorch references (CPU: TRITON_INTERPRET=1).

fp32 must agree to a few ulps (only the reduction order and the exp/cos/sin/rsqrt
implementations differ). bf16 is checked within bf16 rounding: the interpreter casts fp32 -> bf16 by truncation,
so the bit-for-bit agreement the kernels reach on a GPU (they round where torch rounds) is only
asserted on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import DEVICE, needs_triton_kernels, seeded_randn

from eaglespec.ops import fused as Fu

pytestmark = needs_triton_kernels

DTYPES = [torch.float32, torch.bfloat16]


def _assert_matches(got: torch.Tensor, want: torch.Tensor, atol_bf16: float = 3e-2) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        return
    # Within a couple of bf16 ulps: the kernels round where torch rounds, but on the GPU the
    # compiler may contract a product and a sum into one fused multiply-add.
    torch.testing.assert_close(got.float(), want.float(), atol=atol_bf16, rtol=2 ** -6)


def _inv_freq(d: int) -> torch.Tensor:
    return (1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))).float().to(DEVICE)


# ----------------------------------------------------------------------------- rms_norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,h", [(1, 64), (7, 576), (3, 4096)])
def test_rms_norm_matches_reference(dtype, t, h):
    x = seeded_randn(t, h, seed=1, dtype=dtype, scale=3.0)
    w = 1.0 + 0.2 * seeded_randn(h, seed=2, dtype=dtype)
    out, res = Fu.rms_norm(x, w, 1e-5)
    want, _ = Fu.rms_norm_ref(x, w, 1e-5)
    assert res is None
    _assert_matches(out, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_residual_on_strided_rows(dtype):
    t, h = 5, 576
    wide = seeded_randn(t, 2 * h, seed=3, dtype=dtype)
    x = wide[:, 100:100 + h]  # rows strided by 2h, as a slice of a wider output
    residual = seeded_randn(t, h, seed=4, dtype=dtype, scale=2.0)
    w = 1.0 + 0.2 * seeded_randn(h, seed=5, dtype=dtype)
    out, new_res = Fu.rms_norm(x, w, 1e-6, residual)
    want, want_res = Fu.rms_norm_ref(x, w, 1e-6, residual)
    if dtype == torch.float32:
        assert torch.equal(new_res, want_res)  # one fp32 add: exact
    _assert_matches(new_res, want_res)
    _assert_matches(out, want)
    # The norm is of the sum, not of x alone.
    alone, _ = Fu.rms_norm_ref(x, w, 1e-6)
    assert (out.float() - alone.float()).abs().max() > 0.1


def test_rms_norm_many_rows_small_hidden():
    """Several rows per program: the row mask and per-row statistics must stay apart."""
    x = seeded_randn(37, 64, seed=6)
    x[5] *= 100.0
    w = seeded_randn(64, seed=7)
    out, _ = Fu.rms_norm(x, w, 1e-5)
    _assert_matches(out, Fu.rms_norm_ref(x, w, 1e-5)[0])


def test_rms_norm_rejects_bad_input():
    x = seeded_randn(2, 64, seed=8)
    with pytest.raises(ValueError, match="weight has 32 entries"):
        Fu.rms_norm(x, seeded_randn(32, seed=9), 1e-5)
    with pytest.raises(ValueError, match="weight dtype"):
        Fu.rms_norm(x, seeded_randn(64, seed=9, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(ValueError, match="residual shape"):
        Fu.rms_norm(x, seeded_randn(64, seed=9), 1e-5, residual=seeded_randn(3, 64, seed=10))
    with pytest.raises(ValueError, match="unit stride"):
        Fu.rms_norm(seeded_randn(64, 2, seed=11).t(), seeded_randn(64, seed=9), 1e-5)
    with pytest.raises(ValueError, match="2 dims"):
        Fu.rms_norm(seeded_randn(2, 2, 64, seed=12), seeded_randn(64, seed=9), 1e-5)


# ----------------------------------------------------------------------------- RoPE + cache


def _qkv_views(t: int, hq: int, hkv: int, d: int, dtype, seed: int):
    """q/k/v as strided views into one fused projection output [T, (Hq + 2 Hkv) D]."""
    qkv = seeded_randn(t, (hq + 2 * hkv) * d, seed=seed, dtype=dtype, scale=2.0)
    q, k, v = qkv.split((hq * d, hkv * d, hkv * d), dim=-1)
    return q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d)


def _cos_sin(positions, inv_freq, dtype):
    from eaglespec.models.llama import rope_cos_sin

    return rope_cos_sin(positions, inv_freq, dtype)


def _nan_cache(num_blocks: int, block_size: int, hkv: int, d: int, dtype):
    k = torch.full((num_blocks, block_size, hkv, d), float("nan"), dtype=dtype, device=DEVICE)
    return k, k.clone()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 64), (9, 3, 128)])
def test_rope_and_cache_write_matches_reference(dtype, hq, hkv, d):
    t, nb, bs = 6, 5, 16
    q, k, v = _qkv_views(t, hq, hkv, d, dtype, seed=20)
    positions = torch.tensor([0, 1, 17, 300, 4095, 8191], device=DEVICE)
    slots = torch.tensor([16, 79, 3, 40, 41, 64], device=DEVICE)
    inv = _inv_freq(d)
    k_cache, v_cache = _nan_cache(nb, bs, hkv, d, dtype)
    k_ref, v_ref = _nan_cache(nb, bs, hkv, d, dtype)
    q_rot, k_rot = Fu.rope_and_cache_write(q, k, v, *_cos_sin(positions, inv, q.dtype), k_cache, v_cache, slots)
    q_want, k_want = Fu.rope_and_cache_write_ref(q, k, v, *_cos_sin(positions, inv, q.dtype), k_ref, v_ref, slots)
    assert q_rot.is_contiguous() and k_rot.is_contiguous()
    _assert_matches(q_rot, q_want)
    _assert_matches(k_rot, k_want)
    # Exactly the written slots changed; v is copied, k is the rotated k.
    written = torch.zeros(nb * bs, dtype=torch.bool)
    written[slots.cpu()] = True
    flat_k, flat_v = k_cache.view(-1, hkv, d).cpu(), v_cache.view(-1, hkv, d).cpu()
    assert flat_k[~written].isnan().all() and flat_v[~written].isnan().all()
    assert torch.equal(flat_v[slots.cpu()], v.cpu())
    assert torch.equal(flat_k[slots.cpu()], k_rot.cpu())
    _assert_matches(k_cache.view(-1, hkv, d)[slots], k_ref.view(-1, hkv, d)[slots])


def test_rope_only_leaves_nothing_written_and_position_zero_is_identity():
    q, k, v = _qkv_views(3, 4, 2, 64, torch.float32, seed=21)
    positions = torch.tensor([0, 5, 1000], device=DEVICE)
    inv = _inv_freq(64)
    q_rot, k_rot = Fu.rope_and_cache_write(q, k, v, *_cos_sin(positions, inv, q.dtype))
    q_want, k_want = Fu.rope_and_cache_write_ref(q, k, v, *_cos_sin(positions, inv, q.dtype))
    _assert_matches(q_rot, q_want)
    _assert_matches(k_rot, k_want)
    assert torch.equal(q_rot[0], q[0]) and torch.equal(k_rot[0], k[0])
    assert not torch.allclose(q_rot[2], q[2])


def test_rope_and_cache_write_rejects_bad_input():
    q, k, v = _qkv_views(2, 4, 2, 64, torch.float32, seed=22)
    pos = torch.tensor([0, 1], device=DEVICE)
    inv = _inv_freq(64)
    k_cache, v_cache = _nan_cache(2, 16, 2, 64, torch.float32)
    slots = torch.tensor([0, 1], device=DEVICE)
    with pytest.raises(ValueError, match=r"cos has shape \(2, 32\), expected \(2, 64\)"):
        Fu.rope_and_cache_write(q, k, v, *_cos_sin(pos, _inv_freq(32), q.dtype))
    with pytest.raises(ValueError, match=r"cos has shape \(3, 64\), expected \(2, 64\)"):
        Fu.rope_and_cache_write(q, k, v, *_cos_sin(torch.arange(3, device=DEVICE), inv, q.dtype))
    with pytest.raises(ValueError, match="slots given but"):
        Fu.rope_and_cache_write(q, k, v, *_cos_sin(pos, inv, q.dtype), slots=slots)
    with pytest.raises(ValueError, match="without slots"):
        Fu.rope_and_cache_write(q, k, v, *_cos_sin(pos, inv, q.dtype), k_cache, v_cache)
    with pytest.raises(ValueError, match="slots dtype"):
        Fu.rope_and_cache_write(q, k, v, *_cos_sin(pos, inv, q.dtype), k_cache, v_cache, slots.int())
    with pytest.raises(ValueError, match="does not match k heads"):
        bad_k, bad_v = _nan_cache(2, 16, 4, 64, torch.float32)
        Fu.rope_and_cache_write(q, k, v, *_cos_sin(pos, inv, q.dtype), bad_k, bad_v, slots)
    with pytest.raises(ValueError, match="k dtype"):
        Fu.rope_and_cache_write(q, k.bfloat16(), v, *_cos_sin(pos, inv, q.dtype))
    with pytest.raises(ValueError, match="v shape"):
        Fu.rope_and_cache_write(q, k, v[:, :1], *_cos_sin(pos, inv, q.dtype))


# ----------------------------------------------------------------------------- silu * up


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,inter", [(1, 112), (3, 1536)])
def test_silu_mul_matches_reference(dtype, t, inter):
    gate_up = seeded_randn(t, 2 * inter, seed=30, dtype=dtype, scale=4.0)
    out = Fu.silu_mul(gate_up)
    _assert_matches(out, Fu.silu_mul_ref(gate_up), atol_bf16=6e-2)


def test_silu_mul_strided_rows_and_errors():
    wide = seeded_randn(4, 300, seed=31)
    gate_up = wide[:, :224]
    _assert_matches(Fu.silu_mul(gate_up), Fu.silu_mul_ref(gate_up))
    with pytest.raises(ValueError, match="even last dim"):
        Fu.silu_mul(wide[:, :223])
    with pytest.raises(ValueError, match="dtype"):
        Fu.silu_mul(wide.to(torch.int32))


def test_empty_batches():
    x = seeded_randn(0, 64, seed=32)
    assert Fu.rms_norm(x, seeded_randn(64, seed=33), 1e-5)[0].shape == (0, 64)
    assert Fu.silu_mul(seeded_randn(0, 64, seed=34)).shape == (0, 32)
    q, k, v = _qkv_views(0, 4, 2, 64, torch.float32, seed=35)
    q_rot, k_rot = Fu.rope_and_cache_write(q, k, v, *_cos_sin(torch.zeros(0, dtype=torch.int64, device=DEVICE), _inv_freq(64), q.dtype))
    assert q_rot.shape == (0, 4, 64) and k_rot.shape == (0, 2, 64)
