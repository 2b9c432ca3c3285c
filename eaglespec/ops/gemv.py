"""Single-token matrix-vector products with the neighbouring element-wise work folded in.

At batch 1 a decode step reads every weight once and does almost no arithmetic, so its time is
the weight bytes over HBM bandwidth plus whatever else runs between the products. Each RMSNorm,
RoPE, SwiGLU and residual add between two products is a launch of a few microseconds during
which HBM idles; here they ride along with the products instead:

  gemv            [RMSNorm prologue] x @ W.T [+ residual]     o_proj, down_proj, lm_head
  gemv_silu_mul   [RMSNorm prologue] silu(x @ Wg.T) * (x @ Wu.T) on the fused gate|up weight
  gemv_qkv_rope   RMSNorm prologue, x @ Wqkv.T, rotate-half RoPE of q and k, k/v stored in
                  the paged cache: returns the rotated q

A Llama layer then costs four products plus attention. The RMSNorm prologue scales by the
row's 1/rms after the dot product (exact algebra: it is one scalar per row), so a single pass
over x does both. Products whose output rows must meet in the epilogue (gate j with up j,
RoPE's dim i with dim i + D/2) are computed by the same program from two row tiles.

Each ``*_ref`` is the PyTorch reference, built from the same torch ops as the model's unfused
path; the kernels round where torch rounds (the product's output, RoPE's terms, silu) and
differ only in summation order and where the norm's scale is applied. CPU tensors run the
kernels under ``TRITON_INTERPRET=1``. The launchers read only shapes on the host, so they can
be captured in CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eaglespec.ops.fused import rms_norm_ref, rope_and_cache_write_ref, silu_mul_ref
from eaglespec.ops.triton_support import jit as _jit, tl, triton  # noqa: F401


@dataclass(frozen=True, slots=True)
class GemvTile:
    """One program's work: ``block_n`` output rows (per row tile), ``block_k`` inputs a step."""

    block_n: int = 8
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 3


# ----------------------------------------------------------------------------- references


