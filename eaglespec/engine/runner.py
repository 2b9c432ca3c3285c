"""Turns scheduled requests into model inputs and runs prefill and decode steps.

Prefill runs eagerly (its shapes vary); decode runs as one CUDA graph per batch-size bucket on
GPU. The host reads results once per step (the sampled tokens), never inside the step.
"""

from __future__ import annotations

import dataclasses

import torch

from eaglespec.config import EngineConfig
from eaglespec.engine.graphs import StepGraphs, bucket_for, bucket_sizes
from eaglespec.engine.request import Request
from eaglespec.kv_cache import BlockAllocator, block_table_tensor, pool_blocks_from_memory, slots_for
from eaglespec.models.attention_step import DecodeStep, KVCache, PrefillStep
from eaglespec.models.llama import LlamaForCausalLM, ModelOutput
from eaglespec.ops.attention import default_scale
from eaglespec.ops.sampling import SamplingTensors, sample


def resolve_backend(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return requested


def size_kv_pool(model: LlamaForCausalLM, cfg: EngineConfig, device: torch.device, dtype: torch.dtype,
                 reserve_bytes: int = 0) -> int:
    """Number of KV blocks: given, from free GPU memory, or from a token budget on CPU."""
    mc = model.config
    if cfg.num_blocks:
        return cfg.num_blocks
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return pool_blocks_from_memory(max(free - reserve_bytes, 0), cfg.gpu_memory_fraction, mc.num_layers,
                                       cfg.block_size, mc.num_kv_heads, mc.head_dim, dtype)
    return cfg.kv_cache_tokens // cfg.block_size + 1


def request_sampling(reqs: list[Request], device) -> SamplingTensors:
    """Sampling rows for requests; the offset (tokens generated so far) varies the noise per step."""
    return SamplingTensors.from_params([dataclasses.replace(r.params, seed=r.seed) for r in reqs],
                                       [len(r.output_ids) for r in reqs], device)


class ModelRunner:
    """Owns the target model's KV cache and runs its forward passes."""

    def __init__(self, model: LlamaForCausalLM, cfg: EngineConfig, device: torch.device):
        self.model = model
        self.cfg = cfg
        self.device = device
        mc = model.config
        self.dtype = model.output_weight.dtype
        self.backend = resolve_backend(cfg.attention_backend, device)
        self.scale = default_scale(mc.head_dim)
        num_blocks = size_kv_pool(model, cfg, device, self.dtype)
        self.cache = KVCache.allocate(mc.num_layers, num_blocks, cfg.block_size, mc.num_kv_heads,
                                      mc.head_dim, self.dtype, device)
        self.allocator = BlockAllocator(num_blocks, cfg.block_size)
        self.max_blocks_per_seq = (cfg.max_model_len + cfg.block_size - 1) // cfg.block_size
        self.buckets = bucket_sizes(cfg.max_batch_size)
        use_graphs = cfg.use_cuda_graphs and device.type == "cuda" and self.backend == "triton"
        self.decode_graphs = StepGraphs(self._decode_fn, self._decode_static_inputs, use_graphs)

    # ------------------------------------------------------------------ prefill

    @torch.inference_mode()
    def prefill(self, reqs: list[Request], want_hidden: bool = False,
                want_taps: bool = False) -> tuple[torch.Tensor, ModelOutput, list[int]]:
        """Prefill the uncached tokens of each request (blocks already allocated).

        Returns the sampled next token per request [B] (on device), the model output whose
        logits are those of each request's last token (hidden/taps cover *every* prefilled
        token when asked), and the number of new tokens per request.
        """
        bs = self.cfg.block_size
        ids, pos, slots, cu, lens, new_counts = [], [], [], [0], [], []
        for r in reqs:
            tokens = r.all_ids
            start, end = r.num_cached, len(tokens)
            ids += tokens[start:end]
            pos += list(range(start, end))
            slots += slots_for(r.blocks, start, end, bs)
            cu.append(cu[-1] + end - start)
            lens.append(end)
            new_counts.append(end - start)
        dev = self.device
        step = PrefillStep(
            slots=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=block_table_tensor([r.blocks for r in reqs], self.max_blocks_per_seq, dev),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            max_query_len=max(new_counts), scale=self.scale, backend=self.backend)
        last_rows = torch.tensor([c - 1 for c in cu[1:]], dtype=torch.int64, device=dev)
        want_all = want_hidden or want_taps
        out = self.model(torch.tensor(ids, dtype=torch.int64, device=dev),
                         torch.tensor(pos, dtype=torch.int64, device=dev), step, self.cache,
                         logits_rows=None if want_all else last_rows,
                         want_hidden=want_hidden, want_taps=want_taps)
        if want_all:
            out.logits = out.logits.index_select(0, last_rows)
        tokens = sample(out.logits, request_sampling(reqs, dev))
        for r, n in zip(reqs, new_counts):
            r.num_cached += n
            r.target_forwards += 1
        return tokens, out, new_counts

    # ------------------------------------------------------------------ decode

    def _decode_static_inputs(self, bucket: int) -> dict[str, torch.Tensor]:
        dev = self.device
        zeros = lambda dtype: torch.zeros(bucket, dtype=dtype, device=dev)  # noqa: E731
        return {
            "input_ids": zeros(torch.int64), "positions": zeros(torch.int64), "slots": zeros(torch.int64),
            "block_tables": torch.zeros(bucket, self.max_blocks_per_seq, dtype=torch.int32, device=dev),
            "context_lens": torch.ones(bucket, dtype=torch.int32, device=dev),
            "temperature": zeros(torch.float32), "top_k": zeros(torch.int32),
            "top_p": torch.ones(bucket, dtype=torch.float32, device=dev),
            "seeds": zeros(torch.int64), "offsets": zeros(torch.int64),
        }

    def _decode_fn(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        step = DecodeStep(x["slots"], x["block_tables"], x["context_lens"], self.scale, self.backend)
        out = self.model(x["input_ids"], x["positions"], step, self.cache)
        st = SamplingTensors(x["temperature"], x["top_k"], x["top_p"], x["seeds"], x["offsets"])
        return (sample(out.logits, st),)

    def decode_inputs(self, reqs: list[Request], bucket: int) -> dict[str, torch.Tensor]:
        """Host-built inputs for one decode step, padded to ``bucket`` rows."""
        bs = self.cfg.block_size
        pad = bucket - len(reqs)
        ids, pos, slots, lens = [], [], [], []
        for r in reqs:
            p = r.num_cached
            ids.append(r.all_ids[p])
            pos.append(p)
            slots.append(r.blocks[p // bs] * bs + p % bs)
            lens.append(p + 1)
        st = request_sampling(reqs, "cpu")
        dev = self.device
        as_tensor = lambda values, dtype, fill: torch.tensor(values + [fill] * pad, dtype=dtype)  # noqa: E731
        host = {
            "input_ids": as_tensor(ids, torch.int64, 0), "positions": as_tensor(pos, torch.int64, 0),
            "slots": as_tensor(slots, torch.int64, 0),
            "block_tables": block_table_tensor([r.blocks for r in reqs] + [[]] * pad, self.max_blocks_per_seq, "cpu"),
            "context_lens": as_tensor(lens, torch.int32, 1),
            "temperature": torch.cat([st.temperature, torch.zeros(pad)]),
            "top_k": torch.cat([st.top_k, torch.zeros(pad, dtype=torch.int32)]),
            "top_p": torch.cat([st.top_p, torch.ones(pad)]),
            "seeds": torch.cat([st.seeds, torch.zeros(pad, dtype=torch.int64)]),
            "offsets": torch.cat([st.offsets, torch.zeros(pad, dtype=torch.int64)]),
        }
        return {k: v.to(dev, non_blocking=True) for k, v in host.items()}

    @torch.inference_mode()
    def decode(self, reqs: list[Request]) -> torch.Tensor:
        """One token for each request (whose last token is not cached yet). Returns [B] on device."""
        bucket = bucket_for(len(reqs), self.buckets)
        (tokens,) = self.decode_graphs.run(bucket, self.decode_inputs(reqs, bucket))
        for r in reqs:
            r.num_cached += 1
            r.target_forwards += 1
        return tokens[:len(reqs)]

    @torch.inference_mode()
    def full_logits(self, token_ids: list[int]) -> torch.Tensor:
        """[T, vocab] logits of a whole sequence, through a temporary slice of the pool."""
        blocks: list[int] = []
        self.allocator.grow(blocks, len(token_ids))
        try:
            bs = self.cfg.block_size
            dev = self.device
            step = PrefillStep(
                slots=torch.tensor(slots_for(blocks, 0, len(token_ids), bs), dtype=torch.int64, device=dev),
                block_tables=block_table_tensor([blocks], self.max_blocks_per_seq, dev),
                cu_seqlens_q=torch.tensor([0, len(token_ids)], dtype=torch.int32, device=dev),
                seq_lens=torch.tensor([len(token_ids)], dtype=torch.int32, device=dev),
                max_query_len=len(token_ids), scale=self.scale, backend=self.backend)
            ids = torch.tensor(token_ids, dtype=torch.int64, device=dev)
            return self.model(ids, torch.arange(len(token_ids), device=dev), step, self.cache).logits
        finally:
            self.allocator.release(blocks)
