"""Tensor-parallel Llama on the CPU: 2 and 4 gloo ranks spawned here, each holding its shard
(heads split, or KV heads replicated when there are fewer than ranks; MLP columns; padded
vocabulary rows), against the unsharded model loaded from the same checkpoint; per-rank loading
with a bounded host-memory peak; GGUF slices; the replicated draft head; bad head counts."""

from __future__ import annotations

import os
import re
import socket
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eaglespec.config import LlamaConfig
from eaglespec.engine.runner import ModelRunner
from eaglespec.kv_cache import KVCache
from eaglespec.models import loading
from eaglespec.models.attention_step import DecodeStep, PrefillStep
from eaglespec.models.eagle import EagleConfig, borrowed_weights, build_head, load_head, save_head
from eaglespec.models.llama import build_model
from eaglespec.models.loading import expected_shapes, open_checkpoint
from eaglespec.models.tensor_parallel import SINGLE, LlamaShard, TensorParallel, TensorSlice
from tests.conftest import _triton_kernels_runnable, small_engine
from tests.models.test_loading import llamacpp_permute, write_gguf, write_hf_dir

gguf = pytest.importorskip("gguf")

TOL = dict(atol=1e-5, rtol=1e-5)
BS = 16  # KV cache block size


def tp_config(num_heads: int = 8, num_kv_heads: int = 4, **overrides) -> LlamaConfig:
    # vocab 97 splits evenly over no world size: the last vocabulary shard is padded.
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=128, num_layers=2, num_heads=num_heads,
                num_kv_heads=num_kv_heads, head_dim=8, rope_theta=10000.0, max_position_embeddings=256)
    return LlamaConfig(**{**base, **overrides})


