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

Reduced draft vocabulary (any kind): with a token ranking beside the head
(``token_ranking.safetensors``, see eaglespec.train.token_ranking), ``EagleHead.draft_vocab(N)``
gives the N most frequent target tokens the head can draft: the rows of its output projection for
those tokens (gathered once) and their target ids. The forward returns the projection's input;
the drafter applies the projection of the vocabulary it was given.

Tensor parallelism: the head runs replicated on every rank, so it needs the target's embedding
and (EAGLE-1) output matrix whole, while a sharded target holds only its vocabulary rows. It
then borrows full copies read from the target's checkpoint (``borrowed_weights``), one [V, H]
matrix per rank (two when the target's embeddings are untied); an unsharded target lends its own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from eaglespec.config import LlamaConfig, default_eagle3_layers
from eaglespec.kv_cache import KVCache
from eaglespec.models.attention_step import AttentionStep
from eaglespec.models.llama import (LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, RMSNorm,
                                    add_rms_norm, checked_kernels, folded_token_limit,
                                    fused_layer_slices, load_named_tensors, rope_cos_sin,
                                    rope_inverse_frequencies, unfused_named_tensors, with_kernels)
from eaglespec.models.tensor_parallel import SINGLE, LlamaShard
from eaglespec.ops import gemv
from eaglespec.ops.linear import Linear, linear
from eaglespec.ops.rope_table import rope_table


def checked_target_layers(layers, kind: str, name: str) -> tuple[int, ...]:
    """``layers`` as a tuple: none, or the three target layers an EAGLE-3 head reads."""
    layers = tuple(layers)
    if layers and (kind != "eagle3" or len(layers) != 3 or any(not isinstance(t, int) or t < 0 for t in layers)):
        raise ValueError(f"{name} must be three layer indices >= 0 of an EAGLE-3 head's target, got "
                         f"{list(layers)} for a {kind} head")
    return layers


@dataclass(slots=True)
class EagleConfig:
    """Shape of a draft head; ``layer`` holds its decoder-layer shape (heads, sizes, RoPE)."""

    kind: str  # "eagle1" (EAGLE-1/2 and multi-layer dense drafts) or "eagle3"
    layer: LlamaConfig  # num_layers = draft depth in layers; vocab_size = the target's vocabulary
    fc_bias: bool = False
    # Tokens the head drafts over by default (0: all it has). EAGLE-3: the rows of its lm_head;
    # EAGLE-1: the most frequent target tokens of its ranking (it borrows the target's lm_head).
    draft_vocab_size: int = 0
    target_hidden_size: int = 0  # 0: same as the draft's hidden size
    # EAGLE-3: the target decoder layers whose inputs the head reads (vLLM's
    # eagle_aux_hidden_state_layer_ids); empty: the target's default (2, N//2, N-3).
    target_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("eagle1", "eagle3"):
            raise ValueError(f"EagleConfig.kind must be eagle1 or eagle3, got {self.kind!r}")
        self.target_layers = checked_target_layers(self.target_layers, self.kind,
                                                   "EagleConfig.target_layers (eagle_aux_hidden_state_layer_ids)")
        if self.kind == "eagle3" and self.layer.num_layers != 1:
            raise ValueError("EAGLE-3 heads have exactly one decoder layer (midlayer)")
        if not 0 <= self.draft_vocab_size <= self.layer.vocab_size:
            raise ValueError(f"EagleConfig.draft_vocab_size must be in [0, {self.layer.vocab_size}] (0: the "
                             f"target's vocabulary), got {self.draft_vocab_size}")
        self.draft_vocab_size = self.draft_vocab_size or self.layer.vocab_size
        self.target_hidden_size = self.target_hidden_size or self.layer.hidden_size

    @property
    def feature_size(self) -> int:
        """Width of the target features the head reads (H for EAGLE-1, 3H for EAGLE-3)."""
        return self.target_hidden_size * (3 if self.kind == "eagle3" else 1)

    @classmethod
    def from_hf_dict(cls, cfg: dict) -> "EagleConfig":
        archs = cfg.get("architectures") or []
        # An EAGLE-1 head with a default reduced vocabulary says LlamaForCausalLM and has a
        # draft_vocab_size; EAGLE-3 configs say Eagle3 (older ones only have draft_vocab_size).
        is3 = any("Eagle3" in a for a in archs) or ("draft_vocab_size" in cfg and "LlamaForCausalLM" not in archs)
        layer_dict = dict(cfg, architectures=["LlamaForCausalLM"], model_type="llama")
        layer = LlamaConfig.from_hf_dict(layer_dict)
        taps = cfg.get("eagle_aux_hidden_state_layer_ids") or \
            (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids") or ()
        return cls(kind="eagle3" if is3 else "eagle1", layer=layer, fc_bias=bool(cfg.get("bias", False)),
                   draft_vocab_size=cfg.get("draft_vocab_size") or 0,
                   target_hidden_size=cfg.get("target_hidden_size", 0) or 0, target_layers=tuple(taps))

    def to_hf_dict(self) -> dict:
        d = self.layer.to_hf_dict()
        d["bias"] = self.fc_bias
        if self.kind == "eagle3":
            d["architectures"] = ["LlamaForCausalLMEagle3"]
            d["draft_vocab_size"] = self.draft_vocab_size
        elif self.draft_vocab_size < self.layer.vocab_size:
            d["draft_vocab_size"] = self.draft_vocab_size
        if self.target_hidden_size != self.layer.hidden_size:
            d["target_hidden_size"] = self.target_hidden_size
        if self.target_layers:
            d["eagle_aux_hidden_state_layer_ids"] = list(self.target_layers)
        return d


@dataclass(slots=True)
class BorrowedWeights:
    """What a head borrows from its target, whole (never the shard of one rank)."""

    embedding: torch.Tensor  # [V, H] token embedding, the target's dtype and device
    output: torch.Tensor  # [V, H] output projection (the same tensor when the target ties them)


def borrowed_weights(target: LlamaForCausalLM, checkpoint: str | None = None) -> BorrowedWeights:
    """The target's embedding and output matrix, whole: its own tensors (no copy) when it holds
    them all; read from ``checkpoint`` (the target's own, a path open_checkpoint accepts) into
    the target's device and dtype when it is a tensor-parallel shard."""
    if not target.tp.enabled:
        return BorrowedWeights(target.model.embed_tokens.weight, target.output_weight)
    if checkpoint is None:
        raise ValueError(f"the target is rank {target.tp.rank} of {target.tp.world_size} tensor-parallel "
                         f"shards: a replicated draft head needs borrowed_weights(target, checkpoint=PATH) "
                         f"to read the full embedding and output matrix")
    from eaglespec.models.loading import read_full_tensors

    names = ["model.embed_tokens.weight"] + ([] if target.config.tie_word_embeddings else ["lm_head.weight"])
    full = read_full_tensors(checkpoint, names)
    like = target.output_weight
    vocab, hidden = target.config.vocab_size, target.config.hidden_size
    for name, t in full.items():
        if tuple(t.shape) != (vocab, hidden):
            raise ValueError(f"{checkpoint}: tensor {name!r} has shape {tuple(t.shape)}, the target needs "
                             f"({vocab}, {hidden})")
    # copy=True: a private copy, never a view into the (memory-mapped) checkpoint file
    embedding = full[names[0]].to(device=like.device, dtype=like.dtype, copy=True)
    output = embedding if len(names) == 1 else full[names[1]].to(device=like.device, dtype=like.dtype, copy=True)
    return BorrowedWeights(embedding, output)


@dataclass(slots=True)
class DraftOutput:
    hidden: torch.Tensor  # [T, H] what the next tree level feeds back as its feature
    last: torch.Tensor  # [T, H] the output projection's input (EAGLE-3: after its final norm)


@dataclass(slots=True)
class DraftVocab:
    """The tokens a head drafts over: N rows of its output projection and their target ids.

    Made once when a head is bound to a runner (``EagleHead.draft_vocab``), never per step.
    """

    weight: torch.Tensor  # [N, H] output projection rows of the drafted tokens, the head's dtype
    to_target: torch.Tensor | None  # [N] int64 target id of each draft id; None: draft id = target id

    @property
    def size(self) -> int:
        return self.weight.shape[0]

    def logits(self, last: torch.Tensor) -> torch.Tensor:
        """last [T, H] (``DraftOutput.last``) -> [T, N] fp32 draft logits."""
        return linear(last, self.weight).float()

    def target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft ids (any shape) -> target ids, on the device."""
        return draft_ids if self.to_target is None else self.to_target[draft_ids]


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


def _tap_target_layers(target: LlamaForCausalLM, layers: tuple[int, ...]) -> None:
    """Make the target feed an EAGLE-3 head the layers it was trained on (its config's
    target_layers; none given: the target's default). One target taps one set of layers, so a
    second head that wants others is refused rather than fed the wrong features."""
    if not layers:
        return
    n, current = target.config.num_layers, target.config.eagle3_layers
    if any(t >= n for t in layers):
        raise ValueError(f"draft head reads target layers {list(layers)} (eagle_aux_hidden_state_layer_ids), "
                         f"but the target has {n} layers")
    if current != layers and current != default_eagle3_layers(n):
        raise ValueError(f"draft head reads target layers {list(layers)}, but this target already feeds layers "
                         f"{list(current)} to another EAGLE-3 head; load the target again for this head")
    target.config.eagle3_layers = tuple(layers)


class EagleHead(nn.Module):
    """A draft head bound to its target (it borrows the target's embedding and, for EAGLE-1,
    its lm_head; they are buffers here, never saved; ``borrowed`` gives them whole when the
    target is a tensor-parallel shard). Like the target it runs on one kernel set, the target's
    unless told otherwise."""

    def __init__(self, cfg: EagleConfig, target: LlamaForCausalLM, kernels: str | None = None,
                 borrowed: BorrowedWeights | None = None):
        super().__init__()
        borrowed = borrowed or borrowed_weights(target)
        self.config = cfg
        self.kernels = checked_kernels(kernels or target.kernels)  # "torch" or "triton"
        lc = cfg.layer
        self.folded_tokens = folded_token_limit(lc, LlamaShard.of(lc, SINGLE))  # drafting depths up to this: folded
        if lc.vocab_size != target.config.vocab_size:
            raise ValueError(f"draft head vocabulary {lc.vocab_size} != target vocabulary {target.config.vocab_size}")
        if cfg.target_hidden_size != target.config.hidden_size:
            raise ValueError(f"draft head expects target hidden size {cfg.target_hidden_size}, "
                             f"target has {target.config.hidden_size}")
        self.register_buffer("embed_weight", borrowed.embedding, persistent=False)
        if cfg.kind == "eagle1":
            self.register_buffer("lm_head_weight", borrowed.output, persistent=False)
            self.fc = Linear(2 * lc.hidden_size, lc.hidden_size, bias=cfg.fc_bias)
            self.layers = nn.ModuleList(LlamaDecoderLayer(lc, input_norm=i > 0) for i in range(lc.num_layers))
        else:
            _tap_target_layers(target, cfg.target_layers)
            self.fc = Linear(cfg.feature_size, lc.hidden_size, bias=cfg.fc_bias)
            self.midlayer = Eagle3Layer(lc)
            self.norm = RMSNorm(lc.hidden_size, lc.rms_norm_eps)
            self.lm_head = Linear(lc.hidden_size, cfg.draft_vocab_size, bias=False)
            self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.int64))
            self.register_buffer("t2d", torch.zeros(lc.vocab_size, dtype=torch.bool))
        self.register_buffer("inv_freq", rope_inverse_frequencies(lc.head_dim, lc.rope_theta, lc.rope_scaling),
                             persistent=False)
        # [V] int32 target ids, most frequent first (CPU; only read to make a DraftVocab), or None.
        self.token_ranking: torch.Tensor | None = None
        # tree -> fraction of greedy steps that accepted at least d drafts, d = 1, 2, ..., as the
        # head's evaluation measured them (acceptance.json): tree="auto"'s starting beliefs.
        self.acceptance: dict[str, list[float]] = {}

    @property
    def num_layers(self) -> int:
        return self.config.layer.num_layers

    def with_kernels(self, kernels: str) -> "EagleHead":
        """This head on another kernel set ("torch" or "triton"): weights shared, not copied."""
        return with_kernels(self, kernels)

    @property
    def own_vocab_size(self) -> int:
        """Rows of the head's full output projection (EAGLE-1: the target's vocabulary)."""
        return self.config.draft_vocab_size if self.config.kind == "eagle3" else self.config.layer.vocab_size

    def draft_to_target(self) -> torch.Tensor | None:
        """[draft_vocab] target id of each row of the head's own lm_head (None: the target's)."""
        if self.config.kind == "eagle1":
            return None
        return torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t

    def set_token_ranking(self, ranked_ids: torch.Tensor | None) -> None:
        """Give the head its target-token ranking ([V] ids, most frequent first), or None."""
        if ranked_ids is not None:
            check_ranking(ranked_ids, self.config.layer.vocab_size, "token ranking")
            ranked_ids = ranked_ids.to(device="cpu", dtype=torch.int32)
        self.token_ranking = ranked_ids

    def output_weight(self) -> torch.Tensor:
        """[own_vocab, H] the head's full output projection, in the head's dtype."""
        if self.config.kind == "eagle3":
            return self.lm_head.weight
        return self.lm_head_weight.to(self.fc.weight.dtype)

    def logits(self, out: DraftOutput) -> torch.Tensor:
        """[T, own_vocab] fp32 logits over the head's own vocabulary (training, checks)."""
        return linear(out.last, self.output_weight()).float()

    @torch.no_grad()
    def draft_vocab(self, size: int | None = None) -> DraftVocab:
        """The ``size`` most frequent tokens of the head's vocabulary, ready to draft over.

        size None: the config's ``draft_vocab_size`` (the head's whole vocabulary unless its
        config.json says otherwise). Fewer tokens than the head has need its token ranking.
        """
        own = self.own_vocab_size
        size = self.config.draft_vocab_size if size is None else size
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= own:
            raise ValueError(f"SpecConfig.draft_vocab_size must be an int in [1, {own}] for this {self.config.kind} head "
                             f"(its output projection has {own} rows), got {size!r}")
        weight, own_ids = self.output_weight(), self.draft_to_target()
        if size == own:
            return DraftVocab(weight, own_ids)
        if self.token_ranking is None:
            raise ValueError(f"draft_vocab_size {size} < {own} needs the head's token ranking "
                             f"(token_ranking.safetensors beside its weights; make it with "
                             f"`python -m eaglespec.train.token_ranking --head DIR`)")
        ranking = self.token_ranking.to(weight.device).long()
        if own_ids is None:
            rows = ranking[:size]
        else:  # EAGLE-3: its own rows, ordered by the rank of their target token
            if int(own_ids.min()) < 0 or int(own_ids.max()) >= ranking.numel():
                raise ValueError("d2t maps draft ids outside the target vocabulary: cannot rank them")
            rank_of = torch.empty_like(ranking)
            rank_of[ranking] = torch.arange(ranking.numel(), device=ranking.device)
            rows = torch.sort(rank_of[own_ids], stable=True).indices[:size]
        rows = rows.sort().values  # target-id order: a d2t of increasing ids, as EAGLE-3's
        to_target = rows if own_ids is None else own_ids[rows]
        return DraftVocab(weight.index_select(0, rows).contiguous(), to_target)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                attn: AttentionStep, cache: KVCache, feature_rows: torch.Tensor | None = None) -> DraftOutput:
        """features [T, feature_size] (target features) or [T, H] (the head's own hidden), or
        any number of such rows of which ``feature_rows`` [T] (int64) picks each token's;
        tokens/positions [T]. Returns the new hidden [T, H] and the output projection's input
        [T, H] (``DraftVocab.logits`` or ``logits`` make the draft logits). On the "triton"
        kernel set the element-wise ops run on the fused kernels (as in LlamaForCausalLM)."""
        use_triton = self.kernels == "triton"
        dtype = self.fc.weight.dtype
        cos, sin = (rope_table if use_triton else rope_cos_sin)(positions, self.inv_freq, dtype)
        hidden_size = self.config.layer.hidden_size
        if self.config.kind == "eagle1" and use_triton and 0 < tokens.shape[0] <= self.folded_tokens:
            # A few rows (a drafting depth, an extend, a short prefill): the embedding lookup, the
            # row gather and fc in one product, then the layers on the folded products.
            h = gemv.gemv_embed_concat(self.fc.weight, self.fc.bias, self.embed_weight, tokens, features,
                                       feature_rows)
            for i, layer in enumerate(self.layers):
                h = layer.forward_few_tokens(h, cos, sin, i, attn, cache)
            return DraftOutput(h, h)
        if feature_rows is not None:
            features = features.index_select(0, feature_rows)
        emb = F.embedding(tokens, self.embed_weight).to(dtype)
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
            return DraftOutput(h, h)
        h = features.to(dtype)
        if h.shape[-1] != hidden_size:  # target taps: project 3H -> H first
            h = self.fc(h)
        if use_triton:
            h = self.midlayer.forward_fused(emb, h, cos, sin, 0, attn, cache)
        else:
            h = self.midlayer(emb, h, cos, sin, 0, attn, cache)
        normed = add_rms_norm(self.norm, h, None)[0] if use_triton else self.norm(h)
        return DraftOutput(h, normed)

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
               kernels: str | None = None, borrowed: BorrowedWeights | None = None) -> EagleHead:
    """An uninitialised head on the target's device (weights loaded or randomised after), on the
    ``kernels`` set (default: the target's); ``borrowed``: see ``borrowed_weights``."""
    device = target.output_weight.device
    dtype = dtype or target.output_weight.dtype
    head = EagleHead(cfg, target, kernels, borrowed)
    for module in head.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device), requires_grad=False))
    return head.to(device).eval()


