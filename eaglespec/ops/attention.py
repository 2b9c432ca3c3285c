"""Attention over the paged KV cache: PyTorch references (any device) and Triton kernels.

Cache layout, one layer: ``k_cache``/``v_cache`` of shape [num_blocks, block_size, Hkv, D].
A sequence's token at position p lives in block ``block_tables[b, p // block_size]`` at
offset ``p % block_size``.

Ops (each has ``*_ref`` in PyTorch and a Triton launcher of the same signature):
  paged_prefill_attention : varlen queries, causal over the sequence's cached keys
  paged_decode_attention  : Nq queries per sequence over its first context_lens[b] keys,
                            no mask, split-K; returns output and log-sum-exp. Serves plain
                            decode (Nq = 1) and pass 1 of tree attention (Nq = tree nodes).
  tree_attention          : pass 2, tree queries over the tree's own K/V under an ancestor
                            bitmask; returns output and log-sum-exp.
  merge_attention_states  : combine two partial attentions by their log-sum-exps.

Tree verification = ``two_pass_tree_attention`` (decode pass over the cached prefix + tree pass
+ merge; where the prefix is one chunk, one program walks both, in one launch);
``tree_attention_sdpa_masked`` is the one-shot SDPA baseline it is measured against.
The decode, tree and two-pass launchers never read device values on the host, so they can be
captured in CUDA graphs. CPU tensors run the kernels under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math

import torch

from eaglespec.ops.triton_support import jit as _jit, mma_options, tl, triton  # noqa: F401


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def gather_sequence_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                       length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``length`` cached K/V of one sequence: two [length, Hkv, D] tensors."""
    block_size = k_cache.shape[1]
    n_blocks = (length + block_size - 1) // block_size
    blocks = block_table[:n_blocks].long()
    k = k_cache[blocks].reshape(-1, *k_cache.shape[2:])[:length]
    v = v_cache[blocks].reshape(-1, *v_cache.shape[2:])[:length]
    return k, v


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference softmax attention in fp32 with GQA.

    q [Nq, Hq, D], k/v [Nk, Hkv, D], mask [Nq, Nk] bool (True = visible) or None.
    Returns out [Nq, Hq, D] (fp32) and lse [Nq, Hq] (fp32, natural log; -inf where nothing is visible).
    """
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    qf = q.float().transpose(0, 1)  # [Hq, Nq, D]
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, Nk, D]
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = qf @ kf.transpose(1, 2) * scale  # [Hq, Nq, Nk]
    if mask is not None:
        scores = scores.masked_fill(~mask[None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, Nq]
    probs = torch.exp(scores - lse[..., None].clamp_min(-1e30))
    probs = torch.nan_to_num(probs, nan=0.0)
    out = probs @ vf  # [Hq, Nq, D]
    return out.transpose(0, 1), lse.transpose(0, 1)


# ----------------------------------------------------------------------------- references


def paged_prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                seq_lens: torch.Tensor, max_query_len: int,
                                scale: float) -> torch.Tensor:
    """Causal attention of new tokens over their sequences' cached K/V (new K/V already written).

    q [T, Hq, D] packed by sequence; cu_seqlens_q [B+1] int32; seq_lens [B] int32 = tokens in
    the cache for each sequence including the new ones; query i of sequence b sits at position
    seq_lens[b] - q_len_b + i and sees keys 0..that position. Returns [T, Hq, D] in q.dtype.
    """
    del max_query_len  # only the kernels need a grid bound
    out = torch.empty_like(q)
    starts = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b in range(len(lens)):
        s, e = starts[b], starts[b + 1]
        if e == s:
            continue
        k, v = gather_sequence_kv(k_cache, v_cache, block_tables[b], lens[b])
        q_pos = torch.arange(lens[b] - (e - s), lens[b], device=q.device)
        mask = torch.arange(lens[b], device=q.device)[None, :] <= q_pos[:, None]
        o, _ = _attend(q[s:e], k, v, mask, scale)
        out[s:e] = o.to(q.dtype)
    return out


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor,
                               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Nq queries per sequence over its first context_lens[b] cached keys, no mask.

    q [B, Nq, Hq, D]; context_lens [B] int32 (0 allowed: output 0, lse -inf).
    Returns out [B, Nq, Hq, D] (fp32) and lse [B, Nq, Hq] (fp32).
    """
    bsz, nq, hq, d = q.shape
    out = torch.zeros(bsz, nq, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((bsz, nq, hq), float("-inf"), dtype=torch.float32, device=q.device)
    for b, n in enumerate(context_lens.tolist()):
        if n == 0:
            continue
        k, v = gather_sequence_kv(k_cache, v_cache, block_tables[b], n)
        out[b], lse[b] = _attend(q[b], k, v, None, scale)
    return out, lse


def tree_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       ancestor_bits: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Tree queries over tree K/V: query i sees key j when bit j of ancestor_bits[b, i] is set.

    q [B, Nq, Hq, D], k/v [B, Nk, Hkv, D] with Nk <= 64, ancestor_bits [B, Nq] int64. In
    verification Nq = Nk (the tree's nodes, each with its own bit); the draft head queries one
    depth's frontier against every node drafted so far (Nq < Nk). Returns out [B, Nq, Hq, D]
    and lse [B, Nq, Hq] (fp32; lse -inf where no key is visible).
    """
    bsz, nq, hq, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    bit = torch.ones((), dtype=torch.int64, device=q.device) << torch.arange(nk, device=q.device)
    mask = (ancestor_bits[..., None] & bit) != 0  # [B, Nq, Nk]
    # A key no query sees may be a slot left by an earlier step (the drafter's side buffers keep
    # a padding row's values): never read, as a zero weight times a NaN there would be NaN.
    v = torch.where(mask.any(1)[..., None, None], v, 0)
    group = hq // hkv
    qf = q.float().view(bsz, nq, hkv, group, d)
    scores = torch.einsum("bqhgd,bkhd->bhgqk", qf, k.float()) * scale
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G, Nq]
    probs = torch.exp(scores - lse[..., None].clamp_min(-1e30)).nan_to_num(0.0)
    out = torch.einsum("bhgqk,bkhd->bqhgd", probs, v.float()).reshape(bsz, nq, hq, d)
    return out, lse.permute(0, 3, 1, 2).reshape(bsz, nq, hq)


def merge_attention_states_ref(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                               lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the union of two key sets from the two partial results.

    out_* [..., H, D], lse_* [..., H]. A side with lse = -inf (no keys) contributes nothing.
    Returns out (fp32) and lse (fp32).
    """
    lse_a, lse_b = lse_a.float(), lse_b.float()
    m = torch.maximum(lse_a, lse_b)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa = torch.exp(lse_a - m_safe)
    wb = torch.exp(lse_b - m_safe)
    total = wa + wb
    lse = m_safe + torch.log(total)
    denom = torch.where(total > 0, total, torch.ones_like(total))
    out = (out_a.float() * wa[..., None] + out_b.float() * wb[..., None]) / denom[..., None]
    return out, lse


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def two_pass_tree_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_tables: torch.Tensor, prefix_lens: torch.Tensor,
                                k_tree: torch.Tensor, v_tree: torch.Tensor,
                                ancestor_bits: torch.Tensor, scale: float) -> torch.Tensor:
    """Tree verification attention built from the references: prefix pass + tree pass + merge.

    q [B, N, Hq, D] (tree queries); prefix_lens [B] int32 = cached tokens before the tree;
    k_tree/v_tree [B, N, Hkv, D]; ancestor_bits [B, N] int64. Returns [B, N, Hq, D] in q.dtype.
    """
    out_p, lse_p = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, prefix_lens, scale)
    out_t, lse_t = tree_attention_ref(q, k_tree, v_tree, ancestor_bits, scale)
    out, _ = merge_attention_states_ref(out_p, lse_p, out_t, lse_t)
    return out.to(q.dtype)