def tp_tensors(cfg: LlamaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fp32 weights at a scale that keeps activations O(1) through the layers."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("norm.weight"):
            out[name] = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        else:
            out[name] = 0.1 * torch.randn(shape, generator=gen)
    return out


def fake_group(world_size: int) -> list[TensorParallel]:
    """Rank descriptors for building and loading only (no collective runs on these)."""
    return [TensorParallel(r, world_size, group=object()) for r in range(world_size)]


# ------------------------------------------------------------------------------------------------
# The spawned ranks.
# ------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world_size: int, job: str, *args) -> None:
    """Run ``job`` on ``world_size`` gloo ranks; a failure in any rank fails the test."""
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the children: 2 cores shared by every rank
    mp.spawn(_rank_main, args=(world_size, _free_port(), job, args), nprocs=world_size, join=True)


def _rank_main(rank: int, world_size: int, port: int, job: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        JOBS[job](TensorParallel(rank, world_size, dist.group.WORLD), *args)
    finally:
        dist.destroy_process_group()
    # Passed: leave without the interpreter's teardown. destroy_process_group leaves gloo's worker
    # threads running, and one still releasing the last collective's tensors needs the GIL while
    # Python finalizes: the process aborts ("terminate called without an active exception", a
    # core dump showed it in ~AsyncAllgatherWork). The engine's spawned workers leave the same way.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _load(path: str, tp: TensorParallel, kernels: str):
    ckpt = open_checkpoint(path, progress=False, tp=tp)
    model = build_model(ckpt.config, "cpu", torch.float32, kernels=kernels, tp=tp)
    model.load_hf_tensors(ckpt.tensors, source=path)
    return model


def _ids(values, dtype=torch.int64):
    return torch.tensor(values, dtype=dtype)


def _run_steps(model, cfg: LlamaConfig):
    """Prefill two sequences, a chunk more of the second, a batch-2 decode, a batch-1 decode and
    a greedy batch-2 decode on ungathered logits (every step of at most FEW_TOKENS tokens: the
    folded products on "triton"); the outputs of every step, the greedy tokens and the cache."""
    cache = KVCache.allocate(cfg.num_layers, 4, BS, model.local_num_kv_heads, cfg.head_dim, torch.float32, "cpu")
    scale = cfg.head_dim ** -0.5
    tables = _ids([[0, 1], [2, 3]], torch.int32)
    gen = torch.Generator().manual_seed(7)
    lens = [5, 9]
    ids = torch.randint(0, cfg.vocab_size, (sum(lens),), generator=gen)
    pos = torch.cat([torch.arange(n) for n in lens])
    slots = _ids([b * 2 * BS + p for b, n in enumerate(lens) for p in range(n)])
    outs = [model(ids, pos, PrefillStep(slots, tables, _ids([0, 5, 14], torch.int32), _ids(lens, torch.int32),
                                        9, scale), cache, want_hidden=True, want_taps=True)]
    # A second chunk of sequence 1, logits of its last row only.
    chunk = torch.randint(0, cfg.vocab_size, (3,), generator=gen)
    step = PrefillStep(_ids([2 * BS + 9, 2 * BS + 10, 2 * BS + 11]), tables[1:], _ids([0, 3], torch.int32),
                       _ids([12], torch.int32), 3, scale)
    outs.append(model(chunk, _ids([9, 10, 11]), step, cache, logits_rows=_ids([2]), want_taps=True))
    step = DecodeStep(_ids([5, 2 * BS + 12]), tables, _ids([6, 13], torch.int32), scale)
    outs.append(model(_ids([3, 4]), _ids([5, 12]), step, cache, want_hidden=True))
    step = DecodeStep(_ids([6]), tables[:1], _ids([7], torch.int32), scale)
    outs.append(model(_ids([11]), _ids([6]), step, cache, want_hidden=True, want_taps=True))
    step = DecodeStep(_ids([7, 2 * BS + 13]), tables, _ids([8, 14], torch.int32), scale)
    local = model(_ids([12, 13]), _ids([7, 13]), step, cache, gather_logits=False).logits
    assert local.shape == (2, model.shard.vocab_rows)
    return outs, model.greedy_tokens(local), cache


def _unsharded_reference(path: str, kernel_sets: tuple[str, ...], out_file) -> str:
    """The unsharded model's outputs and cache for every kernel set, computed once (here, not on
    every rank) and saved for the ranks to compare with."""
    ref = {}
    for kernels in kernel_sets:
        model = _load(path, SINGLE, kernels)
        outs, greedy, cache = _run_steps(model, model.config)
        ref[kernels] = {"outs": [{"logits": o.logits, "hidden": o.hidden, "taps": o.taps} for o in outs],
                        "greedy": greedy, "k": cache.k, "v": cache.v}
    torch.save(ref, out_file)
    return str(out_file)


def _job_logits_equal(tp: TensorParallel, path: str, ref_file: str) -> None:
    reference = torch.load(ref_file, weights_only=True)
    for kernels, ref in reference.items():
        shard = _load(path, tp, kernels)
        cfg = shard.config
        outs, greedy, cache = _run_steps(shard, cfg)
        assert len(outs) == len(ref["outs"])
        assert torch.equal(greedy, ref["greedy"])
        for i, (want, got) in enumerate(zip(ref["outs"], outs)):
            assert got.logits.shape == want["logits"].shape == (want["logits"].shape[0], cfg.vocab_size)
            for field in ("logits", "hidden", "taps"):
                a, b = getattr(got, field), want[field]
                assert (a is None) == (b is None)
                if b is not None:
                    torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{kernels} step {i} {field}: {m}")
        # This rank's cache holds exactly its KV heads of the unsharded cache.
        kv = slice(shard.shard.kv_head0, shard.shard.kv_head0 + shard.local_num_kv_heads)
        torch.testing.assert_close(cache.k, ref["k"][:, :, :, kv], **TOL)
        torch.testing.assert_close(cache.v, ref["v"][:, :, :, kv], **TOL)
        assert ref["k"].abs().sum() > 0
        _check_sharded_greedy(shard)


def _check_sharded_greedy(model) -> None:
    """``greedy_tokens`` over ungathered logits: the padded rows' zero logits never win over
    negative ones, and equal maxima on two ranks give the lower id (as a full argmax does)."""
    vocab, shard = model.config.vocab_size, model.shard
    full = -1.0 - torch.rand(3, vocab, generator=torch.Generator().manual_seed(0))
    full[0, vocab - 1] = -0.5  # the last real id; every rank's padding would score 0
    full[1, [30, 60]] = -0.25  # a tie between two ranks' rows (ranks 1 and 2 of 4, 0 and 1 of 2)
    full[2, 0] = -0.75
    lo, hi = min(shard.vocab0, vocab), min(shard.vocab0 + shard.vocab_rows, vocab)
    local = torch.cat((full[:, lo:hi], torch.zeros(3, shard.vocab_rows - (hi - lo))), dim=1)
    assert model.greedy_tokens(local).tolist() == [vocab - 1, 30, 0]


def _job_head_replicated(tp: TensorParallel, path: str, head_dirs: list[str]) -> None:
    ref, shard = _load(path, SINGLE, "torch"), _load(path, tp, "torch")
    borrowed = borrowed_weights(shard, path)
    cfg = ref.config
    for head_dir in head_dirs:
        want_head = load_head(head_dir, ref)
        got_head = load_head(head_dir, shard, borrowed=borrowed)
        gen = torch.Generator().manual_seed(3)
        feats = torch.randn(6, want_head.config.feature_size, generator=gen)
        tokens = torch.randint(0, cfg.vocab_size, (6,), generator=gen)
        outs = []
        for head in (want_head, got_head):
            lc = head.config.layer
            cache = KVCache.allocate(1, 2, BS, lc.num_kv_heads, lc.head_dim, torch.float32, "cpu")
            step = PrefillStep(torch.arange(6), _ids([[0]], torch.int32), _ids([0, 6], torch.int32),
                               _ids([6], torch.int32), 6, lc.head_dim ** -0.5)
            out = head(feats, tokens, torch.arange(6), step, cache)
            outs.append((head.logits(out), head.draft_vocab().logits(out.last)))
        for want, got in zip(*outs):
            assert torch.equal(got, want)  # the same weights on the same inputs: identical drafts


JOBS = {"logits": _job_logits_equal, "head": _job_head_replicated}


def _kernel_sets() -> tuple[str, ...]:
    # The ranks run on the CPU (gloo): Triton kernels only through the interpreter there.
    interpreted = _triton_kernels_runnable() and os.environ.get("TRITON_INTERPRET") == "1"
    return ("torch", "triton") if interpreted else ("torch",)


# world size, (query heads, KV heads), tied embeddings: KV heads split (8/4 over 2 and 4) and
# replicated (2 KV heads over 4 ranks).
@pytest.mark.parametrize("world_size,heads,tied", [(2, (8, 4), False), (4, (8, 4), True), (4, (8, 2), False)],
                         ids=["p2-kv4", "p4-kv4-tied", "p4-kv2-replicated"])
def test_sharded_logits_hidden_taps_and_cache_equal_unsharded(tmp_path, world_size, heads, tied):
    cfg = tp_config(*heads, tie_word_embeddings=tied)
    path = write_hf_dir(tmp_path / "m", cfg, tp_tensors(cfg))
    _spawn(world_size, "logits", path, _unsharded_reference(path, _kernel_sets(), tmp_path / "ref.pt"))


def test_replicated_draft_heads_draft_as_single_process(tmp_path):
    cfg = tp_config(8, 4)
    path = write_hf_dir(tmp_path / "m", cfg, tp_tensors(cfg))
    target = build_model(cfg, "cpu", torch.float32)
    target.load_hf_tensors(open_checkpoint(path, progress=False).tensors)
    layer = LlamaConfig(**{**{f: getattr(cfg, f) for f in cfg.__slots__}, "num_layers": 1, "eagle3_layers": ()})
    dirs = []
    for kind in ("eagle1", "eagle3"):
        head = build_head(EagleConfig(kind, layer, draft_vocab_size=40 if kind == "eagle3" else 0), target)
        head.init_random(seed=5, std=0.1)
        if kind == "eagle3":
            head.d2t.copy_(torch.arange(40) * 2 - torch.arange(40))  # draft id i -> target id 2i
        save_head(head, str(tmp_path / kind))
        dirs.append(str(tmp_path / kind))
    _spawn(2, "head", path, dirs)


def test_sharded_target_without_full_borrowed_weights_is_refused(tmp_path):
    cfg = tp_config(8, 4)
    path = write_hf_dir(tmp_path / "m", cfg, tp_tensors(cfg))
    rank1 = fake_group(2)[1]
    target = _load(path, rank1, "torch")
    with pytest.raises(ValueError, match=r"rank 1 of 2.*borrowed_weights\(target, checkpoint=PATH\)"):
        build_head(EagleConfig("eagle1", cfg), target)
    borrowed = borrowed_weights(target, path)  # read whole from the checkpoint
    full = tp_tensors(cfg)
    assert torch.equal(borrowed.embedding, full["model.embed_tokens.weight"])
    assert torch.equal(borrowed.output, full["lm_head.weight"])
    assert target.output_weight.shape == (49, cfg.hidden_size)  # ceil(97 / 2) rows of the shard


# ------------------------------------------------------------------------------------------------
# GGUF: Q8_0 weights sliced per rank (before dequantising where the blocks allow).
# ------------------------------------------------------------------------------------------------

def write_q8_gguf(path, cfg: LlamaConfig, tensors: dict[str, torch.Tensor]) -> str:
    """Every matrix Q8_0-quantized (Q/K permuted per head first, as llama.cpp stores them)."""
    q8 = gguf.GGMLQuantizationType.Q8_0
    to_gguf = {v: k for k, v in loading._GGUF_GLOBAL_NAMES.items()}
    to_gguf.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight"
                    for i in range(cfg.num_layers) for g, hf in loading._GGUF_LAYER_NAMES.items()})
    floats, raw = {}, {}
    for name, t in tensors.items():
        if t.dim() == 1:
            floats[name] = t.numpy()
            continue
        if name.endswith("q_proj.weight"):
            t = llamacpp_permute(t, cfg.num_heads)
        elif name.endswith("k_proj.weight"):
            t = llamacpp_permute(t, cfg.num_kv_heads)
        raw[to_gguf[name]] = (gguf.quants.quantize(t.numpy(), q8), q8)
    return write_gguf(path, cfg, floats, raw=raw)