def load_head(path: str, target: LlamaForCausalLM, borrowed: BorrowedWeights | None = None) -> EagleHead:
    """Load a head from a directory with config.json and model.safetensors (or
    pytorch_model.bin, read only through ``torch.load(weights_only=True)``), and its token
    ranking (token_ranking.safetensors) when the directory has one. A tensor-parallel target
    needs ``borrowed=borrowed_weights(target, its checkpoint)``; the head is then replicated."""
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
    head = build_head(cfg, target, borrowed=borrowed)
    head.load_state(items, source=source)
    head.set_token_ranking(load_token_ranking(path, cfg.layer.vocab_size))
    head.acceptance = load_acceptance(path)
    return head


def save_head(head: EagleHead, path: str) -> None:
    """Write the official layout: config.json + model.safetensors."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(head.config.to_hf_dict(), f, indent=2)
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_items()},
              os.path.join(path, "model.safetensors"))
    if head.token_ranking is not None:
        save_token_ranking(path, head.token_ranking)
    if head.acceptance:
        save_acceptance(path, head.acceptance)


# ------------------------------------------------------------------ the measured acceptance file

ACCEPTANCE_FILE = "acceptance.json"


def save_acceptance(head_dir: str, per_tree: dict[str, list[float]], about: dict | None = None) -> str:
    """Write ``head_dir``/acceptance.json: per tree, the fraction of greedy steps that accepted at
    least d drafts (d = 1, 2, ...); ``about`` says where they were measured (prompts, tokens)."""
    path = os.path.join(head_dir, ACCEPTANCE_FILE)
    with open(path, "w") as f:
        json.dump({"greedy_accept_rate_per_depth": per_tree, **(about or {})}, f, indent=1)
    return path


def load_acceptance(head_dir: str) -> dict[str, list[float]]:
    """``head_dir``'s measured greedy acceptance per tree ({} when it has no acceptance.json)."""
    from eaglespec.speculative.tree import parse_tree  # here: eaglespec.speculative imports this module

    path = os.path.join(head_dir, ACCEPTANCE_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            per_tree = json.load(f)["greedy_accept_rate_per_depth"]
        out = {str(tree): [float(r) for r in rates] for tree, rates in per_tree.items()}
        for tree, rates in out.items():
            if len(rates) > parse_tree(tree).depth or not all(0.0 <= r <= 1.0 for r in rates):
                raise ValueError(f"{tree!r} needs at most one rate in [0, 1] per depth, got {rates}")
    except (OSError, KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ValueError(f"{path}: not a head's measured acceptance ({type(exc).__name__}: {exc})") from exc
    return out


# ------------------------------------------------------------------ the token ranking file

RANKING_FILE = "token_ranking.safetensors"
RANKING_TENSOR = "ranked_ids"  # [V] int32: every target id, most frequent first


def check_ranking(ranked_ids: torch.Tensor, vocab_size: int, source: str) -> None:
    """Raise ValueError unless ``ranked_ids`` is an integer permutation of range(vocab_size)."""
    if ranked_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{source}: {RANKING_TENSOR} must be int32 or int64, got {ranked_ids.dtype}")
    if tuple(ranked_ids.shape) != (vocab_size,):
        raise ValueError(f"{source}: {RANKING_TENSOR} must have shape ({vocab_size},) (one entry per target "
                         f"token), got {tuple(ranked_ids.shape)}")
    ids = ranked_ids.long().cpu()
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size or \
            int(torch.zeros(vocab_size, dtype=torch.bool).index_fill_(0, ids, True).sum()) != vocab_size:
        raise ValueError(f"{source}: {RANKING_TENSOR} must list every target id in [0, {vocab_size}) exactly once")


def save_token_ranking(head_dir: str, ranked_ids: torch.Tensor, metadata: dict | None = None) -> str:
    """Write ``ranked_ids`` [V] into ``head_dir``/token_ranking.safetensors (int32); metadata
    values (where the counts came from) are stored as strings. Returns the file's path."""
    from safetensors.torch import save_file

    check_ranking(ranked_ids, ranked_ids.numel(), "save_token_ranking")
    os.makedirs(head_dir, exist_ok=True)
    path = os.path.join(head_dir, RANKING_FILE)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    save_file({RANKING_TENSOR: ranked_ids.to(torch.int32).contiguous().cpu()}, path, metadata=meta or None)
    return path


def load_token_ranking(head_dir: str, vocab_size: int) -> torch.Tensor | None:
    """``head_dir``'s ranked ids [V] int32 on the CPU, or None when it has no ranking file."""
    from safetensors import safe_open

    path = os.path.join(head_dir, RANKING_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            names = list(f.keys())
            ranked = f.get_tensor(RANKING_TENSOR) if RANKING_TENSOR in names else None
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path}: not a valid safetensors file ({exc})") from exc
    if ranked is None:
        raise ValueError(f"{path}: no tensor {RANKING_TENSOR!r} (has {sorted(names)})")
    check_ranking(ranked, vocab_size, path)
    return ranked