def tree_attention_sdpa_masked(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, prefix_lens: torch.Tensor,
                               k_tree: torch.Tensor, v_tree: torch.Tensor,
                               ancestor_bits: torch.Tensor, scale: float, *,
                               repeat_kv: bool = False) -> torch.Tensor:
    """One-shot baseline: gather prefix + tree K/V, run SDPA under an explicit boolean mask.

    Same arguments and result as ``two_pass_tree_attention``. Gathers every block of each
    table row (entries past a sequence's prefix may hold any index; they are clamped and
    masked), so it has no host synchronisation. ``repeat_kv`` expands K/V to Hq heads instead
    of relying on SDPA's ``enable_gqa`` (which may pick a slower backend with a mask).
    A query that sees no key at all gives NaN here (SDPA's convention), unlike the other ops.
    """
    bsz, n, hq, d = q.shape
    hkv = k_cache.shape[2]
    tables = block_tables.long().clamp(0, k_cache.shape[0] - 1)
    k_prefix = k_cache[tables].reshape(bsz, -1, hkv, d)  # [B, max_keys, Hkv, D]
    v_prefix = v_cache[tables].reshape(bsz, -1, hkv, d)
    max_keys = k_prefix.shape[1]
    # [B, Hkv, max_keys + N, D]
    k_all = torch.cat([k_prefix, k_tree.to(k_prefix.dtype)], dim=1).transpose(1, 2)
    v_all = torch.cat([v_prefix, v_tree.to(v_prefix.dtype)], dim=1).transpose(1, 2)
    key_pos = torch.arange(max_keys, device=q.device)
    prefix_mask = key_pos[None, :] < prefix_lens.long()[:, None]  # [B, max_keys]
    bit = torch.ones((), dtype=torch.int64, device=q.device) << torch.arange(n, device=q.device)
    tree_mask = (ancestor_bits[..., None] & bit) != 0  # [B, N, N]
    mask = torch.cat([prefix_mask[:, None, :].expand(bsz, n, max_keys), tree_mask], dim=-1)
    qt = q.transpose(1, 2)  # [B, Hq, N, D]
    if repeat_kv and hq != hkv:
        k_all = k_all.repeat_interleave(hq // hkv, dim=1)
        v_all = v_all.repeat_interleave(hq // hkv, dim=1)
    gqa = {"enable_gqa": True} if k_all.shape[1] != hq else {}
    out = torch.nn.functional.scaled_dot_product_attention(
        qt, k_all, v_all, attn_mask=mask[:, None], scale=scale, **gqa)
    return out.transpose(1, 2).contiguous()


# ----------------------------------------------------------------------------- Triton kernels
#
# Conventions shared by the kernels:
#  * scores are kept in log2 units (scaled by scale * log2(e)) so exp2 can be used; log-sum-exps
#    are converted back to natural log when stored.
#  * a row that has seen no key keeps m = -inf; m_use replaces it by 0 so that exp2(-inf - 0) = 0
#    instead of NaN, and such rows end with out = 0 and lse = -inf (as in the references).
#  * paged keys are gathered per key (block id = table[key // BLOCK_SIZE]) so a key tile may span
#    several cache blocks; the key tile width does not depend on the cache block size.
#  * query rows of the decode/tree kernels pack (query, head-in-group) pairs: row r is query
#    r // GROUP of head kv_head * GROUP + r % GROUP, so one program loads a KV head's K/V once
#    for all the query heads that share it.

_LOG2E = 1.4426950408889634  # kernels use exp2; lse is stored in natural-log units


@_jit
def _softmax_step(m_i, l_i, s):
    """One tile of scores s [rows, keys] (log2 units, -inf where hidden) into an online softmax:
    the new running max and sum, the factor alpha that rescales the old accumulator, and the
    tile's weights p. A row that has seen no key keeps max -inf and sum 0."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    return m_new, alpha, p, l_i * alpha + tl.sum(p, 1)


@_jit
def _query_rows(q_ptr, num_queries, row_tile, kv_head, seq, stride_qb, stride_qn, stride_qh,
                GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """One row tile of one KV head: its queries [BLOCK_M, HEAD_DIM], their query index and head."""
    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    query = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_qb + query[:, None] * stride_qn + head[:, None] * stride_qh
                + offs_d[None, :], mask=(query < num_queries)[:, None], other=0.0)
    return q, query, head


@_jit
def _empty_state(BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """An online-softmax state that has seen no key: max -inf, sum 0, accumulator 0."""
    return (tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32),
            tl.zeros([BLOCK_M, HEAD_DIM], tl.float32))


@_jit
def _cached_keys(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table, key_start, key_end, last_key, kv_head,
                 scale_log2, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                 CAUSAL: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                 MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The rows' online-softmax state (running max m_i in log2 units, sum l_i, unnormalised acc)
    carried over the cached keys [key_start, key_end) of one KV head (``table``: the sequence's
    block table row). CAUSAL: row r sees only the keys at positions <= last_key[r] (its own, in
    a prefill); otherwise every key in the range, and last_key is not read (a constexpr branch,
    so the decode kernels compile without the compare)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start in range(key_start, key_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        key_ok = offs_n < key_end
        blocks = tl.load(table + offs_n // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        slots = offs_n % BLOCK_SIZE
        k = tl.load(k_cache_ptr + blocks[:, None] * stride_kb + slots[:, None] * stride_kt
                    + kv_head * stride_kh + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        s = tl.dot(q.to(MMA_DTYPE), tl.trans(k).to(MMA_DTYPE), input_precision=DOT_PRECISION)
        s = s * scale_log2
        if CAUSAL:
            visible = key_ok[None, :] & (offs_n[None, :] <= last_key[:, None])
        else:
            visible = key_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new, alpha, p, l_i = _softmax_step(m_i, l_i, s)
        v = tl.load(v_cache_ptr + blocks[:, None] * stride_vb + slots[:, None] * stride_vt
                    + kv_head * stride_vh + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        pv = tl.dot(p.to(v.dtype).to(MMA_DTYPE), v.to(MMA_DTYPE), input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return m_i, l_i, acc


@_jit
def _tree_keys(q, query, m_i, l_i, acc, k_ptr, v_ptr, bits_ptr, num_nodes, num_keys, kv_head, seq, scale_log2,
               stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_bb,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
               MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The rows' online-softmax state carried over the (<= 64) tree keys, each row seeing only
    its node's ancestors (bit j of ancestor_bits[node]: key j is visible)."""
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    key_ok = offs_n < num_keys
    bits = tl.load(bits_ptr + seq * stride_bb + query, mask=query < num_nodes, other=0)
    visible = ((bits[:, None] >> offs_n[None, :].to(tl.int64)) & 1) != 0
    visible = visible & key_ok[None, :]
    # Keys no row sees (a drafter side slot left by an earlier step's padding row) are not read:
    # a zero weight times a NaN there would be NaN.
    seen = tl.max(visible.to(tl.int32), axis=0) > 0
    k = tl.load(k_ptr + seq * stride_kb + offs_n[:, None] * stride_kn + kv_head * stride_kh
                + offs_d[None, :], mask=seen[:, None], other=0.0)
    v = tl.load(v_ptr + seq * stride_vb + offs_n[:, None] * stride_vn + kv_head * stride_vh
                + offs_d[None, :], mask=seen[:, None], other=0.0)
    s = tl.dot(q.to(MMA_DTYPE), tl.trans(k).to(MMA_DTYPE), input_precision=DOT_PRECISION)
    s = s * scale_log2
    s = tl.where(visible, s, float("-inf"))
    m_new, alpha, p, l_i = _softmax_step(m_i, l_i, s)
    pv = tl.dot(p.to(v.dtype).to(MMA_DTYPE), v.to(MMA_DTYPE), input_precision=DOT_PRECISION)
    return m_new, l_i, acc * alpha[:, None] + pv


@_jit
def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, cu_seqlens_ptr, seq_lens_ptr, out_ptr,
    scale_log2, max_keys,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid (query tiles, B, Hq): BLOCK_M queries of one sequence and one query head."""
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP

    q_start = tl.load(cu_seqlens_ptr + seq)
    q_len = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len  # cache position of the sequence's first new token

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_len
    tok = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    q_pos = first_pos + offs_m

    # Causal limit: this tile's last valid query sees keys up to its own position; an empty
    # tile (past q_len) loops over nothing and stores nothing.
    key_end = first_pos + tl.minimum((tile + 1) * BLOCK_M, q_len)
    key_end = tl.where(tile * BLOCK_M < q_len, key_end, 0)
    key_end = tl.minimum(key_end, max_keys)

    m_i, l_i, acc = _empty_state(BLOCK_M, HEAD_DIM)
    m_i, l_i, acc = _cached_keys(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_bt,
                                 0, key_end, q_pos, kv_head, scale_log2,
                                 stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                                 True, BLOCK_SIZE, HEAD_DIM, BLOCK_N, MMA_DTYPE, DOT_PRECISION)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@_jit
def _store_state(m_i, l_i, acc, query, head, num_rows, seq, out_ptr, lse_ptr,
                 stride_ob, stride_on, stride_oh, stride_lb, stride_ln, HEAD_DIM: tl.constexpr):
    """The rows' normalised output (in out_ptr's dtype) and natural-log log-sum-exp; a row that
    saw no key gets 0 and -inf. Rows with query >= num_rows are not stored."""
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    offs_d = tl.arange(0, HEAD_DIM)
    store_ok = query < num_rows
    tl.store(out_ptr + seq * stride_ob + query[:, None] * stride_on + head[:, None] * stride_oh
             + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=store_ok[:, None])
    tl.store(lse_ptr + seq * stride_lb + query * stride_ln + head, lse, mask=store_ok)


@_jit
def _paged_decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, part_out_ptr, part_lse_ptr,
    k_tree_ptr, v_tree_ptr, bits_ptr, tree_out_ptr, tree_lse_ptr,
    scale_log2, max_keys, num_queries, split_size, num_splits, num_tree_keys,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_pob, stride_pos, stride_pon, stride_poh,
    stride_plb, stride_pls, stride_pln,
    stride_tkb, stride_tkn, stride_tkh,
    stride_tvb, stride_tvn, stride_tvh,
    stride_bitsb,
    stride_tob, stride_ton, stride_toh,
    stride_tlb, stride_tln,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_TILES: tl.constexpr,
    HAS_TREE: tl.constexpr, TREE_BLOCK_N: tl.constexpr, ONE_CHUNK: tl.constexpr,
    MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid (ROW_TILES * (splits + HAS_TREE), Hkv, B): one row tile of one KV head over one chunk
    of cached keys, its output and log-sum-exp into part_out [B, S, Nq, Hq, D] / part_lse
    [B, S, Nq, Hq]; with HAS_TREE, the programs past the last chunk run the tree pass of the same
    rows into tree_out / tree_lse, in the same launch. Chunks past the context are skipped and
    never read back, except chunk 0 which always writes (out 0, lse -inf for an empty context).

    ONE_CHUNK (the keys are one chunk, grid (ROW_TILES, Hkv, B)): each program walks every
    cached key and then, with HAS_TREE, the tree keys, and writes the finished output and
    log-sum-exp to part_out / part_lse, which are then the result in its dtype: no merge."""
    pid = tl.program_id(0)
    split = pid // ROW_TILES
    row_tile = pid % ROW_TILES
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)
    if HAS_TREE and not ONE_CHUNK:
        tree_alone = split == num_splits  # the programs past the last chunk: the tree pass
    else:
        tree_alone = split < 0  # never: a runtime False, as the `if` below needs one type on both paths
    q, query, head = _query_rows(q_ptr, num_queries, row_tile, kv_head, seq, stride_qb, stride_qn, stride_qh,
                                 GROUP, HEAD_DIM, BLOCK_M)
    m_i, l_i, acc = _empty_state(BLOCK_M, HEAD_DIM)
    if tree_alone:
        m_i, l_i, acc = _tree_keys(q, query, m_i, l_i, acc, k_tree_ptr, v_tree_ptr, bits_ptr, num_queries,
                                   num_tree_keys, kv_head, seq, scale_log2, stride_tkb, stride_tkn, stride_tkh,
                                   stride_tvb, stride_tvn, stride_tvh, stride_bitsb,
                                   HEAD_DIM, TREE_BLOCK_N, MMA_DTYPE, DOT_PRECISION)
        _store_state(m_i, l_i, acc, query, head, num_queries, seq, tree_out_ptr, tree_lse_ptr,
                     stride_tob, stride_ton, stride_toh, stride_tlb, stride_tln, HEAD_DIM)
    else:  # one chunk of cached keys (and, ONE_CHUNK with a tree, the tree keys after them)
        ctx = tl.minimum(tl.maximum(tl.load(context_lens_ptr + seq), 0), max_keys)
        split_start = split * split_size
        m_i, l_i, acc = _cached_keys(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_bt,
                                     split_start, tl.minimum(split_start + split_size, ctx),
                                     ctx, kv_head,  # last_key = ctx, unread where not CAUSAL
                                     scale_log2, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                                     False, BLOCK_SIZE, HEAD_DIM, BLOCK_N, MMA_DTYPE, DOT_PRECISION)
        if HAS_TREE and ONE_CHUNK:
            m_i, l_i, acc = _tree_keys(q, query, m_i, l_i, acc, k_tree_ptr, v_tree_ptr, bits_ptr, num_queries,
                                       num_tree_keys, kv_head, seq, scale_log2, stride_tkb, stride_tkn, stride_tkh,
                                       stride_tvb, stride_tvn, stride_tvh, stride_bitsb,
                                       HEAD_DIM, TREE_BLOCK_N, MMA_DTYPE, DOT_PRECISION)
        # Split 0 always stores; later splits store only when they start inside the context.
        # (Folded into a row bound: `tensor & scalar` masks are mistyped by the Triton interpreter.)
        store_rows = tl.where((split == 0) | (split_start < ctx), num_queries, 0)
        _store_state(m_i, l_i, acc, query, head, store_rows, seq, part_out_ptr + split * stride_pos,
                     part_lse_ptr + split * stride_pls, stride_pob, stride_pon, stride_poh, stride_plb, stride_pln,
                     HEAD_DIM)