def test_gguf_slices_equal_slices_of_the_dequantized_tensor(tmp_path):
    cfg = tp_config(8, 2)
    path = write_q8_gguf(tmp_path / "m.gguf", cfg, tp_tensors(cfg))
    reader = gguf.GGUFReader(path)
    down = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")  # [32, 128], blocks of 32
    whole = loading._dequantize(down)
    for part in (TensorSlice(1, 32, 64, 32), TensorSlice(1, 16, 48, 32), TensorSlice(0, 8, 24, 16)):
        aligned = part.dim == 0 or part.lo % 32 == 0
        assert (loading._stored_part(down, gguf.GGMLQuantizationType(down.tensor_type), whole.shape, part)
                is not None) == aligned  # a column range across quant blocks dequantises first
        np.testing.assert_array_equal(loading._dequantize(down, part), whole[loading._index(part)])


def test_gguf_loads_per_rank_with_equal_logits(tmp_path):
    # 4 ranks: o_proj columns (16 each) split Q8_0 blocks, down_proj columns (32) do not.
    cfg = tp_config(8, 2)
    path = write_q8_gguf(tmp_path / "m.gguf", cfg, tp_tensors(cfg))
    _spawn(4, "logits", path, _unsharded_reference(path, ("torch",), tmp_path / "ref.pt"))


