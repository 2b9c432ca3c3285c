"""EAGLE draft heads: EAGLE-1/2 (one or more dense layers) and EAGLE-3.

Both read, for the token at position t+1, the pair (feature at t, embedding of token t+1) and
produce a hidden state that predicts what comes after. The pair sits at draft position t.

EAGLE-1/2 (checkpoint keys as the official heads ship them):
  fc.weight [H, 2H] (fc.bias optional) over cat(embed(token), feature), embedding first;
  layers.{i}.* Llama decoder layers, layer 0 without input_layernorm; no final norm; logits
  through the target's lm_head; the feature is the target's last hidden state after its norm,
  and inside a tree the head's own output.
EAGLE-3:
  fc.weight [H, 3H] over the target's three tap layers; midlayer.* whose q/k/v read
  cat(input_layernorm(embed), hidden_norm(h)) (2H); norm; lm_head [draft_vocab, H]; d2t
  (target id = draft id + d2t[draft id]) and t2d; inside a tree the head feeds back its own
  pre-norm output.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from eaglespec.config import LlamaConfig
from eaglespec.kv_cache import KVCache
from eaglespec.models.attention_step import AttentionStep
from eaglespec.models.llama import (LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, RMSNorm,
                                    add_rms_norm, apply_rope, checked_kernels, fused_layer_slices,
                                    load_named_tensors, rope_cos_sin, rope_inverse_frequencies,
                                    unfused_named_tensors, with_kernels)


@dataclass(slots=True)
class EagleConfig:
    """Shape of a draft head; ``layer`` holds its decoder-layer shape (heads, sizes, RoPE)."""

    kind: str  # "eagle1" (EAGLE-1/2 and multi-layer dense drafts) or "eagle3"
    layer: LlamaConfig  # num_layers = draft depth in layers; vocab_size = the target's vocabulary
    fc_bias: bool = False
    draft_vocab_size: int = 0  # EAGLE-3 reduced vocabulary (0: the target's)
    target_hidden_size: int = 0  # 0: same as the draft's hidden size

    def __post_init__(self) -> None:
        if self.kind not in ("eagle1", "eagle3"):
            raise ValueError(f"EagleConfig.kind must be eagle1 or eagle3, got {self.kind!r}")
        if self.kind == "eagle3" and self.layer.num_layers != 1:
            raise ValueError("EAGLE-3 heads have exactly one decoder layer (midlayer)")
        self.draft_vocab_size = self.draft_vocab_size or self.layer.vocab_size
        self.target_hidden_size = self.target_hidden_size or self.layer.hidden_size

    @property
    def feature_size(self) -> int:
        """Width of the target features the head reads (H for EAGLE-1, 3H for EAGLE-3)."""
        return self.target_hidden_size * (3 if self.kind == "eagle3" else 1)

    @classmethod
    def from_hf_dict(cls, cfg: dict) -> "EagleConfig":
        archs = cfg.get("architectures") or []
        is3 = any("Eagle3" in a for a in archs) or "draft_vocab_size" in cfg
        layer_dict = dict(cfg, architectures=["LlamaForCausalLM"], model_type="llama")
        layer = LlamaConfig.from_hf_dict(layer_dict)
        return cls(kind="eagle3" if is3 else "eagle1", layer=layer, fc_bias=bool(cfg.get("bias", False)),
                   draft_vocab_size=cfg.get("draft_vocab_size", 0) if is3 else 0,
                   target_hidden_size=cfg.get("target_hidden_size", 0) or 0)

    def to_hf_dict(self) -> dict:
        d = self.layer.to_hf_dict()
        d["bias"] = self.fc_bias
        if self.kind == "eagle3":
            d["architectures"] = ["LlamaForCausalLMEagle3"]
            d["draft_vocab_size"] = self.draft_vocab_size
        if self.target_hidden_size != self.layer.hidden_size:
            d["target_hidden_size"] = self.target_hidden_size
        return d


@dataclass(slots=True)
class DraftOutput:
    hidden: torch.Tensor  # [T, H] what the next tree level feeds back as its feature
    logits: torch.Tensor  # [T, draft_vocab] fp32


class Eagle3Layer(nn.Module):
    """EAGLE-3's single decoder layer: attention reads [norm(embed) | norm(hidden)]."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, in_features=2 * cfg.hidden_size)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, emb, h, cos, sin, layer, attn, cache):
        x = torch.cat((self.input_layernorm(emb), self.hidden_norm(h)), dim=-1)
        h = h + self.self_attn(x, cos, sin, layer, attn, cache)
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward_fused(self, emb, h, cos, sin, layer, attn, cache):
        """Triton path of ``forward`` (norms, RoPE + K/V store, silu * up on fused kernels)."""
        x = torch.cat((add_rms_norm(self.input_layernorm, emb, None)[0],
                       add_rms_norm(self.hidden_norm, h, None)[0]), dim=-1)
        a = self.self_attn.forward_fused(x, cos, sin, layer, attn, cache)
        n, h = add_rms_norm(self.post_attention_layernorm, a, h)
        return h + self.mlp.forward_fused(n)