@_jit
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, context_lens_ptr, extra_out_ptr, extra_lse_ptr, out_ptr, lse_ptr,
    max_keys, num_rows, split_size,
    stride_pob, stride_pos, stride_plb, stride_pls,
    HEAD_DIM: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
):
    """Grid (Nq * Hq, B): merge one row's live split partials (and an optional extra state).

    part_out [B, S, R, D], part_lse [B, S, R]; extra_out/out [B, R, D], extra_lse/lse [B, R]
    (R = Nq * Hq rows, all contiguous in R and D). Only the splits that start inside the
    context are read, at least split 0.
    """
    row = tl.program_id(0)
    seq = tl.program_id(1)
    ctx = tl.minimum(tl.maximum(tl.load(context_lens_ptr + seq), 0), max_keys)
    n_live = tl.maximum((ctx + split_size - 1) // split_size, 1)
    offs_s = tl.arange(0, SPLIT_CHUNK)
    offs_d = tl.arange(0, HEAD_DIM)
    lse_base = part_lse_ptr + seq * stride_plb + row
    out_base = part_out_ptr + seq * stride_pob + row * HEAD_DIM
    state = seq.to(tl.int64) * num_rows + row  # index of this row in out / lse / extra

    m_vec = tl.full([SPLIT_CHUNK], float("-inf"), tl.float32)
    for s0 in range(0, n_live, SPLIT_CHUNK):
        sp = s0 + offs_s
        m_vec = tl.maximum(m_vec, tl.load(lse_base + sp * stride_pls, mask=sp < n_live,
                                          other=float("-inf")))
    m = tl.max(m_vec, 0)
    if HAS_EXTRA:
        m = tl.maximum(m, tl.load(extra_lse_ptr + state))
    m_use = tl.where(m == float("-inf"), 0.0, m)

    acc = tl.zeros([SPLIT_CHUNK, HEAD_DIM], tl.float32)
    w_acc = tl.zeros([SPLIT_CHUNK], tl.float32)
    for s0 in range(0, n_live, SPLIT_CHUNK):
        sp = s0 + offs_s
        sp_ok = sp < n_live
        w = tl.exp(tl.load(lse_base + sp * stride_pls, mask=sp_ok, other=float("-inf")) - m_use)
        o = tl.load(out_base + sp[:, None] * stride_pos + offs_d[None, :], mask=sp_ok[:, None],
                    other=0.0)
        acc += w[:, None] * o
        w_acc += w
    out = tl.sum(acc, 0)
    total = tl.sum(w_acc, 0)
    if HAS_EXTRA:
        w_extra = tl.exp(tl.load(extra_lse_ptr + state) - m_use)
        out += w_extra * tl.load(extra_out_ptr + state * HEAD_DIM + offs_d)
        total += w_extra
    out = out / tl.where(total > 0, total, 1.0)
    lse = tl.where(total > 0, m_use + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    tl.store(out_ptr + state * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty))
    tl.store(lse_ptr + state, lse)


@_jit
def _tree_attention_kernel(
    q_ptr, k_ptr, v_ptr, bits_ptr, out_ptr, lse_ptr,
    scale_log2, num_nodes, num_keys,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_bb,
    stride_ob, stride_on, stride_oh,
    stride_lb, stride_ln,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid (row tiles, Hkv, B): the tree pass alone (``tree_attention``): one row tile of one KV
    head against all (<= 64) tree keys, output and lse of the rows."""
    kv_head, seq = tl.program_id(1), tl.program_id(2)
    q, node, head = _query_rows(q_ptr, num_nodes, tl.program_id(0), kv_head, seq, stride_qb, stride_qn, stride_qh,
                                GROUP, HEAD_DIM, BLOCK_M)
    m_i, l_i, acc = _empty_state(BLOCK_M, HEAD_DIM)
    m_i, l_i, acc = _tree_keys(q, node, m_i, l_i, acc, k_ptr, v_ptr, bits_ptr, num_nodes, num_keys, kv_head, seq,
                               scale_log2, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_bb,
                               HEAD_DIM, BLOCK_N, MMA_DTYPE, DOT_PRECISION)
    _store_state(m_i, l_i, acc, node, head, num_nodes, seq, out_ptr, lse_ptr,
                 stride_ob, stride_on, stride_oh, stride_lb, stride_ln, HEAD_DIM)


@_jit
def _merge_states_kernel(
    out_a_ptr, lse_a_ptr, out_b_ptr, lse_b_ptr, out_ptr, lse_ptr, num_rows, head_dim,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (cdiv(rows, BLOCK_R),): rows of [rows, head_dim] states, all contiguous."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < num_rows
    mask = row_ok[:, None] & (offs_d[None, :] < head_dim)
    lse_a = tl.load(lse_a_ptr + rows, mask=row_ok, other=float("-inf")).to(tl.float32)
    lse_b = tl.load(lse_b_ptr + rows, mask=row_ok, other=float("-inf")).to(tl.float32)
    m = tl.maximum(lse_a, lse_b)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w_a = tl.exp(lse_a - m_use)
    w_b = tl.exp(lse_b - m_use)
    total = w_a + w_b
    idx = rows.to(tl.int64)[:, None] * head_dim + offs_d[None, :]
    o_a = tl.load(out_a_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    o_b = tl.load(out_b_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    out = (o_a * w_a[:, None] + o_b * w_b[:, None]) / tl.where(total > 0, total, 1.0)[:, None]
    lse = tl.where(total > 0, m_use + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    tl.store(out_ptr + idx, out, mask=mask)
    tl.store(lse_ptr + rows, lse, mask=row_ok)


# ----------------------------------------------------------------------------- launchers

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_TREE_NODES = 64  # one int64 ancestor bitmask per node
_MAX_ROW_TILE = 128  # query rows per program in the decode / tree kernels
_DEFAULT_NUM_SMS = 132  # H100 SXM; used only to size the default split when no GPU is visible


def _require_triton(tensor: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("triton is not installed: use the *_ref functions instead")
    _check(tensor.is_cuda or _interpreted(_merge_states_kernel),
           f"Triton kernels need CUDA tensors (got {tensor.device}); "
           "set TRITON_INTERPRET=1 to run them on the CPU")


def _check_tensor(name: str, t: torch.Tensor, ndim: int, device: torch.device | None,
                  dtypes: tuple[torch.dtype, ...], strided_rows: bool = False) -> None:
    """device None: t is q itself (the device the others must match)."""
    _check(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    device = t.device if device is None else device
    _check(t.dim() == ndim, f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    _check(t.dtype in dtypes,
           f"{name} dtype must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    _check(t.device == device, f"{name} is on {t.device}, expected {device} (the device of q)")
    if strided_rows:  # the kernel takes the outer strides; only the last dim must be dense
        _check(t.stride(-1) == 1, f"{name} must have unit stride in its last dim (shape {tuple(t.shape)}, "
                                  f"strides {t.stride()})")
    else:
        _check(t.is_contiguous(), f"{name} must be contiguous (shape {tuple(t.shape)}, "
                                  f"strides {t.stride()})")


def _check_heads(q: torch.Tensor, kv: torch.Tensor, kv_name: str) -> int:
    """Validates head_dim and GQA grouping; returns the group size Hq // Hkv."""
    hq, d = q.shape[-2], q.shape[-1]
    hkv, dk = kv.shape[-2], kv.shape[-1]
    _check(dk == d, f"head_dim mismatch: q has {d}, {kv_name} has {dk}")
    _check(16 <= d <= 256 and d & (d - 1) == 0,
           f"head_dim must be a power of two in [16, 256], got {d}")
    _check(hkv > 0 and hq % hkv == 0,
           f"query heads ({hq}) must be a multiple of {kv_name} heads ({hkv})")
    _check(kv.dtype == q.dtype, f"{kv_name} dtype {kv.dtype} differs from q dtype {q.dtype}")
    return hq // hkv


def _check_paged_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       block_tables: torch.Tensor, batch: int) -> tuple[int, int]:
    """Validates the cache pair and block tables; returns (group, block_size)."""
    _check_tensor("k_cache", k_cache, 4, q.device, _FLOAT_DTYPES)
    _check_tensor("v_cache", v_cache, 4, q.device, _FLOAT_DTYPES)
    _check(k_cache.shape == v_cache.shape,
           f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} shapes differ")
    group = _check_heads(q, k_cache, "k_cache")
    _check(v_cache.dtype == k_cache.dtype, f"v_cache dtype {v_cache.dtype} differs from k_cache")
    block_size = k_cache.shape[1]
    _check(block_size >= 16 and block_size & (block_size - 1) == 0,
           f"block_size (k_cache.shape[1]) must be a power of two >= 16, got {block_size}")
    _check_tensor("block_tables", block_tables, 2, q.device, (torch.int32,))
    _check(block_tables.shape[0] == batch,
           f"block_tables has {block_tables.shape[0]} rows, expected batch size {batch}")
    _check(block_tables.shape[1] > 0, "block_tables must have at least one column")
    return group, block_size


def _interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tree_strides(k: torch.Tensor, v: torch.Tensor, bits: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor) -> tuple[int, ...]:
    """The tree pass's strides in its kernels' argument order: tree K and V [B, Nk, Hkv, D],
    ancestor bits [B, N], output [B, N, Hq, D] and lse [B, N, Hq] (the last dims contiguous)."""
    return (*k.stride()[:3], *v.stride()[:3], bits.stride(0), *out.stride()[:3], *lse.stride()[:2])


def _row_block(rows: int) -> int:
    """Power-of-two row tile >= 16 (tl.dot's minimum), at most _MAX_ROW_TILE."""
    return min(_MAX_ROW_TILE, max(16, 1 << (max(rows, 1) - 1).bit_length()))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_NUM_SMS


def default_decode_split_size(batch: int, num_kv_heads: int, rows_per_kv_head: int,
                              max_keys: int, block_size: int, num_sms: int) -> int:
    """Keys per split-K chunk for paged_decode_attention, from static shapes only.

    Aims at about two programs per SM: splits = cdiv(2 * SMs, B * Hkv * row tiles), keys split
    evenly among them, rounded up to a multiple of the granule (and of block_size) and capped
    at 2048 so a block table much wider than the live context still leaves some parallelism.
    The granule is 64 keys (one key tile) for plain decode, whose partials are tiny, so a
    single sequence spreads over many SMs, and for tree queries of fewer than 8 units (batch 1
    or 2 of a small model), bound by the latency of the keys each program walks; 256 keys for
    tree queries of more units, whose partials are as large as their keys. SmolLM2's shape, 16
    and 33 nodes, H100 (``benchmarks/bench_tree_split.py``): at batch 1 (3 and 6 units) 64 took
    5.8-7.7 us a layer where 256 took 6.7-10.4; at batch 16 (48 and 96 units) 64 was the slowest
    (14.9-33.7 us against 10.1-21.2 for 256). Large batches get few, long chunks either way.
    """
    row_tiles = _cdiv(rows_per_kv_head, _row_block(rows_per_kv_head))
    units = max(1, batch * num_kv_heads * row_tiles)
    splits = max(1, _cdiv(2 * num_sms, units))
    granule = max(64 if rows_per_kv_head <= 16 or units < 8 else 256, block_size)
    split = max(1, _cdiv(_cdiv(max_keys, splits), granule)) * granule
    return min(split, max(2048, granule))


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            seq_lens: torch.Tensor, max_query_len: int,
                            scale: float) -> torch.Tensor:
    """Triton version of ``paged_prefill_attention_ref`` (same arguments and result).

    max_query_len must be >= every sequence's query length (a host int; it sizes the grid).
    """
    _check_tensor("q", q, 3, None, _FLOAT_DTYPES, strided_rows=True)  # e.g. a view of the qkv output
    _require_triton(q)
    _check_tensor("cu_seqlens_q", cu_seqlens_q, 1, q.device, (torch.int32,))
    _check_tensor("seq_lens", seq_lens, 1, q.device, (torch.int32,))
    batch = seq_lens.shape[0]
    _check(cu_seqlens_q.shape[0] == batch + 1,
           f"cu_seqlens_q must have batch + 1 = {batch + 1} entries, got {cu_seqlens_q.shape[0]}")
    group, block_size = _check_paged_cache(q, k_cache, v_cache, block_tables, batch)
    _check(isinstance(max_query_len, int) and max_query_len >= 0,
           f"max_query_len must be a non-negative int, got {max_query_len!r}")
    out = torch.empty_like(q)
    if batch == 0 or max_query_len == 0 or q.shape[0] == 0:
        return out
    hq, d = q.shape[1], q.shape[2]
    block_m = 16 if max_query_len <= 16 else 64
    block_n = 32 if q.dtype == torch.float32 or d > 128 else 64
    grid = (_cdiv(max_query_len, block_m), batch, hq)
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out,
        scale * _LOG2E, block_tables.shape[1] * block_size,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_SIZE=block_size, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n,
        **mma_options(q.dtype, _paged_prefill_kernel),
        num_warps=4, num_stages=2,
    )
    return out


