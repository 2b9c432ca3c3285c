"""Typed configuration: the target model's shape, sampling and speculation settings.

Every dataclass validates itself in ``__post_init__`` so a bad value fails where it is made,
with a message naming the field.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass


def default_eagle3_layers(num_layers: int) -> tuple[int, ...]:
    """The decoder layers whose inputs feed an EAGLE-3 head unless it says otherwise: 2, N//2, N-3."""
    return (min(2, num_layers - 1), num_layers // 2, max(num_layers - 3, 0))


@dataclass(slots=True)
class LlamaConfig:
    """Shape of a dense Llama 2 / 3.x decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (grouped-query attention when < num_heads)
    head_dim: int = 0  # 0 means hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or the ``llama3`` scaling dict as in HF config.json: factor, low_freq_factor,
    # high_freq_factor, original_max_position_embeddings.
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Decoder layers whose *inputs* feed an EAGLE-3 head (empty: the default 2, N//2, N-3).
    eagle3_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ValueError("LlamaConfig: hidden_size must divide by num_heads when head_dim is not given")
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"LlamaConfig: num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise TypeError(f"LlamaConfig.rope_scaling must be a dict or None, got {self.rope_scaling!r}")
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default", None):
                raise ValueError(f"LlamaConfig: unsupported rope type {kind!r} (implemented: default, llama3)")
            missing = [k for k in ("factor", "original_max_position_embeddings") if k not in self.rope_scaling]
            if kind == "llama3" and missing:
                raise ValueError(f"LlamaConfig.rope_scaling: llama3 scaling needs {missing}")
        self.eos_token_ids = tuple(int(t) for t in self.eos_token_ids)
        self.eagle3_layers = tuple(self.eagle3_layers) or default_eagle3_layers(self.num_layers)

    @classmethod
    def from_hf_dict(cls, cfg: dict) -> "LlamaConfig":
        """Build from a Hugging Face ``config.json`` dict of a Llama model."""
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        if cfg.get("model_type", "llama") != "llama" or "LlamaForCausalLM" not in archs:
            raise ValueError(f"unknown architecture: model_type={cfg.get('model_type')!r} "
                             f"architectures={archs} (eaglespec serves dense Llama models)")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        heads = cfg["num_attention_heads"]
        rope_theta, rope_scaling = _rope_from_hf_dict(cfg)
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    def to_hf_dict(self) -> dict:
        """The matching Hugging Face ``config.json`` dict (used by tests and exports)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) or None,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
        }


