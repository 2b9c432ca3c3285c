"""Triton attention kernels vs their PyTorch references (CPU: run with TRITON_INTERPRET=1).

Unused cache slots and unused block-table columns point at NaN-filled memory, so a kernel that
reads a key it should have masked shows NaN instead of a slightly wrong number.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import DEVICE, needs_triton_kernels

from eaglespec.ops import attention as A


D = 64
BLOCK = 16
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


# ----------------------------------------------------------------------------- helpers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, gen, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


def _paged_cache(lens: list[int], hkv: int, dtype, gen, table_cols: int | None = None,
                 poison: float = float("nan")):
    """Random K/V cache with shuffled blocks for sequences of the given lengths.

    Returns k_cache, v_cache, block_tables [B, cols] int32. Every slot not holding a live token
    is ``poison``, and table columns past a sequence's blocks point at an all-poison block.
    """
    need = [(n + BLOCK - 1) // BLOCK for n in lens]
    cols = table_cols if table_cols is not None else max(max(need), 1)
    num_blocks = sum(need) + 3
    order = torch.randperm(num_blocks, generator=gen)
    poison_block = int(order[-1])
    tables = torch.full((len(lens), cols), poison_block, dtype=torch.int32)
    live = torch.zeros(num_blocks, BLOCK, dtype=torch.bool)
    next_block = 0
    for b, n in enumerate(lens):
        for j in range(need[b]):
            blk = int(order[next_block])
            next_block += 1
            tables[b, j] = blk
            used = min(BLOCK, n - j * BLOCK)
            live[blk, :used] = True
    k = torch.randn(num_blocks, BLOCK, hkv, D, generator=gen)
    v = torch.randn(num_blocks, BLOCK, hkv, D, generator=gen)
    k[~live] = poison
    v[~live] = poison
    return (k.to(DEVICE, dtype), v.to(DEVICE, dtype), tables.to(DEVICE))


def _ancestor_bits(parents: list[int]) -> list[int]:
    """Node i's bitmask: its own bit and its parent's mask (parents[0] = -1 for the root)."""
    bits: list[int] = []
    for i, p in enumerate(parents):
        bits.append((bits[p] if p >= 0 else 0) | (1 << i))
    return [b - (1 << 64) if b >= 1 << 63 else b for b in bits]  # as signed int64


def _random_tree_bits(batch: int, n: int, gen) -> torch.Tensor:
    rows = []
    for _ in range(batch):
        parents = [-1] + [int(torch.randint(0, i, (), generator=gen)) for i in range(1, n)]
        rows.append(_ancestor_bits(parents))
    return torch.tensor(rows, dtype=torch.int64, device=DEVICE)


def _i32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty / empty_like return NaN-filled float tensors, so an output element a kernel
    forgets to write (or a partial it reads without having written) shows up as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


def test_ancestor_bits_helper():
    # chain 0 <- 1 <- 2 and a sibling 3 of node 1
    assert _ancestor_bits([-1, 0, 1, 0]) == [0b1, 0b11, 0b111, 0b1001]
    assert _ancestor_bits(list(range(-1, 63)))[63] == -1  # full chain of 64: all bits set


# ----------------------------------------------------------------------------- prefill


@needs_triton_kernels
@pytest.mark.parametrize("dtype,hq,hkv", [(torch.float32, 2, 2), (torch.float32, 6, 2),
                                          (torch.bfloat16, 6, 2)])
def test_prefill_matches_reference(dtype, hq, hkv, poisoned_empty):
    gen = _gen(1)
    # (new tokens, tokens in cache incl. new): empty, one token after a prefix, many tokens
    # after a prefix, a fresh prompt, a fresh prompt longer than one 64-query tile.
    q_lens = [0, 1, 37, 19, 70]
    seq_lens = [20, 45, 70, 19, 70]
    k_cache, v_cache, tables = _paged_cache(seq_lens, hkv, dtype, gen, table_cols=6)
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    q = _randn(cu[-1], hq, D, gen=gen, dtype=dtype)
    args = (q, k_cache, v_cache, tables, _i32(cu), _i32(seq_lens), max(q_lens), 0.11)
    out = A.paged_prefill_attention(*args)
    ref = A.paged_prefill_attention_ref(*args)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out, ref, **TOL[dtype])


@needs_triton_kernels
def test_prefill_short_queries_and_loose_grid_bound():
    gen = _gen(2)
    q_lens, seq_lens = [1, 3, 0], [45, 17, 5]
    k_cache, v_cache, tables = _paged_cache(seq_lens, 1, torch.float32, gen)
    q = _randn(sum(q_lens), 3, D, gen=gen)
    cu = _i32([0, 1, 4, 4])
    # max_query_len larger than needed only adds empty tiles
    out = A.paged_prefill_attention(q, k_cache, v_cache, tables, cu, _i32(seq_lens), 20, 0.2)
    ref = A.paged_prefill_attention_ref(q, k_cache, v_cache, tables, cu, _i32(seq_lens), 20, 0.2)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


# ----------------------------------------------------------------------------- decode


@needs_triton_kernels
@pytest.mark.parametrize("dtype,hq,hkv,nq,split", [
    (torch.float32, 2, 2, 1, 32),
    (torch.float32, 6, 2, 5, 16),
    (torch.float32, 6, 2, 1, None),
    (torch.bfloat16, 6, 2, 5, 48),
])
def test_decode_matches_reference(dtype, hq, hkv, nq, split, poisoned_empty):
    gen = _gen(3)
    lens = [0, 1, 37, 77, 16]
    # 7 table columns = 112 keys: every sequence has splits past its context
    k_cache, v_cache, tables = _paged_cache(lens, hkv, dtype, gen, table_cols=7)
    q = _randn(len(lens), nq, hq, D, gen=gen, dtype=dtype)
    out, lse = A.paged_decode_attention(q, k_cache, v_cache, tables, _i32(lens), 0.125,
                                        split_size=split)
    ref_out, ref_lse = A.paged_decode_attention_ref(q, k_cache, v_cache, tables, _i32(lens), 0.125)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.shape == (len(lens), nq, hq, D) and lse.shape == (len(lens), nq, hq)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, **TOL[dtype])
    # empty context: exactly zero output and -inf log-sum-exp
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))


@needs_triton_kernels
def test_decode_result_independent_of_split_and_host_free(monkeypatch):
    gen = _gen(4)
    lens = [50, 3]
    k_cache, v_cache, tables = _paged_cache(lens, 2, torch.float32, gen, table_cols=5)
    q = _randn(2, 2, 4, D, gen=gen)
    ref_out, ref_lse = A.paged_decode_attention_ref(q, k_cache, v_cache, tables, _i32(lens), 0.1)

    # The launcher must not read device tensors on the host (CUDA-graph capture would break).
    def no_host_read(*_a, **_k):
        raise AssertionError("launcher read a tensor value on the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, no_host_read)
    results = [A.paged_decode_attention(q, k_cache, v_cache, tables, _i32(lens), 0.1, split_size=s)
               for s in (16, 32, 80, None)]
    monkeypatch.undo()
    for out, lse in results:
        torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
        torch.testing.assert_close(lse, ref_lse, **TOL[torch.float32])


def test_default_split_size_is_static_and_aligned():
    for batch in (1, 4, 64):
        for max_keys in (64, 1024, 8192, 131072):
            s = A.default_decode_split_size(batch, 8, 4, max_keys, 16, 132)
            assert s % 64 == 0 and 64 <= s <= 2048
    assert A.default_decode_split_size(1, 8, 4, 8192, 16, 132) == 256  # batch 1: many splits
    assert A.default_decode_split_size(1, 8, 4, 448, 16, 132) == 64  # short context: one tile each
    assert A.default_decode_split_size(1, 8, 4 * 61, 448, 16, 132) == 256  # tree rows: longer chunks
    assert A.default_decode_split_size(1, 3, 3 * 16, 2064, 16, 132) == 64  # unless few units: latency-bound
    assert A.default_decode_split_size(64, 8, 4, 8192, 16, 132) == 2048  # big batch: few


# ----------------------------------------------------------------------------- tree


@needs_triton_kernels
@pytest.mark.parametrize("dtype,hq,hkv,n", [(torch.float32, 2, 2, 64), (torch.float32, 6, 2, 13),
                                            (torch.bfloat16, 6, 2, 37)])
def test_tree_matches_reference(dtype, hq, hkv, n, poisoned_empty):
    gen = _gen(5)
    bsz = 2
    bits = _random_tree_bits(bsz, n, gen)
    q = _randn(bsz, n, hq, D, gen=gen, dtype=dtype)
    k = _randn(bsz, n, hkv, D, gen=gen, dtype=dtype)
    v = _randn(bsz, n, hkv, D, gen=gen, dtype=dtype)
    out, lse = A.tree_attention(q, k, v, bits, 0.125)
    ref_out, ref_lse = A.tree_attention_ref(q, k, v, bits, 0.125)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, **TOL[dtype])


@needs_triton_kernels
def test_tree_fewer_queries_than_keys_matches_reference(poisoned_empty):
    """The draft head's shape: one depth's frontier (Nq) against every drafted node (Nk)."""
    gen = _gen(7)
    bsz, nq, nk, hq, hkv = 3, 5, 23, 6, 2
    bits = torch.randint(0, 2**62, (bsz, nq), generator=gen).to(DEVICE) & ((1 << nk) - 1)
    q = _randn(bsz, nq, hq, D, gen=gen)
    k = _randn(bsz, nk, hkv, D, gen=gen)
    v = _randn(bsz, nk, hkv, D, gen=gen)
    out, lse = A.tree_attention(q, k, v, bits, 0.125)
    ref_out, ref_lse = A.tree_attention_ref(q, k, v, bits, 0.125)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    torch.testing.assert_close(lse, ref_lse, **TOL[torch.float32])


@needs_triton_kernels
def test_tree_keys_no_query_sees_are_never_read():
    """The drafter's side K/V keep, per batch row, what an earlier step left there, and a
    padding row may have left NaN (it computes on whatever its scratch state holds). A frontier
    that sees none of those slots must not read them: a zero weight times NaN is NaN, and a
    request batched into that row drafted garbage past depth 1 (CPU, chain:3: its first step
    emitted 2 tokens where alone it emitted 4, depending on what the memory held)."""
    gen = _gen(9)
    bsz, nq, nk, hq, hkv = 2, 3, 12, 4, 2
    bits = torch.randint(0, 2**62, (bsz, nq), generator=gen).to(DEVICE) & ((1 << 8) - 1)  # keys 8..11 unseen
    bits[:, 0] |= 1  # every row sees something
    q = _randn(bsz, nq, hq, D, gen=gen)
    k = _randn(bsz, nk, hkv, D, gen=gen)
    v = _randn(bsz, nk, hkv, D, gen=gen)
    clean_out, clean_lse = A.tree_attention_ref(q, k, v, bits, 0.125)
    k[:, 8:], v[:, 8:] = float("nan"), float("inf")
    for fn in (A.tree_attention_ref, A.tree_attention):
        out, lse = fn(q, k, v, bits, 0.125)
        torch.testing.assert_close(out, clean_out, **TOL[torch.float32])
        torch.testing.assert_close(lse, clean_lse, **TOL[torch.float32])


@needs_triton_kernels
def test_tree_mask_is_respected_and_empty_rows_are_zero():
    gen = _gen(6)
    n, hq, hkv = 9, 3, 1
    bits = _random_tree_bits(1, n, gen)
    bits[0, -1] = 0  # a padding node that sees nothing
    q = _randn(1, n, hq, D, gen=gen)
    k = _randn(1, n, hkv, D, gen=gen)
    v = _randn(1, n, hkv, D, gen=gen)
    out, lse = A.tree_attention(q, k, v, bits, 0.125)
    assert torch.all(out[0, -1] == 0) and torch.all(lse[0, -1] == float("-inf"))
    # the root sees only itself: its output is its own value row
    torch.testing.assert_close(out[0, 0], v[0, 0].expand(hq, D), **TOL[torch.float32])
    ref_out, ref_lse = A.tree_attention_ref(q, k, v, bits, 0.125)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    torch.testing.assert_close(lse, ref_lse, **TOL[torch.float32])


# ----------------------------------------------------------------------------- merge


def _split_attention_case(gen, nq=5, hq=4, hkv=2, nk=23, cut=9):
    q = _randn(nq, hq, D, gen=gen)
    k = _randn(nk, hkv, D, gen=gen)
    v = _randn(nk, hkv, D, gen=gen)
    def attend(keys: slice):
        out, lse = A._attend(q, k[keys], v[keys], None, 0.125)
        return out.contiguous(), lse.contiguous()

    return attend(slice(None)), attend(slice(None, cut)), attend(slice(cut, None))


@pytest.mark.parametrize("impl", ["ref", pytest.param("triton", marks=needs_triton_kernels)])
def test_merge_of_split_keys_equals_full_attention(impl):
    merge = A.merge_attention_states_ref if impl == "ref" else A.merge_attention_states
    (full_out, full_lse), (out_a, lse_a), (out_b, lse_b) = _split_attention_case(_gen(7))
    out, lse = merge(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, full_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, full_lse, atol=1e-5, rtol=1e-5)


@needs_triton_kernels
def test_merge_handles_empty_sides(poisoned_empty):
    gen = _gen(8)
    out_a, out_b = _randn(3, 2, 4, 48, gen=gen), _randn(3, 2, 4, 48, gen=gen)  # D not a power of 2
    lse_a, lse_b = _randn(3, 2, 4, gen=gen), _randn(3, 2, 4, gen=gen)
    lse_a[0] = float("-inf")  # only b
    lse_b[1] = float("-inf")  # only a
    lse_a[2, 0] = lse_b[2, 0] = float("-inf")  # neither
    out, lse = A.merge_attention_states(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out[0], out_b[0])
    torch.testing.assert_close(lse[0], lse_b[0])
    torch.testing.assert_close(out[1], out_a[1])
    assert torch.all(out[2, 0] == 0) and torch.all(lse[2, 0] == float("-inf"))
    ref_out, ref_lse = A.merge_attention_states_ref(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    # 16-bit partial outputs are accepted; the result is fp32
    out16, _ = A.merge_attention_states(out_a.bfloat16(), lse_a, out_b.bfloat16(), lse_b)
    assert out16.dtype == torch.float32


# ----------------------------------------------------------------------------- two-pass tree


def _two_pass_case(dtype, gen, hq=6, hkv=2, n=11, prefix=(0, 29, 64)):
    # SDPA turns masked NaN values into NaN (0 * NaN), so the poison here is large but finite.
    k_cache, v_cache, tables = _paged_cache(list(prefix), hkv, dtype, gen, table_cols=6,
                                            poison=1e4)
    bsz = len(prefix)
    bits = _random_tree_bits(bsz, n, gen)
    q = _randn(bsz, n, hq, D, gen=gen, dtype=dtype)
    k_tree = _randn(bsz, n, hkv, D, gen=gen, dtype=dtype)
    v_tree = _randn(bsz, n, hkv, D, gen=gen, dtype=dtype)
    return q, k_cache, v_cache, tables, _i32(list(prefix)), k_tree, v_tree, bits, 0.125


def test_sdpa_baseline_equals_two_pass_reference():
    args = _two_pass_case(torch.float32, _gen(9))
    ref = A.two_pass_tree_attention_ref(*args)
    # the baseline gathers whole tables: the poisoned slots past each prefix must be masked
    torch.testing.assert_close(A.tree_attention_sdpa_masked(*args), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(A.tree_attention_sdpa_masked(*args, repeat_kv=True), ref,
                               atol=1e-4, rtol=1e-4)


@needs_triton_kernels
@pytest.mark.parametrize("dtype,split", [(torch.float32, 32), (torch.float32, None),
                                         (torch.bfloat16, 16)])
def test_two_pass_matches_sdpa_and_reference(dtype, split, poisoned_empty):
    args = _two_pass_case(dtype, _gen(10))
    out = A.two_pass_tree_attention(*args, split_size=split)
    assert out.dtype == dtype and out.shape == args[0].shape
    torch.testing.assert_close(out, A.tree_attention_sdpa_masked(*args), **TOL[dtype])
    torch.testing.assert_close(out, A.two_pass_tree_attention_ref(*args), **TOL[dtype])


@needs_triton_kernels
def test_two_pass_of_several_row_tiles_with_strided_tree_kv(poisoned_empty):
    """40 nodes x 4 query heads per KV head = 160 rows: two row tiles, each with its own tree
    program in the split launch; the tree K/V are strided views (as a tree step keeps them)."""
    q, k_cache, v_cache, tables, lens, k_tree, v_tree, bits, scale = _two_pass_case(
        torch.float32, _gen(12), hq=8, hkv=2, n=40, prefix=(3, 70))
    qkv = torch.cat([q.flatten(2), k_tree.flatten(2), v_tree.flatten(2)], dim=-1)  # [B, N, (8 + 2 + 2) D]
    k_view = qkv[..., 8 * D:10 * D].unflatten(-1, (2, D))
    v_view = qkv[..., 10 * D:].unflatten(-1, (2, D))
    args = (q, k_cache, v_cache, tables, lens, k_view, v_view, bits, scale)
    out = A.two_pass_tree_attention(*args, split_size=32)
    torch.testing.assert_close(out, A.two_pass_tree_attention_ref(*args), **TOL[torch.float32])


@needs_triton_kernels
def test_two_pass_is_two_launches_or_one_for_one_chunk():
    """The prefix splits and the tree pass share one launch; the merge is the second. When the
    keys are one chunk, the split kernel walks them and then the tree keys, and writes the result."""
    from eaglespec.bench.step_launches import count_launches

    args = _two_pass_case(torch.float32, _gen(13))
    with count_launches() as launches:
        A.two_pass_tree_attention(*args, split_size=32)
    assert dict(launches.counts) == {"triton:_paged_decode_split_kernel": 1, "triton:_merge_splits_kernel": 1}
    max_keys = args[3].shape[1] * args[1].shape[1]
    with count_launches() as launches:
        A.two_pass_tree_attention(*args, split_size=max_keys)
    assert dict(launches.counts) == {"triton:_paged_decode_split_kernel": 1}


@needs_triton_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_chunk_of_keys_is_finished_by_the_split_kernel(dtype, poisoned_empty):
    """Keys of one chunk (split_size >= the table's keys, as large batches get by default): the
    split kernel's own output, with the tree keys after the cached ones (an empty prefix
    included), equals the references, in the asked dtype; so does plain decode's."""
    q, k_cache, v_cache, tables, lens, k_tree, v_tree, bits, scale = _two_pass_case(dtype, _gen(14))
    max_keys = tables.shape[1] * k_cache.shape[1]
    args = (q, k_cache, v_cache, tables, lens, k_tree, v_tree, bits, scale)
    out = A.two_pass_tree_attention(*args, split_size=max_keys)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out, A.two_pass_tree_attention_ref(*args), **TOL[dtype])
    out, lse = A.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, split_size=max_keys,
                                        out_dtype=dtype)
    ref_out, ref_lse = A.paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, scale)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out.to(dtype), **TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, **TOL[dtype])
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))  # prefix 0: no key


