"""Turns scheduled requests into model inputs and runs prefill and decode steps.

Decode runs as one CUDA graph per batch-size bucket on GPU; a prefill of up to
``prefill_graph_tokens`` tokens as one per token bucket (padded to a power of two and to
``max_batch_size`` sequences), a longer one eagerly. The host reads results once per step (the
sampled tokens), never inside the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from eaglespec.config import EngineConfig
from eaglespec.engine.graphs import StepGraphs, bucket_for, bucket_sizes
from eaglespec.engine.request import Request
from eaglespec.kv_cache import (BlockAllocator, KVCache, block_table_tensor, blocks_for, pool_blocks_from_memory,
                                slots_for)
from eaglespec.models.attention_step import DecodeStep, PrefillStep
from eaglespec.models.llama import LlamaForCausalLM, ModelOutput
from eaglespec.ops.attention import default_scale
from eaglespec.ops.sampling import SamplingTensors, sample


# A prefill's function on its inputs (``ModelRunner.prefill_inputs``): (inputs, greedy,
# max_query_len or None for the token rows) -> outputs, the next token per sequence first.
PrefillFn = Callable[[dict[str, torch.Tensor], bool, "int | None"], tuple[torch.Tensor, ...]]


@dataclass(slots=True)
class PrefillProgram:
    """What one kind of prefill runs (``ModelRunner.make_prefill_program``)."""

    fn: PrefillFn
    inputs: Callable[[int, int, torch.device], dict[str, torch.Tensor]]  # (tokens, seqs, device) -> padding
    stage: Callable[[dict[str, torch.Tensor], list[Request], list[int]], None]  # (host inputs, reqs, new counts)
    graphs: dict[bool, StepGraphs]  # greedy / sampled, keyed inside by token bucket


# A prefill's per-token and per-sequence inputs: (one per "token" or "seq", dtype, padding value).
# Beside them: cu_seqlens [seqs + 1] and block_tables [seqs, max_blocks] (int32).
PREFILL_FIELDS = {
    "input_ids": ("token", torch.int64, 0), "positions": ("token", torch.int64, 0),
    "slots": ("token", torch.int64, 0),  # the scratch block's first slot
    "seq_lens": ("seq", torch.int32, 0), "last_rows": ("seq", torch.int64, 0),
    "temperature": ("seq", torch.float32, 0.0), "top_k": ("seq", torch.int32, 0),
    "top_p": ("seq", torch.float32, 1.0), "seeds": ("seq", torch.int64, 0), "offsets": ("seq", torch.int64, 0),
}


def write_padded(host: torch.Tensor, values: list, pad) -> None:
    """``values`` into the first entries of a 1-D host buffer, ``pad`` into the rest."""
    view = host.numpy()
    view[:len(values)] = values
    view[len(values):] = pad


def prefill_bucket_sizes(max_tokens: int) -> list[int]:
    """Token counts a prefill is padded to: 16, 32, 64, ... up to max_tokens (included); none
    for 0 (every prefill eager)."""
    if max_tokens <= 0:
        return []
    sizes, size = [], 16
    while size < max_tokens:
        sizes.append(size)
        size *= 2
    return sizes + [max_tokens]


def resolve_backend(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return requested


def size_kv_pool(model: LlamaForCausalLM, cfg: EngineConfig, device: torch.device, dtype: torch.dtype,
                 usable_blocks: int) -> int:
    """Number of KV blocks: given, or from free GPU memory (a token budget on CPU) but never more
    than ``usable_blocks``, what a full batch of the longest sequences can hold: there is no
    prefix cache to fill, and the memory left serves graphs and activations (four engines of
    0.3 of free memory each left an 80 GB card too little for sampled graphs, H100, 2026-12-05)."""
    mc = model.config
    if cfg.num_blocks:
        return cfg.num_blocks
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        blocks = pool_blocks_from_memory(free, cfg.gpu_memory_fraction, mc.num_layers, cfg.block_size,
                                         model.local_num_kv_heads, mc.head_dim, dtype)
    else:
        blocks = cfg.kv_cache_tokens // cfg.block_size + 1
    return min(blocks, usable_blocks)


@dataclass(frozen=True, slots=True)
class RowFields:
    """Names of a step's per-request input fields, by dtype. A step that needs more than a
    decode step (the speculative one) extends ``DECODE_ROWS``; the decode fields stay first."""

    i64: tuple[str, ...]
    i32: tuple[str, ...]
    f32: tuple[str, ...]

    @property
    def row_bytes(self) -> int:
        return 8 * len(self.i64) + 4 * len(self.i32) + 4 * len(self.f32)

    def extended(self, i64: tuple[str, ...] = (), i32: tuple[str, ...] = (), f32: tuple[str, ...] = ()) -> "RowFields":
        return RowFields(self.i64 + i64, self.i32 + i32, self.f32 + f32)


# What a decode step reads per request (sampling included).
DECODE_ROWS = RowFields(i64=("input_ids", "positions", "slots", "seeds", "offsets"), i32=("context_lens", "top_k"),
                        f32=("temperature", "top_p"))


class StepRows:
    """A step's inputs packed into one byte buffer, so staging them is a single copy.

    Sections, one row per request: int64 fields, int32 fields, fp32 fields (named by ``fields``),
    then the int32 block table [bucket, max_blocks]. ``rows["positions"]`` is a [bucket] view; the
    same layout serves the pinned host twin (filled through numpy) and the device buffer the graph
    reads.
    """

    def __init__(self, packed: torch.Tensor, max_blocks: int, fields: RowFields = DECODE_ROWS):
        self.fields = fields
        bucket = packed.numel() // (fields.row_bytes + 4 * max_blocks)
        views, offset = [], 0
        for dtype, shape in ((torch.int64, (len(fields.i64), bucket)), (torch.int32, (len(fields.i32), bucket)),
                             (torch.float32, (len(fields.f32), bucket)), (torch.int32, (bucket, max_blocks))):
            nbytes = shape[0] * shape[1] * dtype.itemsize
            views.append(packed[offset:offset + nbytes].view(dtype).view(shape))
            offset += nbytes
        self.i64, self.i32, self.f32, self.block_tables = views

    @staticmethod
    def allocate(bucket: int, max_blocks: int, device: torch.device, fields: RowFields = DECODE_ROWS) -> torch.Tensor:
        return torch.zeros(bucket * (fields.row_bytes + 4 * max_blocks), dtype=torch.uint8, device=device)

    def __getitem__(self, name: str) -> torch.Tensor:
        f = self.fields
        for section, names in ((self.i64, f.i64), (self.i32, f.i32), (self.f32, f.f32)):
            if name in names:
                return section[names.index(name)]
        raise KeyError(name)

    def sampling(self) -> SamplingTensors:
        return SamplingTensors(self["temperature"], self["top_k"], self["top_p"], self["seeds"], self["offsets"])


@dataclass(slots=True)
class DecodeFlight:
    """A decode step queued on the device whose tokens the host has not read yet."""

    reqs: list[Request]
    tokens_device: torch.Tensor  # [bucket] int64, the step's output buffer
    tokens_host: torch.Tensor  # [bucket] int64: pinned, filled by a copy queued after the step (CUDA)
    done: torch.cuda.Event | None  # recorded after that copy (None on the CPU: already done)

    def wait(self) -> list[int]:
        """The sampled token of each request (blocks until the step has run)."""
        if self.done is not None:
            self.done.synchronize()
        return self.tokens_host[:len(self.reqs)].tolist()


class ModelRunner:
    """Owns the target model's KV cache and runs its forward passes."""

    def __init__(self, model: LlamaForCausalLM, cfg: EngineConfig, device: torch.device, lookahead: int = 1,
                 pool_size: Callable[[int], int] = lambda blocks: blocks):
        """lookahead: cache positions one step writes from a sequence's last cached token (1 for
        plain decoding, depth + 1 for a speculative tree); block tables are wide enough for a
        sequence one token short of ``max_model_len`` to take such a step. pool_size: the
        number of KV blocks to allocate given this device's (tensor parallelism: the minimum
        over ranks, which must all hold the same blocks)."""
        self.cfg = cfg
        self.device = device
        mc = model.config
        self.dtype = model.output_weight.dtype
        self.backend = resolve_backend(cfg.attention_backend, device)
        # The model's kernel set goes with the attention backend (same weights, not copied).
        self.model = model.with_kernels(self.backend)
        self.scale = default_scale(mc.head_dim)
        self.max_blocks_per_seq = blocks_for(cfg.max_model_len - 1 + lookahead, cfg.block_size)
        # Block 0 is the scratch block, held by no sequence.
        usable_blocks = cfg.max_batch_size * self.max_blocks_per_seq + 1
        num_blocks = pool_size(size_kv_pool(model, cfg, device, self.dtype, usable_blocks))
        # This rank's KV heads only (all of them without tensor parallelism).
        self.cache = KVCache.allocate(mc.num_layers, num_blocks, cfg.block_size, model.local_num_kv_heads,
                                      mc.head_dim, self.dtype, device)
        self.allocator = BlockAllocator(num_blocks, cfg.block_size)
        self.buckets = bucket_sizes(cfg.max_batch_size)
        use_graphs = cfg.use_cuda_graphs and device.type == "cuda" and self.backend == "triton"
        self.use_graphs = use_graphs
        self._token_buffers: dict[int, list[torch.Tensor]] = {}  # see _token_buffer
        # Greedy batches skip the sampling distribution entirely (an argmax), so they get their own graphs.
        self.decode_graphs = {greedy: StepGraphs(lambda x, g=greedy: self._decode_fn(x, g), self.static_inputs,
                                                 use_graphs) for greedy in (True, False)}
        self.prefill_buckets = prefill_bucket_sizes(min(cfg.prefill_graph_tokens, cfg.prefill_token_budget))
        self.prefill_program = self.make_prefill_program(self._prefill_fn)

    # ------------------------------------------------------------------ prefill

    @torch.inference_mode()
    def prefill(self, reqs: list[Request], ends: list[int] | None = None,
                program: PrefillProgram | None = None) -> tuple[torch.Tensor, list[int]]:
        """Prefill each request's uncached tokens up to ``ends`` (default: all of them; blocks
        already allocated). A request whose end is short of its length (a chunk of a long
        prompt) gets a sampled token too, which the caller drops.

        A prefill of at most ``prefill_graph_tokens`` tokens runs padded to a token bucket and
        to ``max_batch_size`` sequences, through the program's graphs (replayed CUDA graphs on a
        GPU, the same function eagerly elsewhere); a longer one runs eagerly at its exact size.
        ``program`` (default the runner's own) serves a prefill that does more, such as the
        speculative engine's, which prefills the head too.

        Returns the sampled next token per request [B] (on the device) and the number of new
        tokens per request.
        """
        program = program or self.prefill_program
        new_counts = [(ends[i] if ends else r.num_tokens) - r.num_cached for i, r in enumerate(reqs)]
        total = sum(new_counts)
        greedy = all(r.params.temperature == 0 for r in reqs)
        if self.prefill_buckets and total <= self.prefill_buckets[-1]:
            bucket = bucket_for(total, self.prefill_buckets)
            graphs = program.graphs[greedy]
            program.stage(graphs.staging(bucket), reqs, new_counts)
            tokens = graphs.run(bucket)[0]
        else:  # too long for a graph: launches are a small part of its time
            host = program.inputs(total, len(reqs), torch.device("cpu"))
            program.stage(host, reqs, new_counts)
            x = {name: value.to(self.device) for name, value in host.items()}
            tokens = program.fn(x, greedy, max(new_counts))[0]
        for r, n in zip(reqs, new_counts):
            r.num_cached += n
        return tokens[:len(reqs)], new_counts

    def prefill_inputs(self, tokens: int, seqs: int, device: torch.device) -> dict[str, torch.Tensor]:
        """A prefill's inputs for ``tokens`` token rows and ``seqs`` sequences, all padding
        (``PREFILL_FIELDS``): every token in the scratch block's first slot, every sequence empty."""
        inputs = {name: torch.full((tokens if per == "token" else seqs,), pad, dtype=dtype, device=device)
                  for name, (per, dtype, pad) in PREFILL_FIELDS.items()}
        inputs["cu_seqlens"] = torch.zeros(seqs + 1, dtype=torch.int32, device=device)
        inputs["block_tables"] = torch.zeros(seqs, self.max_blocks_per_seq, dtype=torch.int32, device=device)
        return inputs

    def stage_prefill(self, host: dict[str, torch.Tensor], reqs: list[Request], new_counts: list[int]) -> None:
        """Write a prefill's inputs into host buffers sized by ``prefill_inputs``; what the
        requests leave of them gets the padding values."""
        bs = self.cfg.block_size
        values = {name: [] for name in PREFILL_FIELDS}
        cu = [0]
        tables = host["block_tables"].numpy()
        tables.fill(0)
        for i, (r, n) in enumerate(zip(reqs, new_counts)):
            start = r.num_cached
            values["input_ids"] += r.all_ids[start:start + n]
            values["positions"] += range(start, start + n)
            values["slots"] += slots_for(r.blocks, start, start + n, bs)
            cu.append(cu[-1] + n)
            for name, value in (("seq_lens", start + n), ("last_rows", cu[-1] - 1),
                                ("temperature", r.params.temperature), ("top_k", min(r.params.top_k, 2**31 - 1)),
                                ("top_p", r.params.top_p), ("seeds", r.seed_int64), ("offsets", len(r.output_ids))):
                values[name].append(value)
            tables[i, :len(r.blocks)] = r.blocks
        for name, (_, _, pad) in PREFILL_FIELDS.items():
            write_padded(host[name], values[name], pad)
        write_padded(host["cu_seqlens"], cu, cu[-1])  # empty sequences start and end at the last token

    def prefill_forward(self, x: dict[str, torch.Tensor], greedy: bool, max_query_len: int | None = None,
                        want_hidden: bool = False, want_taps: bool = False) -> tuple[torch.Tensor, ModelOutput]:
        """A prefill's forward on inputs laid out by ``prefill_inputs``: the next token of every
        sequence [S] (greedy or sampled per row) and the model output, whose hidden states /
        taps cover every token row when asked. max_query_len: a bound on any sequence's new
        tokens (default the token rows, as a graph's bucket must assume)."""
        step = PrefillStep(x["slots"], x["block_tables"], x["cu_seqlens"], x["seq_lens"],
                           max_query_len or x["input_ids"].shape[0], self.scale, self.backend)
        last_rows = x["last_rows"]
        want_all = want_hidden or want_taps
        # Hidden states (or taps) of every token, but logits of each request's last token only:
        # those of a whole prefill chunk would be [8192, vocab] fp32, gigabytes for nothing.
        out = self.model(x["input_ids"], x["positions"], step, self.cache, logits_rows=None if want_all else last_rows,
                         want_hidden=want_all, want_taps=want_taps, want_logits=not want_all,
                         gather_logits=not greedy)
        if want_all:
            last = out.hidden.index_select(0, last_rows)
            out.logits = self.model.local_logits(last) if greedy else self.model.compute_logits(last)
            out.hidden = out.hidden if want_hidden else None
        if greedy:
            return self.model.greedy_tokens(out.logits), out
        sampling = SamplingTensors(x["temperature"], x["top_k"], x["top_p"], x["seeds"], x["offsets"])
        return sample(out.logits, sampling), out

    def _prefill_fn(self, x: dict[str, torch.Tensor], greedy: bool,
                    max_query_len: int | None = None) -> tuple[torch.Tensor, ...]:
        return (self.prefill_forward(x, greedy, max_query_len)[0],)

    def make_prefill_program(self, fn: PrefillFn,
                             extra_inputs: Callable[[int, int, torch.device], dict[str, torch.Tensor]] | None = None,
                             extra_stage: Callable[[dict[str, torch.Tensor], list[Request], list[int]], None] | None = None,
                             ) -> PrefillProgram:
        """A prefill running ``fn`` on ``prefill_inputs`` plus ``extra_inputs`` (same token rows and
        sequences; padding values), filled by ``stage_prefill`` then ``extra_stage``, with its
        greedy and sampled graphs, one per token bucket."""

        def inputs(tokens: int, seqs: int, device: torch.device) -> dict[str, torch.Tensor]:
            return {**self.prefill_inputs(tokens, seqs, device),
                    **(extra_inputs(tokens, seqs, device) if extra_inputs else {})}

        def stage(host: dict[str, torch.Tensor], reqs: list[Request], new_counts: list[int]) -> None:
            self.stage_prefill(host, reqs, new_counts)
            if extra_stage is not None:
                extra_stage(host, reqs, new_counts)

        seqs = self.cfg.max_batch_size
        graphs = {greedy: StepGraphs(lambda x, g=greedy: fn(x, g, None), lambda t: inputs(t, seqs, self.device),
                                     self.use_graphs) for greedy in (True, False)}
        return PrefillProgram(fn, inputs, stage, graphs)

    def warm_prefill_graphs(self, program: PrefillProgram | None = None) -> None:
        """Capture the greedy prefill graphs of every bucket now (on padding only), so that no
        capture lands in serving; sampled ones are captured on first use, as decode's are."""
        if not self.use_graphs:
            return
        program = program or self.prefill_program
        for bucket in reversed(self.prefill_buckets):  # largest first: the smaller ones reuse its pool
            program.stage(program.graphs[True].staging(bucket), [], [])
            program.graphs[True].run(bucket)

    # ------------------------------------------------------------------ decode

    def static_inputs(self, bucket: int, fields: RowFields = DECODE_ROWS) -> dict[str, torch.Tensor]:
        """The device buffer of a step's inputs (see ``StepRows``), with harmless padding values."""
        packed = StepRows.allocate(bucket, self.max_blocks_per_seq, self.device, fields)
        rows = StepRows(packed, self.max_blocks_per_seq, fields)
        rows.i32.fill_(1)
        rows.f32.fill_(1.0)
        return {"packed": packed}

    def _decode_fn(self, x: dict[str, torch.Tensor], greedy: bool) -> tuple[torch.Tensor, ...]:
        tokens, _ = self.decode_forward(StepRows(x["packed"], self.max_blocks_per_seq), greedy)
        return (tokens,)

    def decode_forward(self, rows: StepRows, greedy: bool, want_hidden: bool = False,
                       want_taps: bool = False) -> tuple[torch.Tensor, ModelOutput]:
        """One decode step's forward and next tokens [bucket] (greedy or sampled per row)."""
        step = DecodeStep(rows["slots"], rows.block_tables, rows["context_lens"], self.scale, self.backend)
        # Greedy: each rank's argmax over its vocabulary rows, never the gathered [B, vocab] logits.
        out = self.model(rows["input_ids"], rows["positions"], step, self.cache, want_hidden=want_hidden,
                         want_taps=want_taps, gather_logits=not greedy)
        if greedy:
            return self.model.greedy_tokens(out.logits), out
        return sample(out.logits, rows.sampling()), out

    def stage_inputs(self, graphs: StepGraphs, reqs: list[Request], bucket: int, tokens_in_flight: int = 0,
                     fields: RowFields = DECODE_ROWS) -> StepRows:
        """Write one step's inputs, padded to ``bucket`` rows, into the graphs' host staging
        buffer: one host-to-device copy per step whatever the batch size. Fills the decode
        fields and returns the host rows, so a step with more ``fields`` fills its own.

        tokens_in_flight: 1 when each request's input token is still on the device (the output
        of a decode step not read yet); its input id is then filled in on the device and the
        sampling counter counts it."""
        rows = StepRows(graphs.staging(bucket)["packed"], self.max_blocks_per_seq, fields)
        i64, i32, f32, tables = rows.i64.numpy(), rows.i32.numpy(), rows.f32.numpy(), rows.block_tables.numpy()
        bs = self.cfg.block_size
        n64, n32, nf = len(DECODE_ROWS.i64), len(DECODE_ROWS.i32), len(DECODE_ROWS.f32)
        i64.fill(0)
        i32.fill(1)
        f32.fill(1.0)
        tables.fill(0)
        i32[fields.i32.index("top_k"), :] = 0
        f32[fields.f32.index("temperature"), :] = 0.0
        for i, r in enumerate(reqs):
            p = r.num_cached
            blocks = r.blocks
            token = r.token_at(p) if not tokens_in_flight else 0
            i64[:n64, i] = (token, p, blocks[p // bs] * bs + p % bs, r.seed_int64, len(r.output_ids) + tokens_in_flight)
            i32[:n32, i] = (p + 1, r.params.top_k)
            f32[:nf, i] = (r.params.temperature, r.params.top_p)
            tables[i, :len(blocks)] = blocks
        return rows

    @torch.inference_mode()
    def launch_decode(self, reqs: list[Request], follow: DecodeFlight | None = None,
                      graphs: dict[bool, StepGraphs] | None = None, fields: RowFields = DECODE_ROWS,
                      fill: Callable[[StepRows, list[Request]], None] | None = None) -> DecodeFlight:
        """Queue one decode step: one token for each request (whose last token is not cached
        yet), without waiting for it. With ``follow`` (the step before, same requests in the
        same order, not read yet) the input tokens are that step's outputs, taken on the device.

        ``graphs`` (greedy and sampled, default the runner's own), ``fields`` and ``fill`` (which
        writes the extra fields) serve a decode step that does more, such as the speculative
        engine's plain step, which also hands its features to the draft."""
        bucket = bucket_for(len(reqs), self.buckets)
        greedy = all(r.params.temperature == 0 for r in reqs)
        graphs = (graphs or self.decode_graphs)[greedy]
        rows = self.stage_inputs(graphs, reqs, bucket, tokens_in_flight=int(follow is not None), fields=fields)
        if fill is not None:
            fill(rows, reqs)
        prepare = None
        if follow is not None:
            prev = follow.tokens_device

            def prepare(static: dict[str, torch.Tensor]) -> None:
                StepRows(static["packed"], self.max_blocks_per_seq, fields)["input_ids"].copy_(prev)
        (tokens,) = graphs.run(bucket, prepare)
        host, done = tokens, None  # on the CPU the step has already run
        if tokens.is_cuda:
            host = self._token_buffer(bucket)
            host.copy_(tokens, non_blocking=True)  # queued now: the next replay overwrites ``tokens``
            done = torch.cuda.Event()
            done.record()
        for r in reqs:
            r.num_cached += 1
        return DecodeFlight(reqs, tokens, host, done)

    def _token_buffer(self, bucket: int) -> torch.Tensor:
        """A pinned [bucket] int64 buffer for a decode step's tokens. Two per bucket, used in
        turn: at most two steps are in flight, and the older one is read before a third starts."""
        pair = self._token_buffers.get(bucket)
        if pair is None:
            pair = self._token_buffers[bucket] = [torch.empty(bucket, dtype=torch.int64, pin_memory=True)
                                                  for _ in range(2)]
        pair.reverse()
        return pair[0]

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