def _split_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                     split_size: int | None, out_dtype: torch.dtype, tree: tuple | None = None,
                     launch: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks inputs and runs the split kernel: out [B, Nq, Hq, D] in ``out_dtype`` and lse
    [B, Nq, Hq] of every query over its cached keys and, given ``tree`` = (k_tree, v_tree,
    ancestor_bits, group) (checked by the caller), the tree keys it may see. Keys of more than one
    chunk are merged by a second launch; keys of one chunk (large batches) are finished by the
    split kernel itself, tree keys included: one launch, no fp32 partials (Llama-3.1-8B's
    chain:3 verify at batch 64 spent 7.6 us a layer merging, H200). ``launch`` (benchmarks'
    sweeps): the key tile ``block_n``, ``num_warps`` and ``num_stages`` instead of the defaults."""
    _check_tensor("q", q, 4, None, _FLOAT_DTYPES, strided_rows=True)  # e.g. a view of the qkv output
    _require_triton(q)
    batch, nq, hq, d = q.shape
    _check_tensor("context_lens", context_lens, 1, q.device, (torch.int32,))
    _check(context_lens.shape[0] == batch,
           f"context_lens has {context_lens.shape[0]} entries, expected batch size {batch}")
    group, block_size = _check_paged_cache(q, k_cache, v_cache, block_tables, batch)
    hkv = hq // group
    max_keys = block_tables.shape[1] * block_size
    rows = nq * group  # query rows per KV head
    if split_size is None:
        split_size = default_decode_split_size(batch, hkv, rows, max_keys, block_size,
                                               _num_sms(q.device))
    _check(isinstance(split_size, int) and split_size > 0 and split_size % block_size == 0,
           f"split_size must be a positive multiple of block_size ({block_size}), "
           f"got {split_size!r}")
    num_splits = _cdiv(max_keys, split_size)
    one_chunk = num_splits == 1
    part_out = torch.empty(batch, num_splits, nq, hq, d, dtype=out_dtype if one_chunk else torch.float32,
                           device=q.device)
    part_lse = torch.empty(batch, num_splits, nq, hq, dtype=torch.float32, device=q.device)
    tree_alone = tree is not None and not one_chunk  # the tree pass as programs of its own
    tree_state = None
    if tree_alone:
        tree_state = (torch.empty(batch, nq, hq, d, dtype=torch.float32, device=q.device),
                      torch.empty(batch, nq, hq, dtype=torch.float32, device=q.device))
    if batch > 0 and nq > 0:
        k_tree, v_tree, bits, _ = tree if tree is not None else (q, q, context_lens, None)  # placeholders: unread
        tree_out, tree_lse = tree_state if tree_alone else (part_out[:, 0], part_lse[:, 0])
        block_m = _row_block(rows)
        row_tiles = _cdiv(rows, block_m)
        # Key tile: the largest power of two <= 64 dividing split_size (>= 16 since block_size is).
        block_n = min(64, split_size & -split_size)
        if q.dtype == torch.float32 or d > 128:
            block_n = min(block_n, 32)
        # A 16-row tile over one chunk runs on 2 warps: more programs fit an SM. Llama-3.1-8B's
        # chain:3 verify at batch 64 (H100): 52.5 us a layer against 60.5 on 4 warps in a sweep,
        # 54.1 against 64.5 inside the step (H200: 40.8-41.1 against 53.9); plain decode level
        # (49.6 against 49.7); with more chunks (batch 16) 2 warps lost 6-10 %.
        warps = 8 if block_m >= 128 else 2 if one_chunk and block_m == 16 else 4
        tiles = {"block_n": block_n, "num_warps": warps, "num_stages": 2, **(launch or {})}
        grid = (row_tiles * (num_splits + tree_alone), hkv, batch)
        _paged_decode_split_kernel[grid](
            q, k_cache, v_cache, block_tables, context_lens, part_out, part_lse,
            k_tree, v_tree, bits, tree_out, tree_lse,
            scale * _LOG2E, max_keys, nq, split_size, num_splits, k_tree.shape[1],
            q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            block_tables.stride(0),
            part_out.stride(0), part_out.stride(1), part_out.stride(2), part_out.stride(3),
            part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
            *_tree_strides(k_tree, v_tree, bits, tree_out, tree_lse),
            GROUP=group, BLOCK_SIZE=block_size, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=tiles["block_n"],
            ROW_TILES=row_tiles, HAS_TREE=tree is not None, TREE_BLOCK_N=_tree_key_block(k_tree.shape[1]),
            ONE_CHUNK=one_chunk, **mma_options(q.dtype, _paged_decode_split_kernel),
            num_warps=tiles["num_warps"], num_stages=tiles["num_stages"],
        )
    if one_chunk:  # chunk 0 always writes: the partial is the answer
        return part_out.view(batch, nq, hq, d), part_lse.view(batch, nq, hq)
    return _merge_splits(part_out, part_lse, context_lens, max_keys, split_size, out_dtype, tree_state)


def _merge_splits(part_out: torch.Tensor, part_lse: torch.Tensor, context_lens: torch.Tensor,
                  max_keys: int, split_size: int, out_dtype: torch.dtype,
                  extra: tuple[torch.Tensor, torch.Tensor] | None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduces [B, S, Nq, Hq, D] partials (plus an optional [B, Nq, Hq, D] state) by LSE."""
    batch, num_splits, nq, hq, d = part_out.shape
    out = torch.empty(batch, nq, hq, d, dtype=out_dtype, device=part_out.device)
    lse = torch.empty(batch, nq, hq, dtype=torch.float32, device=part_out.device)
    if batch == 0 or nq == 0:
        return out, lse
    extra_out, extra_lse = extra if extra is not None else (out, lse)  # dummies when unused
    _merge_splits_kernel[(nq * hq, batch)](
        part_out, part_lse, context_lens, extra_out, extra_lse, out, lse,
        max_keys, nq * hq, split_size,
        part_out.stride(0), part_out.stride(1), part_lse.stride(0), part_lse.stride(1),
        HEAD_DIM=d, SPLIT_CHUNK=min(16, triton.next_power_of_2(num_splits)),
        HAS_EXTRA=extra is not None,
        num_warps=1 if d <= 64 else 2,
    )
    return out, lse


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           split_size: int | None = None,
                           out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``paged_decode_attention_ref`` (split-K, CUDA-graph safe).

    Splits the keys [0, block_tables.shape[1] * block_size) into chunks of ``split_size``
    (a multiple of block_size; default from ``default_decode_split_size``); the split count
    depends on shapes only, and chunks beyond context_lens[b] do no work on the device.
    Returns out [B, Nq, Hq, D] (``out_dtype``: the decode step asks for the model dtype, which
    the kernels write directly) and lse [B, Nq, Hq] (fp32).
    """
    return _split_attention(q, k_cache, v_cache, block_tables, context_lens, scale, split_size, out_dtype)


def _check_tree_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       ancestor_bits: torch.Tensor, k_name: str, v_name: str) -> int:
    """Validates tree-pass inputs; returns the GQA group size."""
    _check_tensor("q", q, 4, None, _FLOAT_DTYPES, strided_rows=True)  # e.g. a view of the qkv output
    _require_triton(q)
    _check_tensor(k_name, k, 4, q.device, _FLOAT_DTYPES, strided_rows=True)
    _check_tensor(v_name, v, 4, q.device, _FLOAT_DTYPES, strided_rows=True)
    _check(k.shape == v.shape,
           f"{k_name} {tuple(k.shape)} and {v_name} {tuple(v.shape)} shapes differ")
    _check(v.dtype == k.dtype, f"{v_name} dtype {v.dtype} differs from {k_name} dtype {k.dtype}")
    group = _check_heads(q, k, k_name)
    batch, n = q.shape[:2]
    _check(k.shape[0] == batch,
           f"{k_name} must be [B, Nk, Hkv, D] with B = {batch} as in q, got {tuple(k.shape)}")
    _check(k.shape[1] <= _MAX_TREE_NODES,
           f"tree attention supports at most {_MAX_TREE_NODES} tree keys, got {k.shape[1]}")
    _check_tensor("ancestor_bits", ancestor_bits, 2, q.device, (torch.int64,))
    _check(tuple(ancestor_bits.shape) == (batch, n),
           f"ancestor_bits must have shape {(batch, n)}, got {tuple(ancestor_bits.shape)}")
    return group


def _tree_key_block(num_keys: int) -> int:
    """All tree keys in one tile (>= 16 for tl.dot)."""
    return max(16, 1 << (max(num_keys, 1) - 1).bit_length())


def _tree_pass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ancestor_bits: torch.Tensor,
               scale: float, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch, n, hq, d = q.shape
    out = torch.empty(batch, n, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, n, hq, dtype=torch.float32, device=q.device)
    if batch == 0 or n == 0:
        return out, lse
    rows = n * group
    block_m = _row_block(rows)
    row_tiles = _cdiv(rows, block_m)
    nk = k.shape[1]
    _tree_attention_kernel[(row_tiles, hq // group, batch)](
        q, k, v, ancestor_bits, out, lse,
        scale * _LOG2E, n, nk,
        q.stride(0), q.stride(1), q.stride(2),
        *_tree_strides(k, v, ancestor_bits, out, lse),
        GROUP=group, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=_tree_key_block(nk),
        **mma_options(q.dtype, _tree_attention_kernel),
        num_warps=8 if block_m >= 128 else 4,
    )
    return out, lse


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ancestor_bits: torch.Tensor,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``tree_attention_ref`` (N <= 64 nodes, CUDA-graph safe)."""
    group = _check_tree_inputs(q, k, v, ancestor_bits, "k", "v")
    return _tree_pass(q, k, v, ancestor_bits, scale, group)