def _normed(x: torch.Tensor, norm_weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return x if norm_weight is None else rms_norm_ref(x, norm_weight, eps)[0]


def gemv_ref(weight: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor | None = None,
             eps: float = 1e-6, residual: torch.Tensor | None = None,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """weight [N, K], x [1, K] -> [1, N]: RMSNorm(x) (when norm_weight is given) @ weight.T, plus
    residual [1, N]; the product rounds to x's dtype first, as ``F.linear`` does, then to out_dtype."""
    y = torch.nn.functional.linear(_normed(x, norm_weight, eps), weight)
    if residual is not None:
        y = y + residual
    return y.to(out_dtype or x.dtype)


def gemv_silu_mul_ref(weight: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor | None = None,
                      eps: float = 1e-6) -> torch.Tensor:
    """weight [2I, K] (gate rows then up rows), x [1, K] -> silu(gate) * up [1, I]."""
    return silu_mul_ref(torch.nn.functional.linear(_normed(x, norm_weight, eps), weight))


def gemv_qkv_rope_ref(weight: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
                      cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """weight [(Hq + 2 Hkv) D, K], x [1, K], cos/sin [1, D], caches [NB, BS, Hkv, D], slot [1]
    int64 -> rotated q [1, Hq, D]; the rotated k and v are stored at ``slot``."""
    d = weight.shape[0] // (num_heads + 2 * num_kv_heads)
    qkv = torch.nn.functional.linear(_normed(x, norm_weight, eps), weight)
    q, k, v = qkv.split((num_heads * d, num_kv_heads * d, num_kv_heads * d), dim=-1)
    q_rot, _ = rope_and_cache_write_ref(q.reshape(1, num_heads, d), k.reshape(1, num_kv_heads, d),
                                        v.reshape(1, num_kv_heads, d), cos, sin, k_cache, v_cache, slot)
    return q_rot


# ----------------------------------------------------------------------------- kernels


@_jit
def _input_chunk(x_ptr, norm_w_ptr, cols, col_ok, HAS_NORM: tl.constexpr):
    """x[cols] in fp32, times the norm weight when there is one, and x^2 for the norm's sum."""
    x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    sq = x * x
    if HAS_NORM:
        x = x * tl.load(norm_w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    return x, sq


@_jit
def _gemv_kernel(
    w_ptr, x_ptr, norm_w_ptr, res_ptr, y_ptr,
    N, K, eps,
    HAS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    sum_sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x, sq = _input_chunk(x_ptr, norm_w_ptr, cols, col_ok, HAS_NORM)
        sum_sq += sq
        w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_NORM:
        y = y * tl.rsqrt(tl.sum(sum_sq, axis=0) / K + eps)
    # The product rounds to the activation dtype before the residual add, as in torch.
    y = y.to(x_ptr.dtype.element_ty).to(tl.float32)
    if HAS_RESIDUAL:
        y = (y + tl.load(res_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)).to(x_ptr.dtype.element_ty)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


@_jit
def _gemv_pair_kernel(
    w_ptr, x_ptr, norm_w_ptr, y_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    K, eps, num_heads, num_kv_heads,
    HALF: tl.constexpr,  # rows paired: r and r + HALF, inside groups of 2 * HALF rows
    EPILOGUE: tl.constexpr,  # 1: silu(first) * second; 2: RoPE, q out, k/v to the cache
    HAS_NORM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tiles_per_half = tl.cdiv(HALF, BLOCK_N)
    group = tl.program_id(0) // tiles_per_half
    offs = (tl.program_id(0) % tiles_per_half) * BLOCK_N + tl.arange(0, BLOCK_N)  # within the half
    row_ok = offs < HALF
    rows_a = (group * 2 * HALF + offs).to(tl.int64)
    wa = w_ptr + rows_a[:, None] * K
    wb = wa + HALF * K
    acc_a = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    sum_sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x, sq = _input_chunk(x_ptr, norm_w_ptr, cols, col_ok, HAS_NORM)
        sum_sq += sq
        mask = row_ok[:, None] & col_ok[None, :]
        acc_a += tl.load(wa + cols[None, :], mask=mask, other=0.0).to(tl.float32) * x[None, :]
        acc_b += tl.load(wb + cols[None, :], mask=mask, other=0.0).to(tl.float32) * x[None, :]
    scale = 1.0
    if HAS_NORM:
        scale = tl.rsqrt(tl.sum(sum_sq, axis=0) / K + eps)
    dt = x_ptr.dtype.element_ty
    a = (tl.sum(acc_a, axis=1) * scale).to(dt).to(tl.float32)  # rounded like the product's output
    b = (tl.sum(acc_b, axis=1) * scale).to(dt).to(tl.float32)
    if EPILOGUE == 1:
        silu = (a / (1.0 + tl.exp(-a))).to(dt).to(tl.float32)
        tl.store(y_ptr + offs, (silu * b).to(y_ptr.dtype.element_ty), mask=row_ok)
    if EPILOGUE == 2:
        head_dim = 2 * HALF
        kv_row = tl.load(slot_ptr).to(tl.int64) * num_kv_heads * head_dim  # this token's cache row
        if group < num_heads + num_kv_heads:
            c = tl.load(cos_ptr + offs, mask=row_ok, other=0.0).to(dt).to(tl.float32)
            s = tl.load(sin_ptr + offs, mask=row_ok, other=0.0).to(dt).to(tl.float32)
            # Each product and the sum round to the model dtype, as x * cos + rotate_half(x) * sin.
            out_a = ((a * c).to(dt).to(tl.float32) - (b * s).to(dt).to(tl.float32)).to(dt)
            out_b = ((b * c).to(dt).to(tl.float32) + (a * s).to(dt).to(tl.float32)).to(dt)
            if group < num_heads:
                q_out = y_ptr + group * head_dim + offs
                tl.store(q_out, out_a, mask=row_ok)
                tl.store(q_out + HALF, out_b, mask=row_ok)
            else:
                k_out = k_cache_ptr + kv_row + (group - num_heads) * head_dim + offs
                tl.store(k_out, out_a.to(k_cache_ptr.dtype.element_ty), mask=row_ok)
                tl.store(k_out + HALF, out_b.to(k_cache_ptr.dtype.element_ty), mask=row_ok)
        else:
            v_out = v_cache_ptr + kv_row + (group - num_heads - num_kv_heads) * head_dim + offs
            tl.store(v_out, a.to(v_cache_ptr.dtype.element_ty), mask=row_ok)
            tl.store(v_out + HALF, b.to(v_cache_ptr.dtype.element_ty), mask=row_ok)


# ----------------------------------------------------------------------------- launchers


def require(cond: bool, msg: str) -> None:
    """Raise ValueError(msg) unless cond: the launchers' input checks."""
    if not cond:
        raise ValueError(msg)


def _check_operands(name: str, weight: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor | None) -> None:
    """Weight, input row and norm weight of a fused product: shapes, dtypes, device, layout."""
    if triton is None:
        raise RuntimeError("triton is not installed: use the *_ref functions instead")
    require(weight.dim() == 2 and weight.is_contiguous(), f"{name}: weight must be a contiguous [N, K] matrix, "
                                                          f"got shape {tuple(weight.shape)}")
    k = weight.shape[1]
    require(x.dim() == 2 and x.shape[1] == k and x.stride(1) == 1,
            f"{name}: input must be [T, {k}] rows with unit column stride, got shape {tuple(x.shape)}")
    require(x.dtype == weight.dtype, f"{name}: input dtype {x.dtype} differs from weight dtype {weight.dtype}")
    require(x.device == weight.device, f"{name}: input on {x.device}, weight on {weight.device}")
    if norm_weight is not None:
        require(norm_weight.shape == (k,) and norm_weight.is_contiguous(),
                f"{name}: norm weight must have shape ({k},), got {tuple(norm_weight.shape)}")
    require(x.shape[0] == 1 and x.is_contiguous(),
            f"{name}: input must be one contiguous row of {weight.shape[1]} features, got shape {tuple(x.shape)}")


def _block_k(k: int, cap: int) -> int:
    return min(cap, triton.next_power_of_2(k))


# Tiles from the H100 sweep of benchmarks/bench_gemv.py on the Llama-3.1-8B shapes (results in
# benchmarks/results/gemv-*.json): long column steps for the plain product, two warps while
# the output is narrow (many small programs keep more loads in flight), four for the vocabulary.
def plain_tile(n: int, k: int) -> GemvTile:
    return GemvTile(block_n=8, block_k=_block_k(k, 1024), num_warps=2 if n <= 16384 else 4, num_stages=3)


def silu_mul_tile(k: int) -> GemvTile:
    return GemvTile(block_n=16, block_k=_block_k(k, 512), num_warps=4, num_stages=3)


def qkv_rope_tile(head_dim: int, k: int) -> GemvTile:
    return GemvTile(block_n=min(8, triton.next_power_of_2(head_dim // 2)), block_k=_block_k(k, 512),
                    num_warps=8, num_stages=2)


def gemv(weight: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
         residual: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
         tile: GemvTile | None = None) -> torch.Tensor:
    """Triton version of ``gemv_ref`` (same arguments and result)."""
    _check_operands("gemv", weight, x, norm_weight)
    n, k = weight.shape
    if residual is not None:
        require(residual.shape == (1, n) and residual.is_contiguous() and residual.dtype == x.dtype,
                f"gemv: residual must be one contiguous row of {n} in {x.dtype}, got {tuple(residual.shape)} "
                f"{residual.dtype}")
    tile = tile or plain_tile(n, k)
    y = torch.empty(1, n, dtype=out_dtype or x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, tile.block_n),)](
        weight, x, x if norm_weight is None else norm_weight, y if residual is None else residual, y,
        n, k, float(eps), HAS_NORM=norm_weight is not None, HAS_RESIDUAL=residual is not None,
        BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, num_warps=tile.num_warps, num_stages=tile.num_stages)
    return y


def gemv_silu_mul(weight: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor | None = None,
                  eps: float = 1e-6, tile: GemvTile | None = None) -> torch.Tensor:
    """Triton version of ``gemv_silu_mul_ref`` (same arguments and result)."""
    _check_operands("gemv_silu_mul", weight, x, norm_weight)
    two_i, k = weight.shape
    require(two_i % 2 == 0, f"gemv_silu_mul: the gate|up weight needs an even row count, got {two_i}")
    inter = two_i // 2
    tile = tile or silu_mul_tile(k)
    y = torch.empty(1, inter, dtype=x.dtype, device=x.device)
    _gemv_pair_kernel[(triton.cdiv(inter, tile.block_n),)](
        weight, x, x if norm_weight is None else norm_weight, y, x, x, y, y, x,
        k, float(eps), 0, 0, HALF=inter, EPILOGUE=1, HAS_NORM=norm_weight is not None,
        BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, num_warps=tile.num_warps, num_stages=tile.num_stages)
    return y


def gemv_qkv_rope(weight: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
                  cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot: torch.Tensor, num_heads: int, num_kv_heads: int,
                  tile: GemvTile | None = None) -> torch.Tensor:
    """Triton version of ``gemv_qkv_rope_ref`` (same arguments and result). The slot is read on
    the device, not bounds-checked (that would read it on the host)."""
    _check_operands("gemv_qkv_rope", weight, x, norm_weight)
    require(k_cache.dim() == 4 and k_cache.is_contiguous() and v_cache.shape == k_cache.shape
            and v_cache.is_contiguous(), "gemv_qkv_rope: caches must be contiguous [NB, BS, Hkv, D] twins")
    d = k_cache.shape[-1]
    require(k_cache.shape[2] == num_kv_heads, f"gemv_qkv_rope: cache has {k_cache.shape[2]} KV heads, "
                                              f"expected {num_kv_heads}")
    require(weight.shape[0] == (num_heads + 2 * num_kv_heads) * d and d % 2 == 0,
            f"gemv_qkv_rope: weight has {weight.shape[0]} rows, expected (Hq + 2 Hkv) * D = "
            f"{(num_heads + 2 * num_kv_heads) * d} with an even head_dim")
    for name, table in (("cos", cos), ("sin", sin)):
        require(table.shape == (1, d) and table.is_contiguous() and table.dtype == x.dtype,
                f"gemv_qkv_rope: {name} must be a contiguous (1, {d}) table in {x.dtype}, got "
                f"{tuple(table.shape)} {table.dtype}")
    require(slot.shape == (1,) and slot.dtype == torch.int64, f"gemv_qkv_rope: slot must be one int64, "
                                                              f"got {tuple(slot.shape)} {slot.dtype}")
    half = d // 2
    tile = tile or qkv_rope_tile(d, weight.shape[1])
    q = torch.empty(1, num_heads, d, dtype=x.dtype, device=x.device)
    groups = num_heads + 2 * num_kv_heads
    _gemv_pair_kernel[(groups * triton.cdiv(half, tile.block_n),)](
        weight, x, x if norm_weight is None else norm_weight, q, cos, sin, k_cache, v_cache, slot,
        weight.shape[1], float(eps), num_heads, num_kv_heads, HALF=half, EPILOGUE=2,
        HAS_NORM=norm_weight is not None, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        num_warps=tile.num_warps, num_stages=tile.num_stages)
    return q
