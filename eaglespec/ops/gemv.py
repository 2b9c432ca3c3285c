"""Products of a few token rows (1 to 64) with the neighbouring element-wise work folded in.

A decode step at small batch, or the verify forward of one small tree, reads every weight once
and does little arithmetic, so its time is the weight bytes over HBM bandwidth plus whatever
else runs between the products. Each RMSNorm, RoPE, SwiGLU and residual add between two
products is a launch of a few microseconds during which HBM idles; here they ride along with
the products instead:

  gemv            [RMSNorm prologue] x @ W.T [+ residual]     o_proj, down_proj, lm_head
  gemv_silu_mul   [RMSNorm prologue] silu(x @ Wg.T) * (x @ Wu.T) on the fused gate|up weight
  gemv_qkv_rope   RMSNorm prologue, x @ Wqkv.T, rotate-half RoPE of q and k at each row's
                  position; writes rotated q | rotated k | v to its [M, (Hq + 2 Hkv) D] output
                  and, given cache slots, also stores k/v in the paged cache
  gemv_embed_concat  [embedding[tokens] | features[rows]] @ W.T [+ bias]   EAGLE-1's fc: the
                  embedding lookup, the row gather and the concatenation happen in the input tile

A Llama layer then costs four products plus attention. x is [M, K] with M <= ``MAX_ROWS``
token rows; a program owns a tile of output features for every row, so each weight tile is
read once for all of them. One row is a matrix-vector product (element-wise products summed
once at the end); more rows are padded to a tile of 16, 32 or 64 and multiplied with tl.dot
(tensor cores): the same kernels, switched by the constexpr ``ROW_DOT``. The RMSNorm prologue
scales each row by its 1/rms after the dot product (exact algebra: one scalar per row), so a
single pass over x does both. Products whose outputs must meet in the epilogue (gate j with up
j, RoPE's dim i with dim i + D/2) are computed by the same program from two feature tiles.

Each ``*_ref`` is the PyTorch reference, built from the same torch ops as the model's unfused
path; the kernels round where torch rounds (the product's output, RoPE's terms, silu) and
differ only in summation order, where the norm's scale is applied and (on tl.dot) the
normalised input rounded to the weights' dtype before the product. CPU tensors run the kernels
under ``TRITON_INTERPRET=1``. The launchers read only shapes on the host, so they can be
captured in CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eaglespec.ops.fused import rms_norm_ref, rope_and_cache_write_ref, silu_mul_ref
from eaglespec.ops.triton_support import jit as _jit, mma_options, tl, triton  # noqa: F401

# Token rows one program holds: its tile is every row times a tile of output features.
MAX_ROWS = 64


@dataclass(frozen=True, slots=True)
class GemvTile:
    """One program's work: ``block_m`` token rows (1: matrix-vector; a power of two >= 16:
    tl.dot) times ``block_n`` output features (per feature tile), ``block_k`` inputs a step."""

    block_n: int = 8
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 3
    block_m: int = 1


# ----------------------------------------------------------------------------- references


def _normed(x: torch.Tensor, norm_weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return x if norm_weight is None else rms_norm_ref(x, norm_weight, eps)[0]


def gemv_ref(weight: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor | None = None,
             eps: float = 1e-6, residual: torch.Tensor | None = None,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """weight [N, K], x [M, K] -> [M, N]: RMSNorm(x) (when norm_weight is given) @ weight.T, plus
    residual [M, N]; the product rounds to x's dtype first, as ``F.linear`` does, then to out_dtype."""
    y = torch.nn.functional.linear(_normed(x, norm_weight, eps), weight)
    if residual is not None:
        y = y + residual
    return y.to(out_dtype or x.dtype)


def gemv_silu_mul_ref(weight: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor | None = None,
                      eps: float = 1e-6) -> torch.Tensor:
    """weight [2I, K] (gate rows then up rows), x [M, K] -> silu(gate) * up [M, I]."""
    return silu_mul_ref(torch.nn.functional.linear(_normed(x, norm_weight, eps), weight))