def _rope_from_hf_dict(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either config format.

    Classic (transformers < 5): top-level ``rope_theta`` and ``rope_scaling``. transformers 5:
    ``rope_parameters = {"rope_theta": ..., "rope_type": "default" | "llama3", ...}``. Both
    formats in one file must agree.
    """
    classic_theta, classic_scaling = cfg.get("rope_theta"), cfg.get("rope_scaling")
    params = cfg.get("rope_parameters")
    if params is None:
        return float(classic_theta if classic_theta is not None else 10000.0), classic_scaling
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"config rope_parameters must be one dict of RoPE settings (per-layer-type RoPE "
                         f"is not implemented), got {params!r}")
    if "rope_theta" not in params:
        raise ValueError(f"config rope_parameters has no rope_theta: {params!r}")
    theta = float(params["rope_theta"])
    kind = params.get("rope_type", params.get("type", "default"))
    scaling = None if kind == "default" else {k: v for k, v in params.items() if k != "rope_theta"}
    if classic_theta is not None and float(classic_theta) != theta:
        raise ValueError(f"config gives rope_theta {classic_theta} and rope_parameters.rope_theta {theta}")
    if classic_scaling is not None and _rope_key(classic_scaling) != _rope_key(scaling):
        raise ValueError(f"config gives rope_scaling {classic_scaling!r} and rope_parameters {params!r}")
    return theta, scaling


def _rope_key(scaling: dict | None) -> dict | None:
    """A scaling dict in one spelling (``type`` read as ``rope_type``; default = None)."""
    if scaling is None:
        return None
    key = {("rope_type" if k == "type" else k): v for k, v in scaling.items()}
    return None if key.get("rope_type", "default") == "default" else key


MIN_TEMPERATURE = 1e-5  # smaller positive temperatures sample greedily (as vLLM does)


@dataclass(slots=True)
class SamplingParams:
    """How one request samples and when it stops."""

    temperature: float = 0.0  # 0 means greedy; below MIN_TEMPERATURE taken as 0 (logits / T would overflow)
    top_k: int = 0  # 0 means no top-k cut (so does any k >= 2**31, more than any vocabulary)
    top_p: float = 1.0  # 1 means no nucleus cut
    max_tokens: int = 128
    seed: int | None = None  # same seed, same output; None draws one
    stop: tuple[str, ...] = ()  # stop strings (not included in the output text)
    ignore_eos: bool = False
    detokenize: bool = True  # False: token ids only (no text, no stop strings), less host work per token

    def __post_init__(self) -> None:
        self.temperature = _real("SamplingParams.temperature", self.temperature, "a finite number >= 0 (0 = greedy)")
        if not 0.0 <= self.temperature < math.inf:
            raise ValueError(f"SamplingParams.temperature must be a finite number >= 0 (0 = greedy), "
                             f"got {self.temperature}")
        if self.temperature < MIN_TEMPERATURE:
            self.temperature = 0.0
        self.top_k = _integer("SamplingParams.top_k", self.top_k, "an int >= 0 (0 = no top-k cut)")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be an int >= 0 (0 = no top-k cut), got {self.top_k}")
        if self.top_k >= 2**31:  # device tensors hold int32
            self.top_k = 0
        self.top_p = _real("SamplingParams.top_p", self.top_p, "a number in (0, 1]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be a number in (0, 1], got {self.top_p}")
        self.max_tokens = _integer("SamplingParams.max_tokens", self.max_tokens, "an int >= 1")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be an int >= 1, got {self.max_tokens}")
        if self.seed is not None:
            self.seed = _integer("SamplingParams.seed", self.seed, "an int or None")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if self.stop is None:
            self.stop = ()
        if not isinstance(self.stop, (list, tuple)):
            raise TypeError(f"SamplingParams.stop must be a string or a list of strings, "
                            f"got {type(self.stop).__name__}")
        for s in self.stop:
            if not isinstance(s, str):
                raise TypeError(f"SamplingParams.stop must hold strings, got {s!r} ({type(s).__name__})")
            if not s:
                raise ValueError("SamplingParams.stop must hold non-empty strings, got ''")
        self.stop = tuple(self.stop)
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"SamplingParams.ignore_eos must be True or False, got {self.ignore_eos!r}")
        if not isinstance(self.detokenize, bool):
            raise TypeError(f"SamplingParams.detokenize must be True or False, got {self.detokenize!r}")
        if self.stop and not self.detokenize:
            raise ValueError("SamplingParams.stop needs the text: stop strings cannot be used with detokenize=False")


def _integer(field: str, value, expected: str) -> int:
    """``value`` as an int, or TypeError naming the field (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{field} must be {expected}, got {value!r} ({type(value).__name__})")
    return int(value)


def _real(field: str, value, expected: str) -> float:
    """``value`` as a float, or TypeError naming the field (bools and strings are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{field} must be {expected}, got {value!r} ({type(value).__name__})")
    return float(value)


_TREE_SPEC = re.compile(r"^(chain:\d+|dynamic:\d+,\d+,\d+)$")

# The trees ``tree="auto"`` chooses among (besides plain decoding): short chains for large
# batches, where a step's extra tokens cost real compute, and dynamic trees for small ones.
# dynamic:4,6,15 verifies 16 tokens (its root too) and dynamic:5,8,32 33, so at batch 1 a small
# model verifies either on the folded few-token layers (models/llama.py, folded_token_limit).
AUTO_TREES = ("chain:1", "chain:2", "chain:3", "dynamic:4,6,15", "dynamic:5,8,32")


@dataclass(slots=True)
class SpecConfig:
    """Speculative decoding settings.

    ``tree`` is ``auto`` (the default: each step runs plain decoding or one of ``auto_trees``,
    whichever measures the most tokens/s for the batch at hand, see speculative/policy.py),
    ``chain:K`` (K draft tokens in a line), ``dynamic:DEPTH,TOPK,NODES`` (EAGLE-2 dynamic tree)
    or a path to a JSON list of choices (static tree, EAGLE/Medusa format). A tree other than
    ``auto`` is forced on every step. Children are the draft's top-k at every node; under
    sampling they are accepted by the lossless rule for deterministic children (see
    docs/DESIGN_NOTES.md).
    """

    tree: str = "auto"
    auto_trees: tuple[str, ...] = AUTO_TREES  # the candidates of ``tree="auto"``
    # The draft scores only this many of the most frequent target tokens (its output projection
    # keeps their rows; the target still verifies over its whole vocabulary, so outputs are
    # unchanged). None: the head's own default (its config's draft_vocab_size, else all). At most
    # the head's vocabulary; fewer than it has needs the head's token ranking.
    draft_vocab_size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.tree, str):
            raise TypeError(f"SpecConfig.tree must be a string (auto, chain:K, dynamic:DEPTH,TOPK,NODES or a "
                            f".json path), got {type(self.tree).__name__}")
        self.auto_trees = tuple(self.auto_trees)
        for field_name, trees in (("tree", (self.tree,)), ("auto_trees", self.auto_trees)):
            for tree in trees:
                if not isinstance(tree, str) or not (_TREE_SPEC.match(tree) or tree.endswith(".json")
                                                     or (field_name == "tree" and tree == "auto")):
                    raise ValueError(f"SpecConfig.{field_name}: a tree must be "
                                     f"{'auto, ' if field_name == 'tree' else ''}chain:K, dynamic:DEPTH,TOPK,NODES "
                                     f"or a .json path, got {tree!r}")
        if not self.auto_trees or len(set(self.auto_trees)) != len(self.auto_trees):
            raise ValueError(f"SpecConfig.auto_trees must be distinct trees, at least one, got {self.auto_trees}")
        n = self.draft_vocab_size
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"SpecConfig.draft_vocab_size must be None or an int >= 1, got {n!r}")

    @property
    def trees(self) -> tuple[str, ...]:
        """The trees a speculative engine prepares: the candidates of auto, or the forced one."""
        return self.auto_trees if self.tree == "auto" else (self.tree,)


@dataclass(slots=True)
class EngineConfig:
    """Engine sizing: the KV pool and the batch buckets."""

    block_size: int = 16  # tokens per KV block
    num_blocks: int = 0  # 0: size from free device memory (GPU) or kv_cache_tokens (CPU)
    kv_cache_tokens: int = 16384  # CPU default pool size in tokens when num_blocks is 0
    gpu_memory_fraction: float = 0.6  # of free memory after the weights (at most what max_batch_size x max_model_len use)
    max_batch_size: int = 64
    max_model_len: int = 0  # most tokens of a sequence (prompt + output); 0: the model's max_position_embeddings
    prefill_token_budget: int = 8192  # tokens prefilled per engine step
    # A prefill of at most this many tokens runs padded to a power of two (and to max_batch_size
    # sequences), as a CUDA graph on a GPU: eager, a short prompt's ~300 launches cost 40 ms of
    # host time for 1 ms of device work. Longer prefills run eagerly at their exact size.
    prefill_graph_tokens: int = 2048
    use_cuda_graphs: bool = True
    attention_backend: str = "auto"  # "auto" (Triton on GPU), "triton", "torch"
    # Queue the next decoding step (plain or speculative) before reading this one. None: where
    # the device runs asynchronously (CUDA); on a CPU the step queued next runs at once, which
    # gains nothing and charges each step's time to the one before it (misleading tree=auto).
    overlap_decode: bool | None = None

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"EngineConfig.block_size must be a power of two, got {self.block_size}")
        if self.attention_backend not in ("auto", "triton", "torch"):
            raise ValueError(f"EngineConfig.attention_backend must be auto, triton or torch, "
                             f"got {self.attention_backend!r}")
        if self.max_batch_size < 1:
            raise ValueError("EngineConfig.max_batch_size must be >= 1")
        if self.prefill_token_budget < 2:  # a chunk never stops one token short of a prompt (Scheduler._chunk_end)
            raise ValueError(f"EngineConfig.prefill_token_budget must be >= 2, got {self.prefill_token_budget}")
        if self.prefill_graph_tokens < 0:
            raise ValueError(f"EngineConfig.prefill_graph_tokens must be >= 0 (0: every prefill eager), "
                             f"got {self.prefill_graph_tokens}")
        if isinstance(self.max_model_len, bool) or not isinstance(self.max_model_len, int) or self.max_model_len < 0:
            raise ValueError(f"EngineConfig.max_model_len must be an integer >= 1 (or 0 for the model's "
                             f"context length), got {self.max_model_len!r}")