def merge_attention_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                           lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``merge_attention_states_ref``: out_* [..., H, D], lse_* [..., H]."""
    _check(isinstance(out_a, torch.Tensor) and out_a.dim() >= 2,
           "out_a must be a tensor of shape [..., H, D]")
    _require_triton(out_a)
    ndim = out_a.dim()
    for name, t in (("out_a", out_a), ("out_b", out_b)):
        _check_tensor(name, t, ndim, out_a.device, _FLOAT_DTYPES)
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        _check_tensor(name, t, ndim - 1, out_a.device, _FLOAT_DTYPES)
    _check(out_a.shape == out_b.shape,
           f"out_a {tuple(out_a.shape)} and out_b {tuple(out_b.shape)} shapes differ")
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        _check(t.shape == out_a.shape[:-1],
               f"{name} must have shape {tuple(out_a.shape[:-1])} (out without D), "
               f"got {tuple(t.shape)}")
    d = out_a.shape[-1]
    out = torch.empty(out_a.shape, dtype=torch.float32, device=out_a.device)
    lse = torch.empty(lse_a.shape, dtype=torch.float32, device=out_a.device)
    rows = lse_a.numel()
    if rows == 0 or d == 0:
        return out, lse
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(64, 4096 // block_d))
    _merge_states_kernel[(_cdiv(rows, block_r),)](
        out_a, lse_a, out_b, lse_b, out, lse, rows, d, BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=4,
    )
    return out, lse


def two_pass_tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, prefix_lens: torch.Tensor,
                            k_tree: torch.Tensor, v_tree: torch.Tensor,
                            ancestor_bits: torch.Tensor, scale: float,
                            split_size: int | None = None) -> torch.Tensor:
    """Triton version of ``two_pass_tree_attention_ref`` (CUDA-graph safe).

    Pass 1: paged split-K attention of every tree query over its sequence's prefix_lens[b]
    cached keys. Pass 2: tree attention under the ancestor mask, run by extra programs of the
    same launch. The split reduction also merges pass 2's state, so the result is written once,
    in q.dtype: two launches. Where the prefix is one chunk (large batches), each program runs
    pass 2 after pass 1 in the same online softmax and writes the result: one launch.
    """
    group = _check_tree_inputs(q, k_tree, v_tree, ancestor_bits, "k_tree", "v_tree")
    _check(isinstance(k_cache, torch.Tensor) and k_cache.dim() == 4
           and k_cache.shape[2] == k_tree.shape[2],
           f"k_cache must be [num_blocks, block_size, Hkv, D] with the Hkv = {k_tree.shape[2]} "
           f"of k_tree, got {tuple(getattr(k_cache, 'shape', ()))}")
    _check(k_tree.dtype == k_cache.dtype,
           f"k_tree dtype {k_tree.dtype} differs from k_cache dtype {k_cache.dtype}")
    out, _ = _split_attention(q, k_cache, v_cache, block_tables, prefix_lens, scale, split_size, q.dtype,
                              (k_tree, v_tree, ancestor_bits, group))
    return out