class EagleHead(nn.Module):
    """A draft head bound to its target (it borrows the target's embedding and, for EAGLE-1,
    its lm_head; they are buffers here, never copied nor saved). Like the target it runs on one
    kernel set, the target's unless told otherwise."""

    def __init__(self, cfg: EagleConfig, target: LlamaForCausalLM, kernels: str | None = None):
        super().__init__()
        self.config = cfg
        self.kernels = checked_kernels(kernels or target.kernels)  # "torch" or "triton"
        lc = cfg.layer
        if lc.vocab_size != target.config.vocab_size:
            raise ValueError(f"draft head vocabulary {lc.vocab_size} != target vocabulary {target.config.vocab_size}")
        if cfg.target_hidden_size != target.config.hidden_size:
            raise ValueError(f"draft head expects target hidden size {cfg.target_hidden_size}, "
                             f"target has {target.config.hidden_size}")
        self.register_buffer("embed_weight", target.model.embed_tokens.weight, persistent=False)
        if cfg.kind == "eagle1":
            self.register_buffer("lm_head_weight", target.output_weight, persistent=False)
            self.fc = nn.Linear(2 * lc.hidden_size, lc.hidden_size, bias=cfg.fc_bias)
            self.layers = nn.ModuleList(LlamaDecoderLayer(lc, input_norm=i > 0) for i in range(lc.num_layers))
        else:
            self.fc = nn.Linear(cfg.feature_size, lc.hidden_size, bias=cfg.fc_bias)
            self.midlayer = Eagle3Layer(lc)
            self.norm = RMSNorm(lc.hidden_size, lc.rms_norm_eps)
            self.lm_head = nn.Linear(lc.hidden_size, cfg.draft_vocab_size, bias=False)
            self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.int64))
            self.register_buffer("t2d", torch.zeros(lc.vocab_size, dtype=torch.bool))
        self.register_buffer("inv_freq", rope_inverse_frequencies(lc.head_dim, lc.rope_theta, lc.rope_scaling),
                             persistent=False)

    @property
    def num_layers(self) -> int:
        return self.config.layer.num_layers

    def with_kernels(self, kernels: str) -> "EagleHead":
        """This head on another kernel set ("torch" or "triton"): weights shared, not copied."""
        return with_kernels(self, kernels)

    def draft_to_target(self) -> torch.Tensor | None:
        """[draft_vocab] target id of each draft id (None when the vocabularies are the same)."""
        if self.config.kind == "eagle1":
            return None
        return torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t

    @property
    def readout_weight(self) -> torch.Tensor:
        """[draft_vocab, H] the output projection (EAGLE-1: the target's lm_head)."""
        return self.lm_head_weight if self.config.kind == "eagle1" else self.lm_head.weight

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                attn: AttentionStep, cache: KVCache) -> DraftOutput:
        """features [T, feature_size] (target features) or [T, H] (the head's own hidden);
        tokens/positions [T]. Returns the new hidden [T, H] and draft logits [T, draft_vocab]."""
        hidden, readout = self.hidden_and_readout(features, tokens, positions, attn, cache)
        weight = self.readout_weight
        return DraftOutput(hidden, F.linear(readout, weight.to(readout.dtype)).float())

    def hidden_and_readout(self, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                           attn: AttentionStep, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` up to the output projection: the new hidden [T, H] and the rows the
        projection reads [T, H] (EAGLE-1: the hidden itself; EAGLE-3: its final norm), so a
        drafter can fuse the projection with its top-k (``ops.draft_topk``).
        On the "triton" kernel set the element-wise ops run on the fused kernels (as in
        LlamaForCausalLM)."""
        use_triton = self.kernels == "triton"
        emb = F.embedding(tokens, self.embed_weight)
        dtype = self.fc.weight.dtype
        emb = emb.to(dtype)
        cos, sin = rope_cos_sin(positions, self.inv_freq, dtype)
        hidden_size = self.config.layer.hidden_size
        if self.config.kind == "eagle1":
            h = self.fc(torch.cat((emb, features.to(dtype)), dim=-1))
            if use_triton:
                residual = None
                for i, layer in enumerate(self.layers):
                    h, residual = layer.forward_fused(h, residual, cos, sin, i, attn, cache)
                h = h if residual is None else h + residual
            else:
                for i, layer in enumerate(self.layers):
                    h = layer(h, cos, sin, i, attn, cache)
            return h, h
        h = features.to(dtype)
        if h.shape[-1] != hidden_size:  # target taps: project 3H -> H first
            h = self.fc(h)
        if use_triton:
            h = self.midlayer.forward_fused(emb, h, cos, sin, 0, attn, cache)
        else:
            h = self.midlayer(emb, h, cos, sin, 0, attn, cache)
        normed = add_rms_norm(self.norm, h, None)[0] if use_triton else self.norm(h)
        return h, normed

    # ------------------------------------------------------------------ weights

    def fused_slices(self) -> dict[str, tuple[str, int, int]]:
        prefixes = ["midlayer"] if self.config.kind == "eagle3" else [f"layers.{i}" for i in range(self.num_layers)]
        return fused_layer_slices(self.config.layer, prefixes)

    def load_state(self, tensors, source: str = "draft checkpoint") -> None:
        """Load official-layout tensors (an ``embed_tokens.weight`` in the file is accepted and
        must match the target's)."""
        def filtered():
            for name, t in tensors:
                if name == "embed_tokens.weight":
                    if tuple(t.shape) != tuple(self.embed_weight.shape):
                        raise ValueError(f"{source}: tensor 'embed_tokens.weight' has shape {tuple(t.shape)}, "
                                         f"the target's embedding is {tuple(self.embed_weight.shape)}")
                    continue
                if name == "t2d":
                    t = t.bool()
                elif t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{source}: tensor {name!r} holds non-finite values (NaN or inf); "
                                     f"a draft head needs finite weights")
                yield name, t
        load_named_tensors(self, filtered(), self.fused_slices(), source, what=f"an {self.config.kind} head")
        if self.config.kind == "eagle3":
            ids = self.draft_to_target()
            if ids.min() < 0 or ids.max() >= self.config.layer.vocab_size:
                raise ValueError(f"{source}: d2t maps draft ids outside the target vocabulary")

    def state_items(self):
        """Official-layout (un-fused) tensors, for export."""
        yield from unfused_named_tensors(self, self.fused_slices())
        if self.config.kind == "eagle3":
            yield "d2t", self.d2t
            yield "t2d", self.t2d

    @torch.no_grad()
    def init_random(self, seed: int = 0, std: float = 0.02) -> None:
        gen = torch.Generator(device=self.fc.weight.device).manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)
        if self.config.kind == "eagle3":
            self.d2t.zero_()
            self.t2d.zero_()
            self.t2d[: self.config.draft_vocab_size] = True


def build_head(cfg: EagleConfig, target: LlamaForCausalLM, dtype: torch.dtype | None = None,
               kernels: str | None = None) -> EagleHead:
    """An uninitialised head on the target's device (weights loaded or randomised after), on the
    ``kernels`` set (default: the target's)."""
    device = target.output_weight.device
    dtype = dtype or target.output_weight.dtype
    head = EagleHead(cfg, target, kernels)
    for module in head.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device), requires_grad=False))
    return head.to(device).eval()


def load_head(path: str, target: LlamaForCausalLM) -> EagleHead:
    """Load a head from a directory with config.json and model.safetensors (or
    pytorch_model.bin, read only through ``torch.load(weights_only=True)``)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"draft head: no config.json in {path!r}")
    with open(cfg_path) as f:
        cfg = EagleConfig.from_hf_dict(json.load(f))
    st_path, bin_path = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(st_path):
        from safetensors import safe_open
        try:
            with safe_open(st_path, framework="pt") as f:
                items = [(k, f.get_tensor(k)) for k in f.keys()]
        except Exception as exc:  # safetensors raises its own error types
            raise ValueError(f"draft head: cannot read {st_path!r}: {exc}") from exc
        source = st_path
    elif os.path.isfile(bin_path):
        try:
            state = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"draft head: cannot read {bin_path!r} with weights_only=True: {exc}") from exc
        items, source = list(state.items()), bin_path
    else:
        raise FileNotFoundError(f"draft head: neither model.safetensors nor pytorch_model.bin in {path!r}")
    if cfg.kind == "eagle1":
        cfg.fc_bias = any(k == "fc.bias" for k, _ in items)
    head = build_head(cfg, target)
    head.load_state(items, source=source)
    return head


def save_head(head: EagleHead, path: str) -> None:
    """Write the official layout: config.json + model.safetensors."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(head.config.to_hf_dict(), f, indent=2)
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_items()},
              os.path.join(path, "model.safetensors"))