# ------------------------------------------------------------------------------------------------
# Per-rank loading: only this rank's slices reach host memory.
# ------------------------------------------------------------------------------------------------

def _peak_rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set size (VmHWM) to the current one


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return 1024 * int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return 1024 * int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def _load_growth(load) -> int:
    """How far the process's resident memory peaked above where it was, while ``load`` ran."""
    before = _rss_bytes()
    _peak_rss_reset()
    result = load()
    grown = _peak_rss_bytes() - before
    del result
    return grown


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's peak-RSS reset")
@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_checkpoint_loads_per_rank_with_bounded_host_memory_peak(tmp_path, fmt):
    # One big tensor: the 16 MiB fp32 embedding (tied). A rank's slice is a quarter of it.
    cfg = tp_config(8, 4, vocab_size=131072, num_layers=1, tie_word_embeddings=True)
    tensors = tp_tensors(cfg)
    full_bytes = tensors["model.embed_tokens.weight"].nbytes
    if fmt == "gguf":
        path = write_gguf(tmp_path / "m.gguf", cfg, {n: t.numpy() for n, t in tensors.items()})
    else:
        path = write_hf_dir(tmp_path / "m", cfg, tensors)
    # Three slices' worth (the slice's file pages, one copy of it, slack); the whole tensor is four.
    bound = 3 * full_bytes // 4
    for tp in fake_group(4):
        model = build_model(cfg, "cpu", torch.float32, tp=tp)
        for p in model.parameters():
            p.zero_()  # the parameters' own pages are resident before measuring

        def load():
            model.load_hf_tensors(open_checkpoint(path, progress=False, tp=tp).tensors)

        grown = _load_growth(load)
        assert grown < bound, f"rank {tp.rank}: host memory peaked {grown} bytes above the model, bound {bound}"
        emb = model.model.embed_tokens.weight
        rows = slice(tp.rank * emb.shape[0], (tp.rank + 1) * emb.shape[0])
        assert torch.equal(emb, tensors["model.embed_tokens.weight"][rows])
    # The measure sees a full tensor: reading the embedding whole and copying it exceeds the bound.
    grown = _load_growth(lambda: {n: t.clone() for n, t in
                                  loading.read_full_tensors(path, ["model.embed_tokens.weight"]).items()})
    assert grown >= bound


