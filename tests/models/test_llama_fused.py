"""The model's "triton" kernel set (fused norm+residual, RoPE+cache store, silu*up between cuBLAS
products; steps of a few tokens on the folded products) against its "torch" reference, for every
kind of step and for both draft-head kinds (fp32)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from eaglespec.kv_cache import KVCache
from eaglespec.models.attention_step import DecodeStep, PrefillStep, TreeStep
from eaglespec.models.llama import FEW_TOKENS, build_model, folded_token_limit
from eaglespec.models.tensor_parallel import SINGLE, LlamaShard
from eaglespec.ops import gemv
from tests.conftest import DEVICE, needs_triton_kernels, random_model, tiny_config
from tests.speculative.test_speculative_greedy import eagle1_head, eagle3_head

pytestmark = needs_triton_kernels

BS = 16
TOL = dict(atol=1e-4, rtol=1e-4)


def _cache(cfg, num_blocks=8) -> KVCache:
    return KVCache.allocate(cfg.num_layers, num_blocks, BS, cfg.num_kv_heads, cfg.head_dim, torch.float32, DEVICE)


def _tensor(values, dtype=torch.int64):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


def _prefill(lens: list[int], tables: list[list[int]], scale: float) -> PrefillStep:
    slots = [tables[b][p // BS] * BS + p % BS for b, n in enumerate(lens) for p in range(n)]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return PrefillStep(_tensor(slots), _tensor(tables, torch.int32), _tensor(cu, torch.int32),
                       _tensor(lens, torch.int32), max(lens), scale)


def _both_paths(model, make_step, ids, pos, **kw):
    """Run the same step on fresh copies of one cache state with each path."""
    outs = {}
    for kernels in ("torch", "triton"):
        cache, step = make_step()
        outs[kernels] = (model.with_kernels(kernels)(ids, pos, step, cache, **kw), cache, step)
    return outs["torch"], outs["triton"]


def test_fused_forward_matches_torch_path_for_prefill_decode_and_tree():
    # 4 layers so the EAGLE-3 taps (layers 2, 2, 1) are inside the stack, not the embedding.
    model = random_model(tiny_config(num_layers=4), seed=3).to(DEVICE)
    cfg = model.config
    scale = cfg.head_dim ** -0.5
    gen = torch.Generator().manual_seed(0)
    # More than FEW_TOKENS tokens: the prefill runs on cuBLAS products and the fused element-wise
    # kernels; the decode and tree steps below on the folded products.
    lens, tables = [5, FEW_TOKENS + 6], [[2, 0, 0, 0, 0], [4, 6, 8, 9, 10]]
    ids = torch.randint(0, cfg.vocab_size, (sum(lens),), generator=gen).to(DEVICE)
    pos = torch.cat([torch.arange(n) for n in lens]).to(DEVICE)
    base = _cache(cfg, num_blocks=12)

    def prefill():
        cache = KVCache(base.k.clone(), base.v.clone())
        return cache, _prefill(lens, tables, scale)

    (ref, ref_cache, _), (got, got_cache, _) = _both_paths(model, prefill, ids, pos, want_hidden=True, want_taps=True)
    torch.testing.assert_close(got.logits, ref.logits, **TOL)
    torch.testing.assert_close(got.hidden, ref.hidden, **TOL)
    torch.testing.assert_close(got.taps, ref.taps, **TOL)
    torch.testing.assert_close(got_cache.k, ref_cache.k, **TOL)
    torch.testing.assert_close(got_cache.v, ref_cache.v, **TOL)
    assert ref_cache.k.abs().sum() > 0  # the torch path really wrote the cache it is compared with

    # Only the selected rows' logits / features.
    rows = _tensor([4, sum(lens) - 1])
    (ref, _, _), (got, _, _) = _both_paths(model, prefill, ids, pos, logits_rows=rows, want_taps=True)
    torch.testing.assert_close(got.logits, ref.logits, **TOL)
    torch.testing.assert_close(got.taps, ref.taps, **TOL)
    assert got.logits.shape == (2, cfg.vocab_size)

    # One decode token per sequence, on top of the prefilled cache.
    dec_ids, dec_pos = _tensor([7, 11]), _tensor(lens)
    slots = [tables[b][p // BS] * BS + p % BS for b, p in enumerate(lens)]

    def decode():
        cache = KVCache(ref_cache.k.clone(), ref_cache.v.clone())
        return cache, DecodeStep(_tensor(slots), _tensor(tables, torch.int32), _tensor([n + 1 for n in lens],
                                                                                      torch.int32), scale)

    (ref, ref_dec_cache, _), (got, got_dec_cache, _) = _both_paths(model, decode, dec_ids, dec_pos)
    torch.testing.assert_close(got.logits, ref.logits, **TOL)
    torch.testing.assert_close(got_dec_cache.k, ref_dec_cache.k, **TOL)
    torch.testing.assert_close(got_dec_cache.v, ref_dec_cache.v, **TOL)

    # A 3-node tree per sequence (root, two children): K/V go to the step's side buffer.
    n = 3
    bits = _tensor([[1, 3, 5], [1, 3, 5]])
    tree_ids = _tensor([7, 1, 2, 11, 3, 4])
    tree_pos = (_tensor(lens)[:, None] + _tensor([0, 1, 1])).reshape(-1)

    def tree():
        cache = KVCache(ref_cache.k.clone(), ref_cache.v.clone())
        return cache, TreeStep(_tensor(tables, torch.int32), _tensor(lens, torch.int32), bits, scale)

    (ref, ref_tree_cache, ref_step), (got, got_tree_cache, got_step) = _both_paths(model, tree, tree_ids, tree_pos)
    torch.testing.assert_close(got.logits, ref.logits, **TOL)
    (got_k, got_v), (ref_k, ref_v) = got_step.stacked(), ref_step.stacked()
    assert got_k.shape == (cfg.num_layers, 2, n, cfg.num_kv_heads, cfg.head_dim)
    torch.testing.assert_close(got_k, ref_k, **TOL)
    torch.testing.assert_close(got_v, ref_v, **TOL)
    assert got_k.abs().sum() > 0
    assert torch.equal(got_tree_cache.k, ref_cache.k)  # the tree never touches the paged cache


@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_fused_draft_heads_match_torch_path(kind):
    target = random_model(tiny_config(), seed=4).to(DEVICE)
    head = eagle1_head(target, seed=5, layers=2, oracle=False) if kind == "eagle1" else eagle3_head(target, seed=5)
    lc = head.config.layer
    gen = torch.Generator().manual_seed(1)
    t = 6
    feats = torch.randn(t, head.config.feature_size, generator=gen).to(DEVICE)
    tokens = torch.randint(0, lc.vocab_size, (t,), generator=gen).to(DEVICE)
    positions = torch.arange(t, device=DEVICE)
    outs = {}
    for kernels in ("torch", "triton"):
        cache = KVCache.allocate(lc.num_layers, 4, BS, lc.num_kv_heads, lc.head_dim, torch.float32, DEVICE)
        step = _prefill([t], [[1]], lc.head_dim ** -0.5)
        outs[kernels] = (head.with_kernels(kernels)(feats, tokens, positions, step, cache), cache)
    (ref, ref_cache), (got, got_cache) = outs["torch"], outs["triton"]
    torch.testing.assert_close(got.hidden, ref.hidden, **TOL)
    torch.testing.assert_close(got.last, ref.last, **TOL)
    torch.testing.assert_close(head.logits(got), head.logits(ref), **TOL)
    torch.testing.assert_close(got_cache.k, ref_cache.k, **TOL)
    assert ref_cache.k.abs().sum() > 0


def _counting_qkv(monkeypatch) -> list[int]:
    calls = [0]
    real = gemv.gemv_qkv_rope

    def wrapper(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(gemv, "gemv_qkv_rope", wrapper)
    return calls


@pytest.mark.parametrize("tied", [False, True])
def test_few_token_forward_matches_torch_path_for_decode_and_tree_of_batch_3(tied, monkeypatch):
    """Decode and tree-verify steps of 3 sequences on the folded products (norms, RoPE, cache
    store, SwiGLU and residual adds inside the products) equal the torch forward: logits, final
    hidden state and EAGLE-3 taps, of all rows and of selected rows; the K/V stored in the cache
    (decode) or kept by the tree step."""
    model = random_model(tiny_config(num_layers=4, tie_word_embeddings=tied), seed=6).to(DEVICE)
    cfg = model.config
    scale = cfg.head_dim ** -0.5
    gen = torch.Generator().manual_seed(2)
    lens, tables = [21, 9, 30], [[3, 5], [1, 0], [7, 2]]
    ids = torch.randint(0, cfg.vocab_size, (sum(lens),), generator=gen).to(DEVICE)
    cache = _cache(cfg)
    model(ids, torch.cat([torch.arange(n) for n in lens]).to(DEVICE), _prefill(lens, tables, scale), cache)
    calls = _counting_qkv(monkeypatch)
    want_all = dict(want_hidden=True, want_taps=True)

    slots = [tables[b][p // BS] * BS + p % BS for b, p in enumerate(lens)]

    def decode():
        c = KVCache(cache.k.clone(), cache.v.clone())
        return c, DecodeStep(_tensor(slots), _tensor(tables, torch.int32), _tensor([n + 1 for n in lens],
                                                                                  torch.int32), scale)

    (ref, ref_cache, _), (got, got_cache, _) = _both_paths(model, decode, _tensor([5, 17, 40]), _tensor(lens),
                                                           **want_all)
    assert calls[0] == cfg.num_layers  # the triton forward ran every layer on the folded products
    for name in ("logits", "hidden", "taps"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), **TOL)
    assert got.taps.shape == (3, 3 * cfg.hidden_size) and got.logits.dtype == torch.float32
    torch.testing.assert_close(got_cache.k, ref_cache.k, **TOL)
    torch.testing.assert_close(got_cache.v, ref_cache.v, **TOL)
    assert not torch.equal(ref_cache.k, cache.k)  # the step really stored its K/V

    # A 5-node tree per sequence (root; two children; a grandchild under each child).
    n = 5
    bits = _tensor([[1, 3, 5, 11, 21]] * 3)
    tree_ids = torch.randint(0, cfg.vocab_size, (3 * n,), generator=gen).to(DEVICE)
    tree_pos = (_tensor(lens)[:, None] + _tensor([0, 1, 1, 2, 2])).reshape(-1)

    def tree():
        c = KVCache(cache.k.clone(), cache.v.clone())
        return c, TreeStep(_tensor(tables, torch.int32), _tensor(lens, torch.int32), bits, scale)

    for rows in (None, _tensor([0, 3, 7, 14])):
        (ref, _, ref_step), (got, got_cache, got_step) = _both_paths(model, tree, tree_ids, tree_pos,
                                                                     logits_rows=rows, **want_all)
        for name in ("logits", "hidden", "taps"):
            torch.testing.assert_close(getattr(got, name), getattr(ref, name), **TOL)
        assert got.logits.shape[0] == (3 * n if rows is None else 4)
        (got_k, got_v), (ref_k, ref_v) = got_step.stacked(), ref_step.stacked()
        assert got_k.shape == (cfg.num_layers, 3, n, cfg.num_kv_heads, cfg.head_dim)
        torch.testing.assert_close(got_k, ref_k, **TOL)
        torch.testing.assert_close(got_v, ref_v, **TOL)
        assert torch.equal(got_cache.k, cache.k)  # the tree never touches the paged cache
    assert calls[0] == 3 * cfg.num_layers


def test_folded_products_take_several_rows_only_for_small_layers(monkeypatch):
    """Steps of 2..FEW_TOKENS tokens run the layers on the folded products only when the largest
    layer product is small (SmolLM2: 16 rows); Llama-3.1-8B's products go to cuBLAS from two
    rows on (with 4 ranks too), its one-row decode stays folded. A model limited to one row runs
    a 3-row decode on cuBLAS with the same results."""
    from eaglespec.bench.decode import PRESETS

    shard = LlamaShard.of
    assert folded_token_limit(PRESETS["smollm2-135m"], shard(PRESETS["smollm2-135m"], SINGLE)) == FEW_TOKENS
    big = PRESETS["llama-3.1-8b"]
    assert folded_token_limit(big, shard(big, SINGLE)) == 1
    assert folded_token_limit(big, shard(big, SimpleNamespace(rank=0, world_size=4))) == 1  # a rank's shard
    model = random_model(tiny_config(num_layers=2), seed=9).to(DEVICE)
    assert model.folded_tokens == FEW_TOKENS
    assert eagle1_head(model, seed=3, layers=1, oracle=False).folded_tokens == FEW_TOKENS
    cfg = model.config
    lens, tables = [7, 4, 9], [[3], [1], [2]]
    ids = torch.randint(0, cfg.vocab_size, (sum(lens),), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    cache = _cache(cfg)
    scale = cfg.head_dim ** -0.5
    model(ids, torch.cat([torch.arange(n) for n in lens]).to(DEVICE), _prefill(lens, tables, scale), cache)
    slots = [tables[b][0] * BS + p for b, p in enumerate(lens)]

    def decode():
        c = KVCache(cache.k.clone(), cache.v.clone())
        return c, DecodeStep(_tensor(slots), _tensor(tables, torch.int32), _tensor([n + 1 for n in lens],
                                                                                  torch.int32), scale)

    model.folded_tokens = 1
    calls = _counting_qkv(monkeypatch)
    (ref, _, _), (got, _, _) = _both_paths(model, decode, _tensor([5, 17, 40]), _tensor(lens), want_hidden=True)
    assert calls[0] == 0  # three rows, limit one: no folded product ran
    for name in ("logits", "hidden"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), **TOL)


def test_kernel_set_is_chosen_when_built_and_shares_the_weights():
    model = random_model(tiny_config(), seed=7)
    assert model.kernels == "torch"
    twin = model.with_kernels("triton")
    assert twin.kernels == "triton" and model.kernels == "torch"  # the original keeps its set
    assert twin.with_kernels("triton") is twin and model.with_kernels("torch") is model
    for (name, p), (twin_name, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert name == twin_name and p is q  # shared, not copied
    head = eagle1_head(model, seed=8, layers=1, oracle=False)
    assert head.kernels == "torch" and head.with_kernels("triton").fc.weight is head.fc.weight
    with pytest.raises(ValueError, match="kernels must be one of"):
        model.with_kernels("cuda")
    with pytest.raises(ValueError, match="kernels must be one of"):
        build_model(tiny_config(), "cpu", torch.float32, kernels="fused")
