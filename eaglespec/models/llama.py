"""Dense Llama 2 / 3.x decoder over a flat batch of tokens and a paged KV cache.

Tokens of all sequences in a step are packed into one [T] vector; how they attend (prefill,
decode, tree verify) is decided by the ``AttentionStep`` passed to ``forward``. Projections are
fused at load time (q|k|v and gate|up) so a decode step launches fewer, larger matrix products;
the loader maps Hugging Face names onto the fused slices.

One forward per kernel set, chosen when the model is built (``kernels``; ``with_kernels`` gives
the same weights on the other set): "torch" is the reference, compared with transformers;
"triton" runs the element-wise work between the matrix products as fused kernels of
``eaglespec.ops.fused``: each residual add is fused into the next RMSNorm (a layer hands on
(mlp_out, residual) and the sum is formed inside the norm), RoPE and the K/V cache store are one
kernel, and silu(gate) * up is one kernel. On "triton" a step of at most FEW_TOKENS tokens
(small-batch decode, the verify forward of a small tree) goes further, by its shape alone:
norms, RoPE, the cache store, SwiGLU and the residual adds ride along with the products
(``eaglespec.ops.gemv``), four launches per layer plus attention. Every kernel's PyTorch
reference sits beside it in ``eaglespec.ops``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from eaglespec.config import LlamaConfig
from eaglespec.kv_cache import KVCache
from eaglespec.models.attention_step import AttentionStep
from eaglespec.models.tensor_parallel import SINGLE, LlamaShard, TensorParallel
from eaglespec.ops import fused, gemv
from eaglespec.ops.linear import Linear, linear
from eaglespec.ops.sampling import greedy_argmax
from eaglespec.ops.rope_table import rope_table, rope_table_ref


KERNEL_SETS = ("torch", "triton")

# Steps of at most this many tokens run every layer on the folded products of ``ops.gemv`` (one
# program holds all rows of a weight tile, so each weight is read once): the most the kernels
# take. With the tiles of design note 58 (narrow, two to four warps, deep pipelines) a 33-row step
# of SmolLM2's products costs 26 µs a layer against 28 for cuBLAS plus the separate element-wise
# kernels, and folded steps of 17-64 tokens ran level with or up to 2 % under unfolded ones in
# one A/B/A (H100, 2026-12-06), with fewer launches (a batch-32 decode step 187 against 307).
# Before those tiles 33 rows cost 1.3x cuBLAS's path, and the limit was 16.
FEW_TOKENS = gemv.MAX_ROWS
# ...and only for layers small enough that launches, not weight bytes, set their time. On the
# H200 (2026-12-04, benchmarks/bench_gemv.py --rows 4,16) the 16-row tiles matched cuBLAS plus
# the separate kernels on SmolLM2's products (at most 1.8M weights) but ran 1.1-1.9x slower on
# Llama-3.1-8B's (16M to 117M weights): decode at batch 16 took 8.2 ms there against 5.0 ms on
# cuBLAS. One token row is a matrix-vector product, at full bandwidth for every size.
FOLDED_ROWS_MAX_WEIGHTS = 4 * 1024 * 1024


def folded_token_limit(cfg: LlamaConfig, shard: "LlamaShard") -> int:
    """The most tokens a step may have to run its layers on the folded products: FEW_TOKENS
    when this rank's largest layer product holds at most FOLDED_ROWS_MAX_WEIGHTS weights, else 1."""
    qkv_rows = (shard.num_heads + 2 * shard.num_kv_heads) * cfg.head_dim
    largest = cfg.hidden_size * max(qkv_rows, 2 * shard.intermediate_size)
    return FEW_TOKENS if largest <= FOLDED_ROWS_MAX_WEIGHTS else 1


def checked_kernels(kernels: str) -> str:
    """``kernels`` if it names a kernel set, else a ValueError naming the choices."""
    if kernels not in KERNEL_SETS:
        raise ValueError(f"kernels must be one of {KERNEL_SETS}, got {kernels!r}")
    return kernels