# ------------------------------------------------------------------------------------------------
# Shards that cannot be made.
# ------------------------------------------------------------------------------------------------

def test_indivisible_sizes_are_refused_naming_both_numbers(tmp_path):
    tp3 = fake_group(3)[0]
    with pytest.raises(ValueError, match=r"num_heads \(8\).*world size \(3\)"):
        build_model(tp_config(8, 4), "cpu", torch.float32, tp=tp3)
    with pytest.raises(ValueError, match=r"intermediate_size \(126\).*world size \(4\)"):
        LlamaShard.of(tp_config(8, 4, intermediate_size=126), fake_group(4)[0])
    with pytest.raises(ValueError, match=r"num_kv_heads \(3\).*world size \(2\)"):
        LlamaShard.of(tp_config(12, 3, hidden_size=48), fake_group(2)[0])
    cfg = tp_config(8, 4)
    path = write_hf_dir(tmp_path / "m", cfg, tp_tensors(cfg))
    with pytest.raises(ValueError, match=r"num_heads \(8\).*world size \(3\)"):
        open_checkpoint(path, tp=tp3)  # before any tensor is read


def test_shard_layout_splits_and_replicates_kv_heads():
    cfg = tp_config(8, 2)
    shards = [LlamaShard.of(cfg, tp) for tp in fake_group(4)]
    assert [(s.q_head0, s.num_heads) for s in shards] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    # Query heads 0-3 read KV head 0, 4-7 KV head 1: each KV head lives on two ranks.
    assert [(s.kv_head0, s.num_kv_heads) for s in shards] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert [(s.vocab0, s.vocab_rows) for s in shards] == [(0, 25), (25, 25), (50, 25), (75, 25)]
    assert shards[3].vocab_slice(cfg.vocab_size) == TensorSlice(0, 75, 97, 25)  # 3 padded rows
    whole = LlamaShard.of(cfg, SINGLE)
    assert (whole.num_heads, whole.num_kv_heads, whole.intermediate_size, whole.vocab_rows) == (8, 2, 128, 97)


def test_runner_caches_only_this_ranks_kv_heads():
    for world_size, heads, local in ((2, (8, 4), 2), (4, (8, 2), 1)):
        model = build_model(tp_config(*heads), "cpu", torch.float32, tp=fake_group(world_size)[1])
        assert model.local_num_kv_heads == local
        runner = ModelRunner(model, small_engine(num_blocks=4), torch.device("cpu"))
        assert runner.cache.k.shape == (2, 4, 16, local, 8) and runner.cache.v.shape == runner.cache.k.shape
