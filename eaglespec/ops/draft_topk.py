"""The draft's best children per row, straight from its last hidden state.

Drafting one tree level needs, for every frontier row, the top-k tokens of the draft's
distribution and their log-probabilities. Done with torch that is a [rows, vocab] product
written to memory, a log-softmax over it and a top-k (several launches, and at batch 1 the
logits are the largest tensor of the whole draft). Here the product never leaves the chip:

  partial kernel  program (row block, vocab tile): logits of the tile (fp32 accumulation,
                  rounded to the weight dtype as the torch product rounds), the tile's top-k
                  and its (max, sum of exp) for the log-sum-exp
  merge kernel    program (row): the top-k of all tiles' candidates, the row's log-sum-exp
                  from the tiles' pairs, log-probabilities = logit - lse, and draft ids mapped
                  to target ids when the draft has its own vocabulary

Ties: equal logits are taken lowest vocabulary index first, in the kernels and in the
reference (a stable descending sort), so both pick the same tokens.

A broken head (NaN or inf weights) must only cost speed, never break the tree: NaN logits rank
as -inf, log-probabilities come out finite in [LOGP_FLOOR, 0] (NaN, e.g. inf - inf, becomes the
floor), and mapped ids are clamped into the target vocabulary. The launcher reads only shapes
on the host, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from eaglespec.ops.linear import linear
from eaglespec.ops.triton_support import jit as _jit, mma_options, tl, triton  # noqa: F401

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Floor of a sanitised draft log-probability: finite, so cumulative scores stay ordered.
LOGP_FLOOR = -1e4


# ----------------------------------------------------------------------------- reference


def draft_topk_ref(hidden: torch.Tensor, weight: torch.Tensor, k: int, to_target: torch.Tensor | None = None,
                   target_vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [R, H], weight [V, H] -> (log-probs [R, k] fp32, token ids [R, k] int64), best first.

    log-probs are those of log_softmax(hidden @ weight.T) (the product rounded to the weight
    dtype, then fp32), sanitised as the module says; ties go to the lowest index.
    ``to_target`` [V] int64 maps the ids; ids are clamped into [0, target_vocab) (default V).
    """
    logits = linear(hidden.to(weight.dtype), weight).float()
    logits = torch.nan_to_num(logits, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    values, ids = top_k_lowest_index_first(logits, k)
    logp = torch.nan_to_num(values - lse, nan=LOGP_FLOOR).clamp(LOGP_FLOOR, 0.0)
    ids = ids if to_target is None else to_target[ids]
    return logp, ids.clamp(0, (target_vocab or weight.shape[0]) - 1)


def top_k_lowest_index_first(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [R, V] without NaN -> (values [R, k], ids [R, k] int64): the k largest, best first,
    equal values lowest index first (what a stable descending sort's first k columns are).

    Two top-k passes instead of that sort (on the CPU 8-13x faster at 49,152 columns, where the
    sort was a tenth of a drafted tree's time), and no host sync: ``torch.topk`` has the right
    values but leaves ties in any order, so the ids of values above the k-th are re-ordered by
    (value, id), and the slots holding the k-th value take the lowest ids that hold it.
    """
    values, ids = torch.topk(logits, k, dim=-1)
    kth = values[:, -1:]
    vocab = logits.shape[-1]
    # Among the columns equal to the k-th value, the lowest ids first (a larger key is a lower id).
    key = torch.where(logits == kth, torch.arange(vocab, 0, -1, device=logits.device), 0)
    lowest_at_kth = torch.topk(key, k, dim=-1).indices
    ids_by_id, perm = ids.sort(dim=-1)
    values_by_id = values.gather(1, perm)
    order = torch.sort(values_by_id, dim=-1, descending=True, stable=True).indices
    ids, values = ids_by_id.gather(1, order), values_by_id.gather(1, order)
    above = (values > kth).sum(-1, keepdim=True)  # slots [0, above) hold values above the k-th
    slot = torch.arange(k, device=logits.device)
    at_kth = slot >= above
    ids = torch.where(at_kth, lowest_at_kth.gather(1, (slot - above).clamp(min=0)), ids)
    return torch.where(at_kth, kth, values), ids


# ----------------------------------------------------------------------------- kernels


@_jit
def _draft_topk_partial_kernel(
    x_ptr, w_ptr, cand_val_ptr, cand_idx_ptr, tile_max_ptr, tile_sum_ptr,
    R, V, H, stride_x, num_tiles,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (row block, vocab tile): the tile's top-K logits per row and its (max, sum exp)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    tile = tl.program_id(1)
    cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < R
    col_ok = cols < V
    acc = tl.zeros((BLOCK_R, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_ok = hs < H
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + hs[None, :],
                    mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols.to(tl.int64)[None, :] * H + hs[:, None],
                    mask=col_ok[None, :] & h_ok[:, None], other=0.0)
        acc = tl.dot(x.to(MMA_DTYPE), w.to(MMA_DTYPE), acc, input_precision=DOT_PRECISION)
    # Round where torch's product rounds (to the weight dtype), then work in fp32.
    logits = acc.to(w_ptr.dtype.element_ty).to(tl.float32)
    logits = tl.where(col_ok[None, :] & (logits == logits), logits, float("-inf"))  # NaN ranks last
    tile_max = tl.max(logits, axis=1)
    infinite = (tile_max == float("-inf")) | (tile_max == float("inf"))
    safe_max = tl.where(infinite, 0.0, tile_max)
    tile_sum = tl.sum(tl.exp(logits - safe_max[:, None]), axis=1)
    out = rows.to(tl.int64) * num_tiles + tile
    tl.store(tile_max_ptr + out, tile_max, mask=row_ok)
    tl.store(tile_sum_ptr + out, tile_sum, mask=row_ok)
    # Top-K by repeated extraction; padding columns carry indices past V so real ones win ties.
    index = tl.where(col_ok, cols, V + cols)[None, :] + tl.zeros((BLOCK_R, BLOCK_V), dtype=tl.int32)
    for j in tl.static_range(K):
        best = tl.max(logits, axis=1)
        best_idx = tl.min(tl.where(logits == best[:, None], index, 2147483647), axis=1)
        tl.store(cand_val_ptr + out * K_PAD + j, best, mask=row_ok)
        tl.store(cand_idx_ptr + out * K_PAD + j, best_idx, mask=row_ok)
        logits = tl.where(index == best_idx[:, None], float("-inf"), logits)
        index = tl.where(index == best_idx[:, None], 2147483647, index)


@_jit
def _draft_topk_merge_kernel(
    cand_val_ptr, cand_idx_ptr, tile_max_ptr, tile_sum_ptr, to_target_ptr, out_val_ptr, out_idx_ptr,
    num_tiles, max_id, floor,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_MAP: tl.constexpr,
):
    """Program (row): top-K of the tiles' candidates, log-probabilities, mapped ids."""
    row = tl.program_id(0).to(tl.int64)
    t = tl.arange(0, BLOCK_T)
    t_ok = t < num_tiles
    m = tl.load(tile_max_ptr + row * num_tiles + t, mask=t_ok, other=float("-inf"))
    s = tl.load(tile_sum_ptr + row * num_tiles + t, mask=t_ok, other=0.0)
    big = tl.max(m, axis=0)
    finite = (big != float("inf")) & (big != float("-inf"))
    safe_big = tl.where(finite, big, 0.0)
    total = tl.sum(tl.where(t_ok & (m != float("-inf")), s * tl.exp(m - safe_big), 0.0), axis=0)
    lse = tl.where(finite, safe_big + tl.log(total), big)  # +-inf when the largest logit is
    c = tl.arange(0, BLOCK_C)
    c_ok = (c < num_tiles * K_PAD) & ((c % K_PAD) < K)
    vals = tl.load(cand_val_ptr + row * num_tiles * K_PAD + c, mask=c_ok, other=float("-inf"))
    idx = tl.load(cand_idx_ptr + row * num_tiles * K_PAD + c, mask=c_ok, other=2147483647)
    for j in tl.static_range(K):
        best = tl.max(vals, axis=0)
        best_idx = tl.min(tl.where(vals == best, idx, 2147483647), axis=0)
        token = best_idx.to(tl.int64)
        if HAS_MAP:
            token = tl.load(to_target_ptr + token)
        token = tl.minimum(tl.maximum(token, 0), max_id)
        logp = best - lse
        logp = tl.where(logp == logp, logp, floor)  # inf - inf
        tl.store(out_val_ptr + row * K + j, tl.minimum(tl.maximum(logp, floor), 0.0))
        tl.store(out_idx_ptr + row * K + j, token)
        hit = idx == best_idx
        vals = tl.where(hit, float("-inf"), vals)
        idx = tl.where(hit, 2147483647, idx)


# ----------------------------------------------------------------------------- launcher


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _row_block(rows: int) -> int:
    return max(16, min(64, _pow2(rows)))  # tl.dot needs 16+ rows; more rows share a weight tile


def draft_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int, to_target: torch.Tensor | None = None,
               target_vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``draft_topk_ref`` (same arguments and results): two launches, no
    [R, V] logits in memory. hidden [R, H] (rows may be strided), weight [V, H] contiguous
    in hidden's dtype; CUDA tensors, or CPU ones under TRITON_INTERPRET=1."""
    _check(isinstance(hidden, torch.Tensor) and hidden.dim() == 2,
           f"hidden must be a [rows, hidden] tensor, got {getattr(hidden, 'shape', type(hidden))}")
    _check(hidden.dtype in _FLOAT_DTYPES, f"hidden dtype must be a float type, got {hidden.dtype}")
    _check(isinstance(weight, torch.Tensor) and weight.dim() == 2,
           f"weight must be a [vocab, hidden] tensor, got {getattr(weight, 'shape', type(weight))}")
    _check(weight.dtype == hidden.dtype, f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    _check(weight.is_contiguous(), "weight must be contiguous")
    _check(weight.device == hidden.device, f"weight is on {weight.device}, hidden on {hidden.device}")
    rows, size = hidden.shape
    vocab = weight.shape[0]
    _check(weight.shape[1] == size, f"weight is [{vocab}, {weight.shape[1]}], hidden has {size} columns")
    _check(hidden.numel() == 0 or hidden.stride(1) == 1, f"hidden must have unit stride in its last dim "
                                                         f"(strides {hidden.stride()})")
    _check(isinstance(k, int) and 1 <= k <= min(vocab, 64), f"k must be an int in [1, min(vocab, 64)], got {k!r}")
    if to_target is not None:
        _check(isinstance(to_target, torch.Tensor) and to_target.shape == (vocab,) and to_target.dtype == torch.int64,
               f"to_target must be int64 of shape ({vocab},), got {getattr(to_target, 'dtype', None)} "
               f"{tuple(getattr(to_target, 'shape', ()))}")
        _check(to_target.device == hidden.device, f"to_target is on {to_target.device}, hidden on {hidden.device}")
    target_vocab = target_vocab or vocab
    _check(isinstance(target_vocab, int) and target_vocab >= 1, f"target_vocab must be a positive int, got {target_vocab!r}")
    if triton is None:
        raise RuntimeError("triton is not installed: use draft_topk_ref")
    kernel = _draft_topk_partial_kernel
    _check(hidden.is_cuda or type(kernel).__name__ == "InterpretedFunction",
           f"draft_topk needs CUDA tensors (got {hidden.device}); set TRITON_INTERPRET=1 to run it on the CPU")
    dev = hidden.device
    values = torch.empty((rows, k), dtype=torch.float32, device=dev)
    ids = torch.empty((rows, k), dtype=torch.int64, device=dev)
    if rows == 0:
        return values, ids
    block_v = 128
    block_h = min(64, max(16, _pow2(size)))
    num_tiles = triton.cdiv(vocab, block_v)
    k_pad = _pow2(k)
    cand_val = torch.empty((rows, num_tiles, k_pad), dtype=torch.float32, device=dev)
    cand_idx = torch.empty((rows, num_tiles, k_pad), dtype=torch.int32, device=dev)
    tile_max = torch.empty((rows, num_tiles), dtype=torch.float32, device=dev)
    tile_sum = torch.empty((rows, num_tiles), dtype=torch.float32, device=dev)
    block_r = _row_block(rows)
    kernel[(triton.cdiv(rows, block_r), num_tiles)](
        hidden, weight, cand_val, cand_idx, tile_max, tile_sum,
        rows, vocab, size, hidden.stride(0), num_tiles,
        K=k, K_PAD=k_pad, BLOCK_R=block_r, BLOCK_V=block_v, BLOCK_H=block_h,
        num_warps=4, **mma_options(hidden.dtype, kernel))
    _draft_topk_merge_kernel[(rows,)](
        cand_val, cand_idx, tile_max, tile_sum, values if to_target is None else to_target, values, ids,
        num_tiles, target_vocab - 1, LOGP_FLOOR, K=k, K_PAD=k_pad, BLOCK_C=_pow2(num_tiles * k_pad), BLOCK_T=_pow2(num_tiles),
        HAS_MAP=to_target is not None, num_warps=4)
    return values, ids