def with_kernels(module: nn.Module, kernels: str) -> nn.Module:
    """``module`` itself when it already runs on ``kernels``, else a shallow copy that shares
    every parameter, buffer and submodule and runs on ``kernels``."""
    if checked_kernels(kernels) == module.kernels:
        return module
    twin = copy.copy(module)
    twin.kernels = kernels
    return twin


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """[head_dim // 2] fp32 inverse frequencies, with the ``llama3`` long-context scaling."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        blend = (old_len / wavelen - low) / (high - low)
        blended = (1 - blend) * scaled / factor + blend * scaled
        in_band = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv = torch.where(in_band, blended, scaled)
    return inv.float()


# cos/sin [T, head_dim] for rotate-half RoPE, computed from positions (no table to size): the
# torch forward's op; the Triton forward runs its one-launch kernel ``ops.rope_table.rope_table``.
rope_cos_sin = rope_table_ref


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; cos/sin [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class LlamaAttention(nn.Module):
    """Self-attention over this rank's heads: q|k|v column-parallel, o_proj row-parallel and
    summed over the ranks (``tp``; the whole layer on one rank)."""

    def __init__(self, cfg: LlamaConfig, in_features: int | None = None, tp: TensorParallel = SINGLE):
        super().__init__()
        shard = LlamaShard.of(cfg, tp)
        self.tp = tp
        # Local head counts: the KV cache of this rank holds num_kv_heads heads.
        self.num_heads, self.num_kv_heads, self.head_dim = shard.num_heads, shard.num_kv_heads, cfg.head_dim
        q_size, kv_size = self.num_heads * cfg.head_dim, self.num_kv_heads * cfg.head_dim
        # EAGLE-3's draft layer reads [embedding | feature], twice the hidden size.
        self.qkv_proj = Linear(in_features or cfg.hidden_size, q_size + 2 * kv_size, bias=False)
        self.o_proj = Linear(q_size, cfg.hidden_size, bias=False)
        self.splits = (q_size, kv_size, kv_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                attn: AttentionStep, cache: KVCache) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.splits, dim=-1)
        q = apply_rope(q.view(t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(t, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        out = attn.attend(layer, q, k, v, cache)
        return self.tp.all_reduce(self.o_proj(out.reshape(t, -1)))

    def forward_fused(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                      attn: AttentionStep, cache: KVCache) -> torch.Tensor:
        """Triton path: RoPE and the cache store in one kernel that reads the qkv output in place."""
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.splits, dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        store = attn.kv_store(layer, cache)
        k_cache, v_cache, slots = (None, None, None) if store is None else store
        q, k = fused.rope_and_cache_write(q, k, v, cos, sin, k_cache, v_cache, slots)
        out = attn.attend(layer, q, k, v, cache, kv_written=store is not None)
        return self.tp.all_reduce(self.o_proj(out.reshape(t, -1)))


class LlamaMLP(nn.Module):
    """SwiGLU over this rank's intermediate columns: gate|up column-parallel, down_proj
    row-parallel and summed over the ranks."""

    def __init__(self, cfg: LlamaConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        self.tp = tp
        inter = LlamaShard.of(cfg, tp).intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * inter, bias=False)
        self.down_proj = Linear(inter, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.tp.all_reduce(self.down_proj(F.silu(gate) * up))

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.down_proj(fused.silu_mul(self.gate_up_proj(x))))


def add_rms_norm(norm: nn.Module, x: torch.Tensor,
                 residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(s), s) with s = x + residual (s = x when residual is None), on the fused kernel.

    ``norm`` is an RMSNorm, or nn.Identity for the EAGLE-1 draft layer without an input norm.
    """
    if isinstance(norm, RMSNorm):
        out, s = fused.rms_norm(x, norm.weight, norm.eps, residual)
        return out, x if s is None else s
    s = x if residual is None else x + residual
    return norm(s), s


