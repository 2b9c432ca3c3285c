"""Products of a few token rows (small-batch decode, tree verification, drafting) with the
neighbouring element-wise work folded in, as ``ops/gemv.py`` does for a single token.

A step of a few dozen tokens reads every weight once, like a decode step, and on a small model
its time is mostly launches: a Llama layer on cuBLAS plus separate kernels is about thirteen of
them. These kernels make it four products plus attention:

  linear           [RMSNorm prologue] x @ W.T [+ residual]          o_proj, down_proj
  silu_mul_linear  [RMSNorm prologue] silu(x @ Wg.T) * (x @ Wu.T)   the fused gate|up weight
  qkv_rope_linear  [RMSNorm prologue] x @ Wqkv.T, rotate-half RoPE of q and k per row, and
                   the K/V stored at cache slots when given; returns q, k, v

Every program covers all rows of its M tile (up to 64 rows), so each weight tile is read once
per M tile; tl.dot does the products (fp32 accumulation, exact fp32 products for fp32 inputs).
The RMSNorm is applied as in ``ops/gemv.py``: x * norm_weight enters the product, the row's
1/rms scales the result. Pairs of output columns that meet in the epilogue (gate j and up j,
RoPE dims i and i + D/2) come from two weight tiles of the same program.

The engine uses them when ``EngineConfig.fused_rows`` > 1, which is opt-in: on the H100 they win
slightly per product, show no end-to-end gain on SmolLM2 and are much slower in fp32 (exact fp32
tl.dot has no tensor cores); see docs/DESIGN_NOTES.md, item 13.

Each ``*_ref`` is the PyTorch reference (the model's unfused ops); the kernels round where torch
rounds and differ in summation order and where the norm's scale is applied. CPU tensors run the
kernels under ``TRITON_INTERPRET=1``; the launchers read only shapes on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eaglespec.ops.triton_support import jit as _jit, mma_options, tl, triton  # noqa: F401

MAX_ROWS = 64  # rows one M tile covers; longer inputs take several tiles (and re-read weights)
SHARED_MEMORY_BYTES = 232448  # per block on Hopper: the pipeline stages of a tile must fit


@dataclass(frozen=True, slots=True)
class LinearTile:
    """Output columns per program (per weight tile), inputs per loop step, launch options."""

    block_n: int = 32
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3


# ----------------------------------------------------------------------------- references


def _normed(x: torch.Tensor, norm_weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    from eaglespec.ops.fused import rms_norm_ref

    return x if norm_weight is None else rms_norm_ref(x, norm_weight, eps)[0]


def linear_ref(weight: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor | None = None,
               eps: float = 1e-6, residual: torch.Tensor | None = None,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """weight [N, K], x [T, K] -> [T, N]: RMSNorm(x) (when norm_weight is given) @ weight.T, plus
    residual [T, N]; the product rounds to x's dtype first, as ``F.linear`` does, then to out_dtype."""
    y = torch.nn.functional.linear(_normed(x, norm_weight, eps), weight)
    if residual is not None:
        y = y + residual
    return y.to(out_dtype or x.dtype)


def silu_mul_linear_ref(weight: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor | None = None,
                        eps: float = 1e-6) -> torch.Tensor:
    """weight [2I, K] (gate rows then up rows), x [T, K] -> silu(gate) * up [T, I]."""
    from eaglespec.ops.fused import silu_mul_ref

    return silu_mul_ref(torch.nn.functional.linear(_normed(x, norm_weight, eps), weight))


