"""Forwards for training without a KV pool: a padded batch [B, T] packed as B*T rows.

The target and the head run with attention steps that keep no cache: ``DenseCausalStep`` (each
row attends causally inside its own sequence, torch SDPA) and ``TTTStep`` (EAGLE-3's unrolled
training-time test). ``pad_batch`` and ``target_forward`` turn token lists into the target's
features and taps; both the trainer and the data preparation use them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from eaglespec.models.attention_step import AttentionStep
from eaglespec.models.llama import LlamaForCausalLM, ModelOutput
from eaglespec.ops.attention import default_scale

# ---------------------------------------------------------------------------------------------
# Attention for training: dense, causal per sequence, no KV pool.
# ---------------------------------------------------------------------------------------------


# Not cuDNN's attention, which SDPA tries first on Hopper: it builds an execution plan for every
# new (batch, length) shape, 70-90 ms each, and training batches of variable length keep
# bringing new shapes (EAGLE-3's unrolled steps bring 7 at once). Without it EAGLE-3 trained at
# 93.8k tokens/s instead of 12.2k, with the same losses (H100, 2026-12-05, design note 45).
_TRAINING_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: int, scale: float,
          attn_mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """q [B*T, Hq, D]; k/v [B*S, Hkv, D] -> [B*T, Hq, D]."""
    hq, d = q.shape[1], q.shape[2]
    hkv = k.shape[1]
    q = q.reshape(batch, -1, hq, d).transpose(1, 2)
    k = k.reshape(batch, -1, hkv, d).transpose(1, 2)
    v = v.reshape(batch, -1, hkv, d).transpose(1, 2)
    if hq != hkv:  # grouped-query attention: each K/V head serves hq/hkv query heads
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    with sdpa_kernel(_TRAINING_SDPA_BACKENDS):
        out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=attn_mask,
                                             is_causal=causal, scale=scale)
    return out.transpose(1, 2).reshape(-1, hq, d)


def _no_cache_write(kv_written: bool) -> None:
    if kv_written:  # kv_store is None: a fused kernel must hand over the rotated k/v instead
        raise ValueError("training attention steps keep no KV cache: call attend with kv_written=False")


@dataclass(slots=True)
class DenseCausalStep(AttentionStep):
    """A padded batch [B, T] packed as B*T rows; row t of a sequence sees rows 0..t of it.

    Right padding never leaks into real rows (it comes after them); padded rows compute
    garbage that the loss masks out. The KV cache is ignored (``cache`` may be None).
    """

    batch: int
    seq_len: int
    scale: float

    def attend(self, layer, q, k, v, cache, kv_written=False):
        _no_cache_write(kv_written)
        return _sdpa(q, k, v, self.batch, self.scale, causal=True)


def ttt_mask(seq_len: int, steps: int, device) -> torch.Tensor:
    """[T, steps*T] bool: the keys a step-(steps-1) query row t sees: step-0 keys 0..t, then
    the key of row t of each later step."""
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    diag = torch.eye(seq_len, dtype=torch.bool, device=device)
    return torch.cat([causal] + [diag] * (steps - 1), dim=1)


@dataclass(slots=True)
class TTTStep(AttentionStep):
    """EAGLE-3 training-time test over a padded batch [B, T]: call the head once per unrolled
    step with the same object; it keeps each step's K/V (per layer) for the later steps."""

    batch: int
    seq_len: int
    scale: float
    keys: dict = dataclasses.field(default_factory=dict)  # layer -> [K of step 0, step 1, ...]
    values: dict = dataclasses.field(default_factory=dict)

    def attend(self, layer, q, k, v, cache, kv_written=False):
        _no_cache_write(kv_written)
        ks, vs = self.keys.setdefault(layer, []), self.values.setdefault(layer, [])
        ks.append(k)
        vs.append(v)
        if len(ks) == 1:
            return _sdpa(q, k, v, self.batch, self.scale, causal=True)
        b, t = self.batch, self.seq_len
        # Concatenate per sequence along the key axis: [B, steps*T, Hkv, D].
        k_all = torch.cat([x.reshape(b, t, *x.shape[1:]) for x in ks], dim=1)
        v_all = torch.cat([x.reshape(b, t, *x.shape[1:]) for x in vs], dim=1)
        mask = ttt_mask(t, len(ks), q.device)
        return _sdpa(q, k_all.reshape(-1, *k.shape[1:]), v_all.reshape(-1, *v.shape[1:]), b, self.scale,
                     attn_mask=mask)


# ---------------------------------------------------------------------------------------------
# Batches and target features.
# ---------------------------------------------------------------------------------------------


def pad_batch(tokens: list[torch.Tensor], masks: list[torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad sequences: tokens [B, T] int64 (pad 0), loss mask [B, T] bool (pad False),
    lengths [B] int64."""
    if not tokens:
        raise ValueError("pad_batch: no sequences")
    lengths = torch.tensor([len(t) for t in tokens], dtype=torch.int64)
    t = int(lengths.max())
    out = torch.zeros(len(tokens), t, dtype=torch.int64)
    mask = torch.zeros(len(tokens), t, dtype=torch.bool)
    for i, (ids, m) in enumerate(zip(tokens, masks)):
        out[i, :len(ids)] = ids
        mask[i, :len(m)] = m
    return out, mask, lengths


@torch.no_grad()
def target_forward(target: LlamaForCausalLM, tokens: torch.Tensor, want_taps: bool = False) -> ModelOutput:
    """The target over a padded batch tokens [B, T] without a KV pool: hidden [B*T, H] (the
    EAGLE-1 feature, after the final norm) and, when asked, the EAGLE-3 taps [B*T, 3H]. No
    logits (``logits`` is None): a loss asks ``target.compute_logits`` for the rows it scores,
    so prompt and padding rows never make a [rows, vocab] fp32 tensor."""
    b, t = tokens.shape
    positions = torch.arange(t, device=tokens.device).repeat(b)
    step = DenseCausalStep(b, t, default_scale(target.config.head_dim))
    return target(tokens.reshape(-1), positions, step, None, want_hidden=True, want_taps=want_taps,
                  want_logits=False)