def _eps(norm: nn.Module) -> float:
    return norm.eps if isinstance(norm, RMSNorm) else 0.0


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, input_norm: bool = True, tp: TensorParallel = SINGLE):
        super().__init__()
        # EAGLE-1/2 draft heads drop the first layer's input norm (their input is already mixed by fc).
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if input_norm else nn.Identity()
        self.self_attn = LlamaAttention(cfg, tp=tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg, tp)
        self.tp = tp

    def forward(self, x, cos, sin, layer, attn, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, attn, cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_fused(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                      sin: torch.Tensor, layer: int, attn: AttentionStep,
                      cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Triton path. The layer's input is x + residual (x alone when residual is None); returns
        (mlp_out, residual) whose sum is its output, so the add happens in the next norm."""
        h, residual = add_rms_norm(self.input_layernorm, x, residual)
        a = self.self_attn.forward_fused(h, cos, sin, layer, attn, cache)
        h, residual = add_rms_norm(self.post_attention_layernorm, a, residual)
        return self.mlp.forward_fused(h), residual

    def forward_few_tokens(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                           attn: AttentionStep, cache: KVCache) -> torch.Tensor:
        """A few tokens [T, H] (T <= FEW_TOKENS) through the layer on the folded products of
        ``eaglespec.ops.gemv``: four launches plus attention. The qkv product stores K/V where the
        step's ``kv_store`` says (the cache, or a tree step's buffers); a step without one gets
        the rotated k/v as views of the qkv output. Returns the layer's output [T, H].

        The residual rides in the row-parallel products' epilogue on rank 0 only, so the sum
        over the ranks is x + the full product."""
        sa, mlp, tp = self.self_attn, self.mlp, self.tp
        norm_in = self.input_layernorm.weight if isinstance(self.input_layernorm, RMSNorm) else None
        store = attn.kv_store(layer, cache)
        k_cache, v_cache, slots = (None, None, None) if store is None else store
        q, k, v = gemv.gemv_qkv_rope(sa.qkv_proj.weight, x, norm_in, _eps(self.input_layernorm), cos, sin,
                                     k_cache, v_cache, slots, sa.num_heads, sa.num_kv_heads)
        out = attn.attend(layer, q, k, v, cache, kv_written=store is not None)
        h = tp.all_reduce(gemv.gemv(sa.o_proj.weight, out.reshape(x.shape[0], -1),
                                    residual=x if tp.rank == 0 else None))
        norm = self.post_attention_layernorm
        act = gemv.gemv_silu_mul(mlp.gate_up_proj.weight, h, norm.weight, norm.eps)
        return tp.all_reduce(gemv.gemv(mlp.down_proj.weight, act, residual=h if tp.rank == 0 else None))


@dataclass(slots=True)
class ModelOutput:
    # [R, vocab] fp32, R = rows selected by logits_rows (all T when None); [R, vocab_rows], this
    # rank's vocabulary rows (fp32 or the weights' dtype: for an argmax only), when the forward was
    # asked not to gather them; None when not wanted
    logits: torch.Tensor | None
    hidden: torch.Tensor | None  # [R, H] final hidden state after the last norm (EAGLE-1/2 feature)
    taps: torch.Tensor | None  # [R, 3H] inputs of the EAGLE-3 tap layers, concatenated


class VocabParallelEmbedding(nn.Module):
    """Token embedding whose rows [vocab0, vocab0 + rows) live on this rank: ids outside the
    range embed to zeros and the ranks' rows are summed (every rank gets the full [T, H])."""

    def __init__(self, vocab0: int, rows: int, hidden_size: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, hidden_size))
        self.vocab0, self.tp = vocab0, tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.tp.enabled:  # one rank holds every row
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab0
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        return self.tp.all_reduce(x.masked_fill(outside[:, None], 0.0))