# ----------------------------------------------------------------------------- input checks


@needs_triton_kernels
def test_launchers_reject_bad_inputs():
    gen = _gen(11)
    k_cache, v_cache, tables = _paged_cache([20, 5], 2, torch.float32, gen)
    q = _randn(2, 1, 4, D, gen=gen)
    lens = _i32([20, 5])
    decode = A.paged_decode_attention
    with pytest.raises(ValueError, match="q dtype must be one of"):
        decode(q.to(torch.int32), k_cache, v_cache, tables, lens, 0.1)
    with pytest.raises(ValueError, match="k_cache dtype .* differs from q"):
        decode(q.bfloat16(), k_cache, v_cache, tables, lens, 0.1)
    with pytest.raises(ValueError, match="q must have 4 dims"):
        decode(q[0], k_cache, v_cache, tables, lens, 0.1)
    with pytest.raises(ValueError, match="q must have unit stride in its last dim"):
        decode(_randn(2, 1, 4, 2 * D, gen=gen)[..., ::2], k_cache, v_cache, tables, lens, 0.1)
    # q may have strided rows (a view of the qkv projection's output): same result as a copy.
    wide = _randn(2, 1, 7, D, gen=gen)
    strided = wide[:, :, 1:5]
    torch.testing.assert_close(decode(strided, k_cache, v_cache, tables, lens, 0.1)[0],
                               decode(strided.contiguous(), k_cache, v_cache, tables, lens, 0.1)[0])
    with pytest.raises(ValueError, match="multiple of k_cache heads"):
        decode(_randn(2, 1, 3, D, gen=gen), k_cache, v_cache, tables, lens, 0.1)
    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        decode(q[..., :48].contiguous(), k_cache[..., :48].contiguous(),
               v_cache[..., :48].contiguous(), tables, lens, 0.1)
    with pytest.raises(ValueError, match="block_tables dtype"):
        decode(q, k_cache, v_cache, tables.long(), lens, 0.1)
    with pytest.raises(ValueError, match="context_lens has 1 entries"):
        decode(q, k_cache, v_cache, tables, lens[:1], 0.1)
    with pytest.raises(ValueError, match="block_size .* power of two >= 16"):
        decode(q, k_cache[:, :8].contiguous(), v_cache[:, :8].contiguous(), tables, lens, 0.1)
    with pytest.raises(ValueError, match="split_size must be a positive multiple of block_size"):
        decode(q, k_cache, v_cache, tables, lens, 0.1, split_size=24)

    with pytest.raises(ValueError, match="cu_seqlens_q must have batch \\+ 1"):
        A.paged_prefill_attention(q[:, 0].contiguous(), k_cache, v_cache, tables, _i32([0, 1]),
                                  lens, 1, 0.1)

    bits = _random_tree_bits(1, 65, gen)
    with pytest.raises(ValueError, match="at most 64 tree keys"):
        A.tree_attention(_randn(1, 65, 2, D, gen=gen), _randn(1, 65, 2, D, gen=gen),
                         _randn(1, 65, 2, D, gen=gen), bits, 0.1)
    tq, tk = _randn(1, 4, 2, D, gen=gen), _randn(1, 4, 2, D, gen=gen)
    with pytest.raises(ValueError, match="ancestor_bits dtype"):
        A.tree_attention(tq, tk, tk, bits[:, :4].to(torch.int32), 0.1)
    with pytest.raises(ValueError, match="ancestor_bits must have shape"):
        A.tree_attention(tq, tk, tk, bits[:, :3].contiguous(), 0.1)

    out, lse = _randn(2, 4, D, gen=gen), _randn(2, 4, gen=gen)
    with pytest.raises(ValueError, match="lse_b must have shape"):
        A.merge_attention_states(out, lse, out, lse[:, :3].contiguous())
    with pytest.raises(ValueError, match="out_a .* and out_b .* shapes differ"):
        A.merge_attention_states(out, lse, out[:1].contiguous(), lse)