def qkv_rope_linear_ref(weight: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
                        cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
                        k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
                        slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [(Hq + 2 Hkv) D, K], x [T, K], cos/sin [T, D] -> q, k (rotated) [T, H, D] and v; with
    slots [T] int64 the rotated k and v are also stored in the [NB, BS, Hkv, D] caches."""
    from eaglespec.ops.fused import rope_and_cache_write_ref

    t = x.shape[0]
    d = weight.shape[0] // (num_heads + 2 * num_kv_heads)
    qkv = torch.nn.functional.linear(_normed(x, norm_weight, eps), weight)
    q, k, v = qkv.split((num_heads * d, num_kv_heads * d, num_kv_heads * d), dim=-1)
    v = v.reshape(t, num_kv_heads, d)
    q_rot, k_rot = rope_and_cache_write_ref(q.reshape(t, num_heads, d), k.reshape(t, num_kv_heads, d), v,
                                            cos, sin, k_cache, v_cache, slots)
    return q_rot, k_rot, v


# ----------------------------------------------------------------------------- kernels


@_jit
def _rows_chunk(x_ptr, stride_x, norm_w_ptr, rows, row_ok, cols, col_ok, HAS_NORM: tl.constexpr):
    """x[rows, cols] in fp32 (times the norm weight when there is one) and the rows' sum of x^2."""
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                other=0.0).to(tl.float32)
    sq = tl.sum(x * x, axis=1)
    if HAS_NORM:
        x = x * tl.load(norm_w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return x, sq


@_jit
def _linear_kernel(
    x_ptr, w_ptr, norm_w_ptr, res_ptr, y_ptr,
    M, N, K, eps, stride_x, stride_res, stride_y,
    HAS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    cols_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    n_ok, m_ok = cols_n < N, rows < M
    w_rows = w_ptr + cols_n.to(tl.int64)[:, None] * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        k_ok = cols < K
        x, sq = _rows_chunk(x_ptr, stride_x, norm_w_ptr, rows, m_ok, cols, k_ok, HAS_NORM)
        sum_sq += sq
        w = tl.load(w_rows + cols[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(x.to(MMA_DTYPE), tl.trans(w.to(MMA_DTYPE)), input_precision=DOT_PRECISION)
    if HAS_NORM:
        acc = acc * tl.rsqrt(sum_sq / K + eps)[:, None]
    dt = x_ptr.dtype.element_ty
    y = acc.to(dt).to(tl.float32)  # the product rounds before the residual add, as in torch
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + rows[:, None] * stride_res + cols_n[None, :], mask=mask, other=0.0)
        y = (y + res.to(tl.float32)).to(dt).to(tl.float32)
    tl.store(y_ptr + rows[:, None] * stride_y + cols_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@_jit
def _linear_pair_kernel(
    x_ptr, w_ptr, norm_w_ptr, y_ptr, k_out_ptr, v_out_ptr, cos_ptr, sin_ptr,
    k_cache_ptr, v_cache_ptr, slots_ptr,
    M, K, eps, stride_x, stride_y, num_heads, num_kv_heads,
    HALF: tl.constexpr,  # columns paired: c and c + HALF, inside groups of 2 * HALF columns
    EPILOGUE: tl.constexpr,  # 1: silu(first) * second; 2: RoPE, q / k / v out (+ cache store)
    HAS_NORM: tl.constexpr, WRITE_CACHE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tiles_per_half = tl.cdiv(HALF, BLOCK_N)
    group = tl.program_id(0) // tiles_per_half
    offs = (tl.program_id(0) % tiles_per_half) * BLOCK_N + tl.arange(0, BLOCK_N)  # within the half
    rows = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    n_ok, m_ok = offs < HALF, rows < M
    wa = w_ptr + (group * 2 * HALF + offs).to(tl.int64)[:, None] * K
    wb = wa + HALF * K
    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        k_ok = cols < K
        x, sq = _rows_chunk(x_ptr, stride_x, norm_w_ptr, rows, m_ok, cols, k_ok, HAS_NORM)
        sum_sq += sq
        x = x.to(MMA_DTYPE)
        w_mask = n_ok[:, None] & k_ok[None, :]
        acc_a += tl.dot(x, tl.trans(tl.load(wa + cols[None, :], mask=w_mask, other=0.0).to(MMA_DTYPE)),
                        input_precision=DOT_PRECISION)
        acc_b += tl.dot(x, tl.trans(tl.load(wb + cols[None, :], mask=w_mask, other=0.0).to(MMA_DTYPE)),
                        input_precision=DOT_PRECISION)
    if HAS_NORM:
        scale = tl.rsqrt(sum_sq / K + eps)[:, None]
        acc_a = acc_a * scale
        acc_b = acc_b * scale
    dt = x_ptr.dtype.element_ty
    a = acc_a.to(dt).to(tl.float32)  # rounded like the product's output
    b = acc_b.to(dt).to(tl.float32)
    mask = m_ok[:, None] & n_ok[None, :]
    if EPILOGUE == 1:
        silu = (a / (1.0 + tl.exp(-a))).to(dt).to(tl.float32)
        tl.store(y_ptr + rows[:, None] * stride_y + offs[None, :], (silu * b).to(y_ptr.dtype.element_ty), mask=mask)
    if EPILOGUE == 2:
        head_dim = 2 * HALF
        if group < num_heads + num_kv_heads:
            c = tl.load(cos_ptr + rows[:, None] * head_dim + offs[None, :], mask=mask, other=0.0).to(dt).to(tl.float32)
            s = tl.load(sin_ptr + rows[:, None] * head_dim + offs[None, :], mask=mask, other=0.0).to(dt).to(tl.float32)
            # Each product and the sum round to the model dtype, as x * cos + rotate_half(x) * sin.
            out_a = ((a * c).to(dt).to(tl.float32) - (b * s).to(dt).to(tl.float32)).to(dt)
            out_b = ((b * c).to(dt).to(tl.float32) + (a * s).to(dt).to(tl.float32)).to(dt)
            if group < num_heads:
                q_out = y_ptr + rows[:, None] * (num_heads * head_dim) + group * head_dim + offs[None, :]
                tl.store(q_out, out_a, mask=mask)
                tl.store(q_out + HALF, out_b, mask=mask)
            else:
                head = group - num_heads
                k_out = k_out_ptr + rows[:, None] * (num_kv_heads * head_dim) + head * head_dim + offs[None, :]
                tl.store(k_out, out_a, mask=mask)
                tl.store(k_out + HALF, out_b, mask=mask)
                if WRITE_CACHE:
                    slot = tl.load(slots_ptr + rows, mask=m_ok, other=0)
                    dst = k_cache_ptr + slot[:, None] * (num_kv_heads * head_dim) + head * head_dim + offs[None, :]
                    tl.store(dst, out_a.to(k_cache_ptr.dtype.element_ty), mask=mask)
                    tl.store(dst + HALF, out_b.to(k_cache_ptr.dtype.element_ty), mask=mask)
        else:
            head = group - num_heads - num_kv_heads
            v_out = v_out_ptr + rows[:, None] * (num_kv_heads * head_dim) + head * head_dim + offs[None, :]
            tl.store(v_out, a.to(dt), mask=mask)
            tl.store(v_out + HALF, b.to(dt), mask=mask)
            if WRITE_CACHE:
                slot = tl.load(slots_ptr + rows, mask=m_ok, other=0)
                dst = v_cache_ptr + slot[:, None] * (num_kv_heads * head_dim) + head * head_dim + offs[None, :]
                tl.store(dst, a.to(v_cache_ptr.dtype.element_ty), mask=mask)
                tl.store(dst + HALF, b.to(v_cache_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def require(cond: bool, msg: str) -> None:
    """Raise ValueError(msg) unless cond: the launchers' input checks."""
    if not cond:
        raise ValueError(msg)


def check_operands(name: str, weight: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor | None) -> None:
    """Weight, input rows and norm weight of a fused product: shapes, dtypes, device, layout."""
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


# Tiles from the H100 sweep of benchmarks/bench_fused_linear.py (8B shapes at 2-16 rows, SmolLM2
# shapes at 4-33 rows; results in benchmarks/results/fused-linear-*.json): long column steps for
# wide inputs, wide tiles for the wide gate|up output.
def linear_tile(k: int) -> LinearTile:
    return LinearTile(block_n=32, block_k=256 if k >= 1024 else 128, num_warps=4, num_stages=4)


def silu_mul_tile(inter: int, k: int) -> LinearTile:
    return LinearTile(block_n=64 if inter >= 8192 else 32, block_k=128 if k >= 2048 else 64, num_warps=4,
                      num_stages=3)


def qkv_rope_tile(head_dim: int, k: int) -> LinearTile:
    half = triton.next_power_of_2(head_dim // 2)
    return LinearTile(block_n=max(16, min(32, half)), block_k=256 if k >= 2048 else 64, num_warps=4,
                      num_stages=4)  # tl.dot needs block_n >= 16


def _block_m(rows: int) -> int:
    return min(MAX_ROWS, max(16, triton.next_power_of_2(max(rows, 1))))


def _launch_options(x: torch.Tensor, tile: LinearTile, kernel, weight_tiles: int) -> dict:
    """Block sizes and stages for ``x``'s rows; fewer stages, then shorter column steps, until
    the pipelined tiles fit in shared memory (fp32 operands take twice the room of bf16)."""
    block_m = _block_m(x.shape[0])
    block_k = min(tile.block_k, max(16, triton.next_power_of_2(x.shape[1])))
    stages = tile.num_stages

    def stage_bytes() -> int:
        return (block_m + weight_tiles * tile.block_n) * block_k * x.element_size()

    while stage_bytes() * stages > SHARED_MEMORY_BYTES and (stages > 2 or block_k > 32):
        if stages > 2:
            stages -= 1
        else:
            block_k //= 2
    return dict(BLOCK_M=block_m, BLOCK_N=tile.block_n, BLOCK_K=block_k, num_warps=tile.num_warps,
                num_stages=stages, **mma_options(x.dtype, kernel))


def linear(weight: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
           residual: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
           tile: LinearTile | None = None) -> torch.Tensor:
    """Triton version of ``linear_ref`` (same arguments and result)."""
    check_operands("linear", weight, x, norm_weight)
    n, k = weight.shape
    t = x.shape[0]
    if residual is not None:
        require(residual.shape == (t, n) and residual.stride(1) == 1 and residual.dtype == x.dtype,
                f"linear: residual must be [{t}, {n}] in {x.dtype}, got {tuple(residual.shape)} {residual.dtype}")
    tile = tile or linear_tile(k)
    y = torch.empty(t, n, dtype=out_dtype or x.dtype, device=x.device)
    if t == 0:
        return y
    opts = _launch_options(x, tile, _linear_kernel, weight_tiles=1)
    res = y if residual is None else residual
    _linear_kernel[(triton.cdiv(n, tile.block_n), triton.cdiv(t, opts["BLOCK_M"]))](
        x, weight, x if norm_weight is None else norm_weight, res, y,
        t, n, k, float(eps), x.stride(0), res.stride(0), y.stride(0),
        HAS_NORM=norm_weight is not None, HAS_RESIDUAL=residual is not None, **opts)
    return y


def silu_mul_linear(weight: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor | None = None,
                    eps: float = 1e-6, tile: LinearTile | None = None) -> torch.Tensor:
    """Triton version of ``silu_mul_linear_ref`` (same arguments and result)."""
    check_operands("silu_mul_linear", weight, x, norm_weight)
    two_i, k = weight.shape
    require(two_i % 2 == 0, f"silu_mul_linear: the gate|up weight needs an even row count, got {two_i}")
    inter, t = two_i // 2, x.shape[0]
    tile = tile or silu_mul_tile(inter, k)
    y = torch.empty(t, inter, dtype=x.dtype, device=x.device)
    if t == 0:
        return y
    opts = _launch_options(x, tile, _linear_pair_kernel, weight_tiles=2)
    _linear_pair_kernel[(triton.cdiv(inter, tile.block_n), triton.cdiv(t, opts["BLOCK_M"]))](
        x, weight, x if norm_weight is None else norm_weight, y, y, y, x, x, y, y, x,
        t, k, float(eps), x.stride(0), y.stride(0), 0, 0,
        HALF=inter, EPILOGUE=1, HAS_NORM=norm_weight is not None, WRITE_CACHE=False, **opts)
    return y


def qkv_rope_linear(weight: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
                    cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
                    k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
                    slots: torch.Tensor | None = None,
                    tile: LinearTile | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of ``qkv_rope_linear_ref`` (same arguments and result). Slots are read on
    the device, not bounds-checked (that would read them on the host)."""
    check_operands("qkv_rope_linear", weight, x, norm_weight)
    t = x.shape[0]
    groups = num_heads + 2 * num_kv_heads
    require(weight.shape[0] % groups == 0 and (weight.shape[0] // groups) % 2 == 0,
            f"qkv_rope_linear: weight has {weight.shape[0]} rows, not (Hq + 2 Hkv) = {groups} heads "
            f"of an even head_dim")
    d = weight.shape[0] // groups
    for name, table in (("cos", cos), ("sin", sin)):
        require(table.shape == (t, d) and table.is_contiguous() and table.dtype == x.dtype,
                f"qkv_rope_linear: {name} must be a contiguous ({t}, {d}) table in {x.dtype}, got "
                f"{tuple(table.shape)} {table.dtype}")
    write = slots is not None
    if write:
        require(k_cache is not None and v_cache is not None and k_cache.is_contiguous() and v_cache.is_contiguous()
                and k_cache.shape == v_cache.shape and tuple(k_cache.shape[2:]) == (num_kv_heads, d),
                f"qkv_rope_linear: caches must be contiguous [NB, BS, {num_kv_heads}, {d}] twins")
        require(slots.shape == (t,) and slots.dtype == torch.int64, f"qkv_rope_linear: slots must be [{t}] int64, "
                                                                    f"got {tuple(slots.shape)} {slots.dtype}")
    half = d // 2
    tile = tile or qkv_rope_tile(d, weight.shape[1])
    q = torch.empty(t, num_heads, d, dtype=x.dtype, device=x.device)
    k = torch.empty(t, num_kv_heads, d, dtype=x.dtype, device=x.device)
    v = torch.empty(t, num_kv_heads, d, dtype=x.dtype, device=x.device)
    if t == 0:
        return q, k, v
    opts = _launch_options(x, tile, _linear_pair_kernel, weight_tiles=2)
    _linear_pair_kernel[(groups * triton.cdiv(half, tile.block_n), triton.cdiv(t, opts["BLOCK_M"]))](
        x, weight, x if norm_weight is None else norm_weight, q, k, v, cos, sin,
        k_cache if write else q, v_cache if write else q, slots if write else x,
        t, weight.shape[1], float(eps), x.stride(0), 0, num_heads, num_kv_heads,
        HALF=half, EPILOGUE=2, HAS_NORM=norm_weight is not None, WRITE_CACHE=write, **opts)
    return q, k, v