class LlamaBackbone(nn.Module):
    """The ``model.`` part of LlamaForCausalLM (names match Hugging Face)."""

    def __init__(self, cfg: LlamaConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        shard = LlamaShard.of(cfg, tp)
        self.embed_tokens = VocabParallelEmbedding(shard.vocab0, shard.vocab_rows, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, tp=tp) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """The target model, or with ``tp`` over p ranks this rank's shard of it (see
    ``LlamaShard``): the row-parallel products, the embedding and the output projection end in
    collectives, so hidden states, taps and logits come out whole and equal on every rank."""

    def __init__(self, cfg: LlamaConfig, kernels: str = "torch", tp: TensorParallel = SINGLE):
        super().__init__()
        self.config = cfg
        self.kernels = checked_kernels(kernels)  # which forward runs: "torch" or "triton"
        self.tp = tp
        self.shard = LlamaShard.of(cfg, tp)  # the heads / columns / vocabulary rows this rank holds
        self.folded_tokens = folded_token_limit(cfg, self.shard)  # steps up to this size: folded products
        self.model = LlamaBackbone(cfg, tp)
        rows = self.shard.vocab_rows
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, rows, bias=False)
        self.register_buffer("inv_freq", rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling),
                             persistent=False)

    @property
    def output_weight(self) -> torch.Tensor:
        """[vocab_rows, H] this rank's rows of the output projection (all of them on one rank)."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def local_num_kv_heads(self) -> int:
        """Key/value heads this rank computes and caches (its KV cache's head count)."""
        return self.shard.num_kv_heads

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        """[R, vocab_rows] logits of this rank's vocabulary rows -> [R, vocab] fp32, every rank."""
        full = self.tp.all_gather_last(local.float())
        return full[:, :self.config.vocab_size].contiguous()

    def local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[R, H] -> [R, vocab_rows] logits of this rank's vocabulary rows, in the weights' dtype:
        the greedy argmax needs no fp32 copy (at 256 rows of Llama-3.1-8B it took 94 us of a
        9.3 ms verify, H200), and ``gather_logits`` makes fp32 for the samplers."""
        return linear(hidden, self.output_weight)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[R, H] -> [R, vocab] fp32 logits over the whole vocabulary, on every rank."""
        return self.gather_logits(self.local_logits(hidden))

    def greedy_tokens(self, local_logits: torch.Tensor) -> torch.Tensor:
        """[R, vocab_rows] this rank's logits (``forward(..., gather_logits=False)``) -> [R] int64
        argmax over the whole vocabulary, the lowest id among equal maxima, on every rank.

        Only each rank's (max, id) pair crosses ranks, never the [R, vocab] logits."""
        shard = self.shard
        real = max(0, min(shard.vocab_rows, self.config.vocab_size - shard.vocab0))  # padding rows never win
        local = local_logits[:, :real]
        if not self.tp.enabled:  # one rank: the argmax alone (no extra kernel in a greedy graph)
            return greedy_argmax(local) if self.kernels == "triton" else local.argmax(dim=-1)
        if real == 0:
            ids = torch.zeros(local.shape[0], dtype=torch.int64, device=local.device)
            best = torch.full((local.shape[0],), float("-inf"), device=local.device)
        else:
            ids = greedy_argmax(local) if self.kernels == "triton" else local.argmax(dim=-1)
            best = local.gather(1, ids[:, None])[:, 0]
        # float64 holds an fp32 logit and a token id exactly: one gather of [R, 2] per rank.
        pairs = self.tp.all_gather_last(torch.stack((best.double(), (ids + shard.vocab0).double()), dim=-1))
        winner = pairs[:, 0::2].argmax(dim=-1, keepdim=True)  # first maximum: lower ranks hold lower ids
        return pairs[:, 1::2].gather(1, winner)[:, 0].long()

    def with_kernels(self, kernels: str) -> "LlamaForCausalLM":
        """This model on another kernel set ("torch" or "triton"): weights shared, not copied."""
        return with_kernels(self, kernels)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionStep,
                cache: KVCache, logits_rows: torch.Tensor | None = None,
                want_hidden: bool = False, want_taps: bool = False, gather_logits: bool = True,
                want_logits: bool = True) -> ModelOutput:
        """input_ids/positions [T]; logits only for ``logits_rows`` [R] (all rows when None);
        the final hidden state / EAGLE-3 taps of the same rows when asked. want_logits=False:
        no logits at all (training asks ``compute_logits`` for the rows its loss scores). Runs the forward of
        the model's kernel set; "triton" runs on CUDA, or on the CPU under TRITON_INTERPRET=1.
        gather_logits=False: the logits of this rank's vocabulary rows only, [R, vocab_rows]
        (``greedy_tokens`` takes the argmax from them without gathering)."""
        if self.kernels == "triton":
            out = self._forward_triton(input_ids, positions, attn, cache, logits_rows, want_hidden, want_taps,
                                       want_logits)
        else:
            out = self._forward_torch(input_ids, positions, attn, cache, logits_rows, want_hidden, want_taps,
                                      want_logits)
        if gather_logits and out.logits is not None:
            out.logits = self.gather_logits(out.logits)
        return out

    def _forward_torch(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionStep,
                       cache: KVCache, logits_rows: torch.Tensor | None, want_hidden: bool,
                       want_taps: bool, want_logits: bool) -> ModelOutput:
        """The reference: torch ops only."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)
        tap_layers = self.config.eagle3_layers if want_taps else ()
        layer_inputs = {}
        for i, layer in enumerate(self.model.layers):
            if i in tap_layers:
                layer_inputs[i] = x
            x = layer(x, cos, sin, i, attn, cache)
        x = self.model.norm(x)
        taps = torch.cat([layer_inputs[i] for i in tap_layers], dim=-1) if want_taps else None
        if logits_rows is not None:
            x = x.index_select(0, logits_rows)
            taps = None if taps is None else taps.index_select(0, logits_rows)
        return ModelOutput(logits=self.local_logits(x) if want_logits else None, hidden=x if want_hidden else None,
                           taps=taps)

    def _forward_triton(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionStep,
                        cache: KVCache, logits_rows: torch.Tensor | None, want_hidden: bool,
                        want_taps: bool, want_logits: bool) -> ModelOutput:
        """The Triton kernel set (same results as the reference up to kernel rounding). A step of at
        most ``folded_tokens`` tokens (small-batch decode, the verify forward of a small tree, a
        short prefill) runs on the folded products of ``ops.gemv``; every other step on the fused
        element-wise kernels between cuBLAS products."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_table(positions, self.inv_freq, x.dtype)  # once for all layers
        if 0 < x.shape[0] <= self.folded_tokens:
            tap_layers = self.config.eagle3_layers if want_taps else ()
            layer_inputs = {}
            for i, layer in enumerate(self.model.layers):
                if i in tap_layers:  # here each layer hands on the whole residual stream
                    layer_inputs[i] = x
                x = layer.forward_few_tokens(x, cos, sin, i, attn, cache)
            taps = torch.cat([layer_inputs[i] for i in tap_layers], dim=-1) if want_taps else None
            if logits_rows is not None:  # the final norm is row-wise: only the selected rows go on
                x = x.index_select(0, logits_rows)
                taps = None if taps is None else taps.index_select(0, logits_rows)
            norm = self.model.norm
            hidden = add_rms_norm(norm, x, None)[0] if want_hidden or x.shape[0] > 1 else None
            if not want_logits:
                logits = None
            elif x.shape[0] == 1:  # the final norm rides along with the matrix-vector product
                logits = gemv.gemv(self.output_weight, x, norm.weight, norm.eps, out_dtype=torch.float32)
            else:  # the output projection is the largest product: cuBLAS reads it 2-3x faster than 16-row tiles
                logits = self.local_logits(hidden)
            return ModelOutput(logits=logits, hidden=hidden if want_hidden else None, taps=taps)
        residual = None
        tap_layers = self.config.eagle3_layers if want_taps else ()
        layer_inputs = {}
        for i, layer in enumerate(self.model.layers):
            if i in tap_layers:  # the layer's input is only formed inside its norm: form it here
                layer_inputs[i] = x if residual is None else x + residual
            x, residual = layer.forward_fused(x, residual, cos, sin, i, attn, cache)
        taps = torch.cat([layer_inputs[i] for i in tap_layers], dim=-1) if want_taps else None
        if logits_rows is not None:  # the final norm is row-wise: normalise the selected rows only
            x = x.index_select(0, logits_rows)
            residual = None if residual is None else residual.index_select(0, logits_rows)
            taps = None if taps is None else taps.index_select(0, logits_rows)
        x, _ = add_rms_norm(self.model.norm, x, residual)
        return ModelOutput(logits=self.local_logits(x) if want_logits else None, hidden=x if want_hidden else None,
                           taps=taps)

    # ------------------------------------------------------------------ weights

    def fused_slices(self) -> dict[str, tuple[str, int, int]]:
        """HF tensor name -> (our parameter name, first row, last row) for fused projections."""
        return fused_layer_slices(self.config, [f"model.layers.{i}" for i in range(self.config.num_layers)], self.tp)

    @torch.no_grad()
    def load_hf_tensors(self, tensors: Iterable[tuple[str, torch.Tensor]], source: str = "checkpoint") -> None:
        """Copy Hugging Face-named tensors into the parameters, one at a time (casting on the fly)."""
        # Tied checkpoints may still store the output matrix: it is the embedding, skip it.
        skip = {"lm_head.weight"} if self.lm_head is None else set()
        load_named_tensors(self, tensors, self.fused_slices(), source, skip=skip, what="a Llama model")

    @torch.no_grad()
    def init_random(self, seed: int = 0, std: float = 0.02) -> None:
        """Random weights in place (speed benchmarks; no download)."""
        gen = torch.Generator(device=self.output_weight.device).manual_seed(seed)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=gen)

    def hf_state_dict(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Our weights under Hugging Face names (un-fused), for export and cross-checks (a
        tensor-parallel rank yields its own slices)."""
        return unfused_named_tensors(self, self.fused_slices())


def fused_layer_slices(cfg: LlamaConfig, prefixes: list[str],
                       tp: TensorParallel = SINGLE) -> dict[str, tuple[str, int, int]]:
    """For each decoder-layer prefix: HF q/k/v and gate/up names -> (fused name, row range), the
    rows of this rank's shard (its slices of q/k/v and gate/up, as ``LlamaShard`` reads them)."""
    shard = LlamaShard.of(cfg, tp)
    q, kv, inter = shard.num_heads * cfg.head_dim, shard.num_kv_heads * cfg.head_dim, shard.intermediate_size
    out = {}
    for p in prefixes:
        qkv, gate_up = f"{p}.self_attn.qkv_proj.weight", f"{p}.mlp.gate_up_proj.weight"
        out[f"{p}.self_attn.q_proj.weight"] = (qkv, 0, q)
        out[f"{p}.self_attn.k_proj.weight"] = (qkv, q, q + kv)
        out[f"{p}.self_attn.v_proj.weight"] = (qkv, q + kv, q + 2 * kv)
        out[f"{p}.mlp.gate_proj.weight"] = (gate_up, 0, inter)
        out[f"{p}.mlp.up_proj.weight"] = (gate_up, inter, 2 * inter)
    return out


@torch.no_grad()
def load_named_tensors(module: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]],
                       slices: dict[str, tuple[str, int, int]], source: str, skip: set[str] = frozenset(),
                       what: str = "this model") -> None:
    """Copy named tensors into ``module``'s parameters and buffers, casting on the fly.

    Every parameter must be filled exactly once; an unknown name, a wrong shape or a missing
    tensor raises ValueError naming it. Buffers are filled when present, kept otherwise.
    """
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    fused = {s[0] for s in slices.values()}
    filled: dict[str, int] = {}
    for name, tensor in tensors:
        if name in skip:
            continue
        target, lo, hi = slices.get(name, (name, None, None))
        dest_full = params.get(target, buffers.get(target))
        if dest_full is None:
            raise ValueError(f"{source}: unexpected tensor {name!r} (not part of {what})")
        dest = dest_full if lo is None else dest_full[lo:hi]
        if tuple(tensor.shape) != tuple(dest.shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(dest.shape)} for this config")
        dest.copy_(tensor.to(device=dest.device, dtype=dest.dtype))
        filled[target] = filled.get(target, 0) + (1 if lo is None else hi - lo)
    for target, param in params.items():
        need = param.shape[0] if target in fused else 1
        if filled.get(target, 0) != need:
            names = [n for n, s in slices.items() if s[0] == target] if target in fused else [target]
            raise ValueError(f"{source}: missing tensor(s) for {target!r}: expected {names}")


def unfused_named_tensors(module: nn.Module, slices: dict[str, tuple[str, int, int]]):
    """``module``'s parameters under the un-fused (checkpoint) names."""
    fused = {s[0] for s in slices.values()}
    params = dict(module.named_parameters())
    for name, (target, lo, hi) in slices.items():
        yield name, params[target][lo:hi]
    for name, param in params.items():
        if name not in fused:
            yield name, param


def build_model(cfg: LlamaConfig, device: torch.device | str, dtype: torch.dtype,
                kernels: str = "torch", tp: TensorParallel = SINGLE) -> LlamaForCausalLM:
    """An uninitialised model allocated straight on ``device`` in ``dtype`` (weights loaded after),
    running on the ``kernels`` set ("torch" or "triton"); with ``tp`` only this rank's shard.

    Built on the meta device first so that a large model never exists in fp32 anywhere.
    """
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, kernels, tp)
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device),
                                               requires_grad=False))
    model.inv_freq = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
    return model.eval()