def gemv_qkv_rope_ref(weight: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
                      cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor | None,
                      v_cache: torch.Tensor | None, slots: torch.Tensor | None, num_heads: int,
                      num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [(Hq + 2 Hkv) D, K], x [M, K], cos/sin [M, D] (each row's position), caches
    [NB, BS, Hkv, D], slots [M] int64 or None -> rotated q [M, Hq, D], rotated k and v
    [M, Hkv, D]; with slots, k and v are also stored there (caches None without slots)."""
    m, d = x.shape[0], weight.shape[0] // (num_heads + 2 * num_kv_heads)
    qkv = torch.nn.functional.linear(_normed(x, norm_weight, eps), weight)
    q, k, v = qkv.split((num_heads * d, num_kv_heads * d, num_kv_heads * d), dim=-1)
    v = v.reshape(m, num_kv_heads, d)
    q_rot, k_rot = rope_and_cache_write_ref(q.reshape(m, num_heads, d), k.reshape(m, num_kv_heads, d), v,
                                            cos, sin, k_cache, v_cache, slots)
    return q_rot, k_rot, v


def gemv_embed_concat_ref(weight: torch.Tensor, bias: torch.Tensor | None, table: torch.Tensor, tokens: torch.Tensor,
                          features: torch.Tensor, feature_rows: torch.Tensor | None) -> torch.Tensor:
    """weight [N, E + F], bias [N] or None, table [V, E], tokens [M], features [R, F], feature_rows [M]
    (None: row t reads features[t]) -> [M, N] in weight's dtype: F.linear of the concatenation
    [table[tokens] | features[feature_rows]], each half first cast to weight's dtype."""
    rows = features if feature_rows is None else features.index_select(0, feature_rows)
    x = torch.cat((torch.nn.functional.embedding(tokens, table).to(weight.dtype), rows.to(weight.dtype)), dim=-1)
    return torch.nn.functional.linear(x, weight, bias)


# ----------------------------------------------------------------------------- kernels


@_jit
def _input_tile(x_ptr, norm_w_ptr, tok, tok_ok, stride_x, cols, col_ok, HAS_NORM: tl.constexpr):
    """x[tok, cols] in fp32, times the norm weight when there is one, and x^2 for the norm's sums."""
    x = tl.load(x_ptr + tok[:, None] * stride_x + cols[None, :], mask=tok_ok[:, None] & col_ok[None, :],
                other=0.0).to(tl.float32)
    sq = x * x
    if HAS_NORM:
        x = x * tl.load(norm_w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return x, sq


@_jit
def _zero_acc(ROW_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """ROW_DOT: [BLOCK_M, BLOCK_N] dot products; one row: [BLOCK_N, BLOCK_K] element-wise
    products, summed once after the last step (a matrix-vector product has no use for tensor cores)."""
    if ROW_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    return acc


@_jit
def _zero_squares(ROW_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The norm's running sums of x^2: ROW_DOT, one per row [BLOCK_M] (summed each step, which
    keeps registers for the dot tiles); one row, [1, BLOCK_K] summed once at the end."""
    if ROW_DOT:
        sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    else:
        sum_sq = tl.zeros((1, BLOCK_K), dtype=tl.float32)
    return sum_sq


@_jit
def _add_squares(sum_sq, sq, ROW_DOT: tl.constexpr):
    if ROW_DOT:
        sum_sq += tl.sum(sq, axis=1)
    else:
        sum_sq += sq
    return sum_sq


@_jit
def _accumulate(acc, x, w, ROW_DOT: tl.constexpr, MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc plus one step's products of x [BLOCK_M, BLOCK_K] (fp32) and w [BLOCK_N, BLOCK_K]."""
    if ROW_DOT:  # on a GPU the normalised input rounds to the weights' dtype (MMA_DTYPE) here
        acc += tl.dot(x.to(MMA_DTYPE), tl.trans(w.to(MMA_DTYPE)), input_precision=DOT_PRECISION)
    else:
        acc += w.to(tl.float32) * x
    return acc


@_jit
def _products(acc, sum_sq, K, eps, ROW_DOT: tl.constexpr, HAS_NORM: tl.constexpr):
    """The tile's finished products [BLOCK_M, BLOCK_N] in fp32, each row times its 1/rms."""
    if ROW_DOT:
        y = acc
        if HAS_NORM:
            y = y * tl.rsqrt(sum_sq / K + eps)[:, None]
    else:
        y = tl.sum(acc, axis=1)[None, :]
        if HAS_NORM:
            y = y * tl.rsqrt(tl.sum(sum_sq, axis=1) / K + eps)[:, None]
    return y


@_jit
def _gemv_kernel(
    w_ptr, x_ptr, norm_w_ptr, res_ptr, y_ptr,
    M, N, K, eps, stride_x, stride_res, stride_y,
    HAS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ROW_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N),): every token row times one tile of output features."""
    feat = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    feat_ok = feat < N
    tok = tl.arange(0, BLOCK_M).to(tl.int64)
    tok_ok = tok < M
    w_rows = w_ptr + feat.to(tl.int64)[:, None] * K
    acc = _zero_acc(ROW_DOT, BLOCK_M, BLOCK_N, BLOCK_K)
    sum_sq = _zero_squares(ROW_DOT, BLOCK_M, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x, sq = _input_tile(x_ptr, norm_w_ptr, tok, tok_ok, stride_x, cols, col_ok, HAS_NORM)
        if HAS_NORM:
            sum_sq = _add_squares(sum_sq, sq, ROW_DOT)
        w = tl.load(w_rows + cols[None, :], mask=feat_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _accumulate(acc, x, w, ROW_DOT, MMA_DTYPE, DOT_PRECISION)
    y = _products(acc, sum_sq, K, eps, ROW_DOT, HAS_NORM)
    dt = x_ptr.dtype.element_ty
    # The product rounds to the activation dtype before the residual add, as in torch.
    y = y.to(dt).to(tl.float32)
    mask = tok_ok[:, None] & feat_ok[None, :]
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + tok[:, None] * stride_res + feat[None, :], mask=mask, other=0.0)
        y = (y + res.to(tl.float32)).to(dt)
    tl.store(y_ptr + tok[:, None] * stride_y + feat[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@_jit
def _gemv_embed_concat_kernel(
    w_ptr, table_ptr, tokens_ptr, feat_ptr, rows_ptr, bias_ptr, y_ptr,
    M, N, E, K, stride_table, stride_feat, stride_y,
    HAS_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, ROW_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N),): every token row times one tile of output features; input columns
    [0, E) come from the token's embedding row, [E, K) from its feature row."""
    feat = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    feat_ok = feat < N
    tok = tl.arange(0, BLOCK_M).to(tl.int64)
    tok_ok = tok < M
    emb_row = tl.load(tokens_ptr + tok, mask=tok_ok, other=0).to(tl.int64)
    if HAS_ROWS:
        feat_row = tl.load(rows_ptr + tok, mask=tok_ok, other=0).to(tl.int64)
    else:
        feat_row = tok
    w_rows = w_ptr + feat.to(tl.int64)[:, None] * K
    acc = _zero_acc(ROW_DOT, BLOCK_M, BLOCK_N, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        in_emb = cols < E
        in_feat = (cols >= E) & (cols < K)
        x = tl.load(table_ptr + emb_row[:, None] * stride_table + cols[None, :],
                    mask=tok_ok[:, None] & in_emb[None, :], other=0.0).to(tl.float32)
        x += tl.load(feat_ptr + feat_row[:, None] * stride_feat + tl.maximum(cols - E, 0)[None, :],
                     mask=tok_ok[:, None] & in_feat[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_rows + cols[None, :], mask=feat_ok[:, None] & (cols < K)[None, :], other=0.0)
        acc = _accumulate(acc, x, w, ROW_DOT, MMA_DTYPE, DOT_PRECISION)
    y = _products(acc, 0.0, K, 0.0, ROW_DOT, False)
    if HAS_BIAS:  # added before the one rounding, as F.linear's bias
        y += tl.load(bias_ptr + feat, mask=feat_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + tok[:, None] * stride_y + feat[None, :], y.to(y_ptr.dtype.element_ty),
             mask=tok_ok[:, None] & feat_ok[None, :])


@_jit
def _gemv_pair_kernel(
    w_ptr, x_ptr, norm_w_ptr, y_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
    M, K, eps, num_heads, num_kv_heads, stride_x, stride_y,
    HALF: tl.constexpr,  # features paired: f and f + HALF, inside groups of 2 * HALF weight rows
    EPILOGUE: tl.constexpr,  # 1: silu(first) * second; 2: RoPE of q and k heads, v as it is
    WRITE_CACHE: tl.constexpr,  # EPILOGUE 2: also store k/v at the cache slots of the rows
    HAS_NORM: tl.constexpr, ROW_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid (groups * cdiv(HALF, BLOCK_N),): every token row times one pair of feature tiles."""
    tiles_per_half = tl.cdiv(HALF, BLOCK_N)
    group = tl.program_id(0) // tiles_per_half
    offs = (tl.program_id(0) % tiles_per_half) * BLOCK_N + tl.arange(0, BLOCK_N)  # within the half
    feat_ok = offs < HALF
    tok = tl.arange(0, BLOCK_M).to(tl.int64)
    tok_ok = tok < M
    wa = w_ptr + (group * 2 * HALF + offs).to(tl.int64)[:, None] * K
    wb = wa + HALF * K
    acc_a = _zero_acc(ROW_DOT, BLOCK_M, BLOCK_N, BLOCK_K)
    acc_b = _zero_acc(ROW_DOT, BLOCK_M, BLOCK_N, BLOCK_K)
    sum_sq = _zero_squares(ROW_DOT, BLOCK_M, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x, sq = _input_tile(x_ptr, norm_w_ptr, tok, tok_ok, stride_x, cols, col_ok, HAS_NORM)
        if HAS_NORM:
            sum_sq = _add_squares(sum_sq, sq, ROW_DOT)
        w_mask = feat_ok[:, None] & col_ok[None, :]
        acc_a = _accumulate(acc_a, x, tl.load(wa + cols[None, :], mask=w_mask, other=0.0), ROW_DOT,
                            MMA_DTYPE, DOT_PRECISION)
        acc_b = _accumulate(acc_b, x, tl.load(wb + cols[None, :], mask=w_mask, other=0.0), ROW_DOT,
                            MMA_DTYPE, DOT_PRECISION)
    dt = x_ptr.dtype.element_ty
    a = _products(acc_a, sum_sq, K, eps, ROW_DOT, HAS_NORM).to(dt).to(tl.float32)  # rounded like
    b = _products(acc_b, sum_sq, K, eps, ROW_DOT, HAS_NORM).to(dt).to(tl.float32)  # the product's output
    mask = tok_ok[:, None] & feat_ok[None, :]
    if EPILOGUE == 1:
        silu = (a / (1.0 + tl.exp(-a))).to(dt).to(tl.float32)
        tl.store(y_ptr + tok[:, None] * stride_y + offs[None, :], (silu * b).to(y_ptr.dtype.element_ty), mask=mask)
    if EPILOGUE == 2:
        head_dim = 2 * HALF
        out = y_ptr + tok[:, None] * stride_y + group * head_dim + offs[None, :]  # q | k | v heads in order
        if group < num_heads + num_kv_heads:
            table = tok[:, None] * head_dim + offs[None, :]  # each row's own position
            c = tl.load(cos_ptr + table, mask=mask, other=0.0).to(dt).to(tl.float32)
            s = tl.load(sin_ptr + table, mask=mask, other=0.0).to(dt).to(tl.float32)
            # Each product and the sum round to the model dtype, as x * cos + rotate_half(x) * sin.
            out_a = ((a * c).to(dt).to(tl.float32) - (b * s).to(dt).to(tl.float32)).to(dt)
            out_b = ((b * c).to(dt).to(tl.float32) + (a * s).to(dt).to(tl.float32)).to(dt)
        else:
            out_a = a.to(dt)
            out_b = b.to(dt)
        tl.store(out, out_a, mask=mask)
        tl.store(out + HALF, out_b, mask=mask)
        if WRITE_CACHE:
            if group >= num_heads:
                slot = tl.load(slots_ptr + tok, mask=tok_ok, other=0).to(tl.int64)
                kv_head = (group - num_heads) % num_kv_heads
                cached = slot[:, None] * (num_kv_heads * head_dim) + kv_head * head_dim + offs[None, :]
                if group < num_heads + num_kv_heads:
                    tl.store(k_cache_ptr + cached, out_a.to(k_cache_ptr.dtype.element_ty), mask=mask)
                    tl.store(k_cache_ptr + cached + HALF, out_b.to(k_cache_ptr.dtype.element_ty), mask=mask)
                else:
                    tl.store(v_cache_ptr + cached, out_a.to(v_cache_ptr.dtype.element_ty), mask=mask)
                    tl.store(v_cache_ptr + cached + HALF, out_b.to(v_cache_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def require(cond: bool, msg: str) -> None:
    """Raise ValueError(msg) unless cond: the launchers' input checks."""
    if not cond:
        raise ValueError(msg)


def _check_weight(name: str, weight: torch.Tensor) -> None:
    """Triton is there, and the weight is a contiguous [N, K] matrix."""
    if triton is None:
        raise RuntimeError("triton is not installed: use the *_ref functions instead")
    require(weight.dim() == 2 and weight.is_contiguous(), f"{name}: weight must be a contiguous [N, K] matrix, "
                                                          f"got shape {tuple(weight.shape)}")


def _check_operands(name: str, weight: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor | None) -> None:
    """Weight, input rows and norm weight of a fused product: shapes, dtypes, device, layout."""
    _check_weight(name, weight)
    k = weight.shape[1]
    require(x.dim() == 2 and x.shape[1] == k and x.stride(1) == 1 and 1 <= x.shape[0] <= MAX_ROWS,
            f"{name}: input must be [M, {k}] rows with 1 <= M <= {MAX_ROWS} and unit column stride, "
            f"got shape {tuple(x.shape)} strides {x.stride()}")
    require(x.dtype == weight.dtype, f"{name}: input dtype {x.dtype} differs from weight dtype {weight.dtype}")
    require(x.device == weight.device, f"{name}: input on {x.device}, weight on {weight.device}")
    if norm_weight is not None:
        require(norm_weight.shape == (k,) and norm_weight.is_contiguous(),
                f"{name}: norm weight must have shape ({k},), got {tuple(norm_weight.shape)}")


def _check_tile(name: str, tile: GemvTile, m: int) -> None:
    require(tile.block_m >= m and (tile.block_m == 1 or (tile.block_m >= 16 and tile.block_n >= 16
                                                          and tile.block_k >= 16)),
            f"{name}: tile {tile} does not hold {m} rows (block_m 1, or block_m/n/k >= 16 for tl.dot)")


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _block_k(k: int, cap: int) -> int:
    return min(cap, _pow2(k))


def _block_m(m: int) -> int:
    """1 for one row; else a power of two >= 16 (tl.dot's smallest tile)."""
    return 1 if m == 1 else max(16, _pow2(m))


def _rows_tile(m: int, k: int, block_n: int, pair: bool) -> GemvTile:
    """A tl.dot tile for m > 1 rows.

    Small products (k <= 2048, SmolLM2's shapes): a step of a few rows there is a chain of serial
    latencies, one per column step, so the tiles are narrow (16 features: more programs), few
    warps and deep pipelines. From the H100 sweep of benchmarks/bench_gemv.py --preset
    smollm2-135m --rows 4,33 (benchmarks/results/few-row-tiles-nvidia-h100-2026-12-06/, design note 58),
    µs at 4 rows, old tile -> this one: qkv 7.3 -> 6.2, o_proj 3.9 -> 3.4, gate_up 7.2 -> 6.1,
    down 6.6 -> 4.5; at 33 rows 11.5 -> 8.7, 5.0 -> 3.5, 11.2 -> 8.4, 9.8 -> 5.0.

    Larger products: ``block_n`` features (the caller's). Short column steps (shorter for the
    paired products, which hold two weight tiles), and eight warps from 32 rows on, keep the x, w
    and accumulator tiles within registers (ptxas for sm_90 reports no spills at these tiles in
    bf16 and fp32; four warps spill for 64 rows)."""
    block_m = _block_m(m)
    if k <= 2048:
        if block_m <= 16:
            return GemvTile(block_n=16, block_k=_block_k(k, 128 if pair else 256), num_warps=2, num_stages=4,
                            block_m=block_m)
        return GemvTile(block_n=16, block_k=_block_k(k, 64 if pair else 128), num_warps=4, num_stages=5,
                        block_m=block_m)
    return GemvTile(block_n=block_n, block_k=max(16, _block_k(k, 128 if block_m <= 16 and not pair else 64)),
                    num_warps=4 if block_m <= 16 else 8, num_stages=3, block_m=block_m)


# One-row tiles from the H100 sweep of benchmarks/bench_gemv.py on the Llama-3.1-8B shapes (results
# in benchmarks/results/gemv-*.json): long column steps for the plain product, two warps while the
# output is narrow (many small programs keep more loads in flight), four for the vocabulary.
# Tiles of more rows: _rows_tile.
def plain_tile(n: int, k: int, m: int = 1) -> GemvTile:
    if m > 1:
        return _rows_tile(m, k, 32, pair=False)
    return GemvTile(block_n=8, block_k=_block_k(k, 1024), num_warps=2 if n <= 16384 else 4, num_stages=3)


def silu_mul_tile(k: int, m: int = 1) -> GemvTile:
    if m > 1:
        return _rows_tile(m, k, 32 if m <= 32 else 16, pair=True)
    return GemvTile(block_n=16, block_k=_block_k(k, 512), num_warps=4, num_stages=3)


def qkv_rope_tile(head_dim: int, k: int, m: int = 1) -> GemvTile:
    if m > 1:
        return _rows_tile(m, k, min(32, max(16, _pow2(head_dim // 2))), pair=True)
    return GemvTile(block_n=min(8, _pow2(head_dim // 2)), block_k=_block_k(k, 512), num_warps=8, num_stages=2)


# Shared memory a pipelined tile may take (an H100 SM has 227 KB; a bf16 64-row tile takes 62 KB).
_TILE_SMEM_BYTES = 160 * 1024


def embed_concat_tile(n: int, k: int, m: int, element_size: int) -> GemvTile:
    """``plain_tile``, with fewer pipeline stages where its input tile, loaded from two sources
    (each staged on its own), would not fit in shared memory (fp32 with 33-64 rows)."""
    tile = plain_tile(n, k, m)
    per_stage = (2 * tile.block_m + tile.block_n) * tile.block_k * element_size
    stages = max(1, min(tile.num_stages, _TILE_SMEM_BYTES // per_stage))
    return GemvTile(tile.block_n, tile.block_k, tile.num_warps, stages, tile.block_m)


def _launch_options(tile: GemvTile, dtype: torch.dtype, kernel) -> dict:
    return dict(ROW_DOT=tile.block_m > 1, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
                num_warps=tile.num_warps, num_stages=tile.num_stages, **mma_options(dtype, kernel))


def gemv(weight: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
         residual: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
         tile: GemvTile | None = None) -> torch.Tensor:
    """Triton version of ``gemv_ref`` (same arguments and result); x and residual may have
    strided rows."""
    _check_operands("gemv", weight, x, norm_weight)
    n, k = weight.shape
    m = x.shape[0]
    if residual is not None:
        require(residual.shape == (m, n) and residual.stride(1) == 1 and residual.dtype == x.dtype,
                f"gemv: residual must be [{m}, {n}] rows with unit column stride in {x.dtype}, got "
                f"{tuple(residual.shape)} {residual.dtype}")
    tile = tile or plain_tile(n, k, m)
    _check_tile("gemv", tile, m)
    y = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    res = y if residual is None else residual
    _gemv_kernel[(triton.cdiv(n, tile.block_n),)](
        weight, x, x if norm_weight is None else norm_weight, res, y,
        m, n, k, float(eps), x.stride(0), res.stride(0), y.stride(0),
        HAS_NORM=norm_weight is not None, HAS_RESIDUAL=residual is not None,
        **_launch_options(tile, x.dtype, _gemv_kernel))
    return y


def gemv_silu_mul(weight: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor | None = None,
                  eps: float = 1e-6, tile: GemvTile | None = None) -> torch.Tensor:
    """Triton version of ``gemv_silu_mul_ref`` (same arguments and result)."""
    _check_operands("gemv_silu_mul", weight, x, norm_weight)
    two_i, k = weight.shape
    require(two_i % 2 == 0, f"gemv_silu_mul: the gate|up weight needs an even row count, got {two_i}")
    inter, m = two_i // 2, x.shape[0]
    tile = tile or silu_mul_tile(k, m)
    _check_tile("gemv_silu_mul", tile, m)
    y = torch.empty(m, inter, dtype=x.dtype, device=x.device)
    _gemv_pair_kernel[(triton.cdiv(inter, tile.block_n),)](
        weight, x, x if norm_weight is None else norm_weight, y, x, x, y, y, x,
        m, k, float(eps), 0, 0, x.stride(0), y.stride(0), HALF=inter, EPILOGUE=1, WRITE_CACHE=False,
        HAS_NORM=norm_weight is not None, **_launch_options(tile, x.dtype, _gemv_pair_kernel))
    return y


def gemv_qkv_rope(weight: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
                  cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor | None,
                  v_cache: torch.Tensor | None, slots: torch.Tensor | None, num_heads: int, num_kv_heads: int,
                  tile: GemvTile | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of ``gemv_qkv_rope_ref`` (same arguments and results). q, k and v are
    views of one [M, (Hq + 2 Hkv) D] output (rows of q | k | v, as the qkv projection lays them
    out). The slots are read on the device, not bounds-checked (that would read them on the host)."""
    _check_operands("gemv_qkv_rope", weight, x, norm_weight)
    m = x.shape[0]
    d = weight.shape[0] // (num_heads + 2 * num_kv_heads)
    require(weight.shape[0] == (num_heads + 2 * num_kv_heads) * d and d % 2 == 0,
            f"gemv_qkv_rope: weight has {weight.shape[0]} rows, expected (Hq + 2 Hkv) * D with Hq = {num_heads}, "
            f"Hkv = {num_kv_heads} and an even head_dim D")
    write = slots is not None
    if write:
        require(k_cache is not None and v_cache is not None and k_cache.dim() == 4 and k_cache.is_contiguous()
                and v_cache.shape == k_cache.shape and v_cache.is_contiguous(),
                "gemv_qkv_rope: caches must be contiguous [NB, BS, Hkv, D] twins when slots are given")
        require(tuple(k_cache.shape[2:]) == (num_kv_heads, d),
                f"gemv_qkv_rope: cache [NB, BS, Hkv, D] = {tuple(k_cache.shape)}, expected Hkv = {num_kv_heads} "
                f"and D = {d}")
        require(slots.shape == (m,) and slots.dtype == torch.int64 and slots.is_contiguous(),
                f"gemv_qkv_rope: slots must be {m} contiguous int64, got {tuple(slots.shape)} {slots.dtype}")
    else:
        require(k_cache is None and v_cache is None, "gemv_qkv_rope: caches given without slots")
    for name, table in (("cos", cos), ("sin", sin)):
        require(table.shape == (m, d) and table.is_contiguous() and table.dtype == x.dtype,
                f"gemv_qkv_rope: {name} must be a contiguous ({m}, {d}) table in {x.dtype}, got "
                f"{tuple(table.shape)} {table.dtype}")
    half = d // 2
    tile = tile or qkv_rope_tile(d, weight.shape[1], m)
    _check_tile("gemv_qkv_rope", tile, m)
    qkv = torch.empty(m, weight.shape[0], dtype=x.dtype, device=x.device)
    groups = num_heads + 2 * num_kv_heads
    _gemv_pair_kernel[(groups * triton.cdiv(half, tile.block_n),)](
        weight, x, x if norm_weight is None else norm_weight, qkv, cos, sin,
        k_cache if write else qkv, v_cache if write else qkv, slots if write else cos,
        m, weight.shape[1], float(eps), num_heads, num_kv_heads, x.stride(0), qkv.stride(0),
        HALF=half, EPILOGUE=2, WRITE_CACHE=write, HAS_NORM=norm_weight is not None,
        **_launch_options(tile, x.dtype, _gemv_pair_kernel))
    q, k, v = qkv.split((num_heads * d, num_kv_heads * d, num_kv_heads * d), dim=-1)
    return q.view(m, num_heads, d), k.view(m, num_kv_heads, d), v.view(m, num_kv_heads, d)


def gemv_embed_concat(weight: torch.Tensor, bias: torch.Tensor | None, table: torch.Tensor, tokens: torch.Tensor,
                      features: torch.Tensor, feature_rows: torch.Tensor | None = None,
                      tile: GemvTile | None = None) -> torch.Tensor:
    """Triton version of ``gemv_embed_concat_ref`` (same arguments and result): one launch where
    the reference takes four (row gather, embedding, concatenation, product). Token ids and
    feature rows are read on the device, not bounds-checked."""
    _check_weight("gemv_embed_concat", weight)
    n, k = weight.shape
    require(table.dim() == 2 and table.stride(1) == 1 and features.dim() == 2 and features.stride(1) == 1
            and table.shape[1] + features.shape[1] == k,
            f"gemv_embed_concat: table [V, E] and features [R, F] with unit column strides and E + F = {k} "
            f"(the weight's inputs), got {tuple(table.shape)} and {tuple(features.shape)}")
    m = tokens.shape[0] if tokens.dim() == 1 else -1
    require(tokens.dim() == 1 and not tokens.dtype.is_floating_point and tokens.is_contiguous()
            and 1 <= m <= MAX_ROWS, f"gemv_embed_concat: tokens must be 1 to {MAX_ROWS} contiguous integer ids, "
                                    f"got {tuple(tokens.shape)} {tokens.dtype}")
    if feature_rows is None:
        require(features.shape[0] == m, f"gemv_embed_concat: without feature_rows, features needs {m} rows "
                                        f"(one per token), got {features.shape[0]}")
    else:
        require(feature_rows.shape == (m,) and feature_rows.dtype == torch.int64 and feature_rows.is_contiguous(),
                f"gemv_embed_concat: feature_rows must be {m} contiguous int64, got "
                f"{tuple(feature_rows.shape)} {feature_rows.dtype}")
    if bias is not None:
        require(bias.shape == (n,) and bias.is_contiguous(), f"gemv_embed_concat: bias must have shape ({n},), "
                                                             f"got {tuple(bias.shape)}")
    for name, t in (("table", table), ("tokens", tokens), ("features", features)):
        require(t.device == weight.device, f"gemv_embed_concat: {name} on {t.device}, weight on {weight.device}")
    tile = tile or embed_concat_tile(n, k, m, weight.element_size())
    _check_tile("gemv_embed_concat", tile, m)
    y = torch.empty(m, n, dtype=weight.dtype, device=weight.device)
    _gemv_embed_concat_kernel[(triton.cdiv(n, tile.block_n),)](
        weight, table, tokens, features, tokens if feature_rows is None else feature_rows,
        y if bias is None else bias, y,
        m, n, table.shape[1], k, table.stride(0), features.stride(0), y.stride(0),
        HAS_ROWS=feature_rows is not None, HAS_BIAS=bias is not None,
        **_launch_options(tile, weight.dtype, _gemv_embed_concat_kernel))
    return y
