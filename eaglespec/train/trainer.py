"""Training EAGLE draft heads on self-distilled data.

The target runs without a KV pool: a padded batch [B, T] is packed as B*T rows and every row
attends causally inside its own sequence (``DenseCausalStep``, torch SDPA). The head sees the
same geometry it meets when serving (see ``eaglespec.speculative.drafter``): the pair (feature_t,
token_{t+1}) sits at position t, and its output predicts feature_{t+1} and token_{t+2}.

EAGLE-1: loss = SmoothL1(h_t, f_{t+1}) + 0.1 * CE(lm_head(h_t), softmax(target logits_{t+1})).
EAGLE-3: "training-time test": the head is unrolled K steps on its own hidden states; step i
reads (h^{i-1}_t, token_{t+i+1}) at position t+i, attends to the step-0 keys of positions <= t
and to its own row's keys of steps 1..i (exactly the keys a depth-i tree node sees when
serving), and is scored with weight 0.8^i by cross-entropy against the target's distribution
over the draft vocabulary.

Rows are scored only where the token they predict is a reply token (loss mask), so the head
learns what the target says, not the prompt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eaglespec.config import LlamaConfig, SamplingParams, SpecConfig
from eaglespec.engine.request import pooled_speculation
from eaglespec.models.eagle import (DraftOutput, EagleConfig, EagleHead, build_head, checked_target_layers,
                                    load_head, save_head)
from eaglespec.models.llama import LlamaForCausalLM
from eaglespec.ops.attention import default_scale
from eaglespec.train.data import load_prepared_with_features
from eaglespec.train.dense import DenseCausalStep, TTTStep, pad_batch, target_forward
from eaglespec.train.token_ranking import rank_tokens

# ---------------------------------------------------------------------------------------------
# Objectives.
# ---------------------------------------------------------------------------------------------


def shift_left(x: torch.Tensor, n: int) -> torch.Tensor:
    """x [B, T, ...] moved n places left along T, zero (False) filled: out[:, t] = x[:, t + n]."""
    out = torch.zeros_like(x)
    if n < x.shape[1]:
        out[:, :x.shape[1] - n] = x[:, n:]
    return out


@dataclass(slots=True)
class LossResult:
    loss: torch.Tensor  # scalar, differentiable
    step_losses: list[torch.Tensor]  # per unrolled step (EAGLE-1: [value + prob]), detached
    correct: list[torch.Tensor]  # per step: rows whose draft top-1 is the target's top-1
    counts: list[torch.Tensor]  # per step: rows scored


# rows [n] int64 (on the device) -> the target's fp32 logits [n, V] at those rows of the batch
TargetLogits = Callable[[torch.Tensor], torch.Tensor]


def _rows(mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The True positions of a flat bool mask, on ``device``. A host mask gives them without
    waiting for the device (``nonzero`` on a device tensor is a sync)."""
    return mask.reshape(-1).nonzero().squeeze(1).to(device, non_blocking=True)


def eagle1_loss(head: EagleHead, tokens: torch.Tensor, loss_mask: torch.Tensor, hidden: torch.Tensor,
                target_logits: TargetLogits, noise: torch.Tensor | None = None, value_weight: float = 1.0,
                prob_weight: float = 0.1) -> LossResult:
    """tokens [B, T]; loss_mask [B, T] bool (best on the host); hidden [B*T, H] the target's;
    target_logits(rows) its logits at those rows.

    Row t reads (f_t + noise, x_{t+1}) at position t; it is scored when x_{t+2} is a reply token,
    against f_{t+1} (SmoothL1) and the target's next-token distribution at t+1 (soft CE).
    """
    b, t = tokens.shape
    feats = hidden.float() if noise is None else hidden.float() + noise
    positions = torch.arange(t, device=tokens.device).repeat(b)
    scale = default_scale(head.config.layer.head_dim)
    out = head(feats, shift_left(tokens, 1).reshape(-1), positions, DenseCausalStep(b, t, scale), None)
    rows = _rows(shift_left(loss_mask, 2), tokens.device)
    n = rows.numel()
    # Row t's target is row t+1 of the same sequence (valid rows have t+2 < T).
    target_h = hidden.index_select(0, rows + 1).float()
    h = out.hidden.index_select(0, rows).float()
    value = F.smooth_l1_loss(h, target_h, reduction="none").mean(-1).sum() / max(n, 1)
    prob, correct = _soft_cross_entropy(_scored_logits(head, out, rows), target_logits(rows + 1))
    loss = value_weight * value + prob_weight * prob
    return LossResult(loss, [loss.detach()], [correct], [torch.full((), n, device=tokens.device)])


def _scored_logits(head: EagleHead, out: DraftOutput, rows: torch.Tensor) -> torch.Tensor:
    """The head's logits [n, own vocab] of the scored rows only: prompt and padding rows never
    meet the [H, V] projection (the largest product of a step)."""
    return F.linear(out.last.index_select(0, rows), head.output_weight()).float()


def _soft_cross_entropy(draft_logits: torch.Tensor, target_logits: torch.Tensor,
                        keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean CE of [n, V] draft logits against the target's [n, V] distribution, and how many
    rows' draft top-1 is the target's top-1. keep [n] bool: the rows that count (a mask rather
    than a filter: choosing rows by a device value would sync)."""
    logp = F.log_softmax(draft_logits.float(), dim=-1)
    target_logits = target_logits.float()
    per_row = -(F.softmax(target_logits, dim=-1) * logp).sum(-1)
    right = logp.argmax(-1) == target_logits.argmax(-1)
    if keep is None:
        return per_row.sum() / max(logp.shape[0], 1), right.sum()
    return torch.where(keep, per_row, 0.0).sum() / keep.sum().clamp(min=1), (right & keep).sum()


def eagle3_loss(head: EagleHead, tokens: torch.Tensor, loss_mask: torch.Tensor, taps: torch.Tensor,
                target_logits: TargetLogits, steps: int = 7, decay: float = 0.8,
                noise: torch.Tensor | None = None) -> LossResult:
    """tokens [B, T]; loss_mask [B, T] bool (best on the host); taps [B*T, 3H] the target's;
    target_logits(rows) its logits at those rows.

    Step i (0..steps-1) at row t reads (step i-1's hidden at row t, or the taps; x_{t+i+1}) at
    position t+i and is scored against the target's distribution at t+i+1 restricted to the
    draft vocabulary, where x_{t+i+2} is a reply token and the target's top-1 is in the draft
    vocabulary. Loss = sum_i decay^i * CE_i.
    """
    b, t = tokens.shape
    dev = tokens.device
    to_target = head.draft_to_target()
    # Every step reads the target at rows whose next token is a reply token: their logits, once.
    reply_rows = _rows(shift_left(loss_mask, 1), dev)
    logits = target_logits(reply_rows)  # [n1, V]
    compact = torch.zeros(b * t, dtype=torch.int64, device=dev)  # batch row -> row of logits
    compact[reply_rows] = torch.arange(reply_rows.numel(), device=dev)
    in_vocab = torch.zeros(b * t, dtype=torch.bool, device=dev)
    in_vocab[reply_rows] = head.t2d[logits.argmax(-1)]
    positions = torch.arange(t, device=dev).repeat(b)
    step = TTTStep(b, t, default_scale(head.config.layer.head_dim))
    feats = taps.float() if noise is None else taps.float() + noise
    total = torch.zeros((), device=dev)
    step_losses, correct, counts = [], [], []
    for i in range(steps):
        out = head(feats, shift_left(tokens, i + 1).reshape(-1), positions + i, step, None)
        rows = _rows(shift_left(loss_mask, i + 2), dev)
        keep = shift_left(in_vocab.view(b, t), i + 1).reshape(-1).index_select(0, rows)
        target = logits.index_select(0, compact.index_select(0, rows + i + 1)).index_select(1, to_target)
        ce, right = _soft_cross_entropy(_scored_logits(head, out, rows), target, keep)
        total = total + decay ** i * ce
        step_losses.append(ce.detach())
        correct.append(right)
        counts.append(keep.sum())
        feats = out.hidden
    return LossResult(total, step_losses, correct, counts)


def build_vocab_map(token_counts: torch.Tensor, draft_vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EAGLE-3 draft vocabulary: the ``draft_vocab_size`` most frequent tokens (ties: lower id).

    token_counts [V]. Returns d2t [Vd] int64 (target id = draft id + d2t[draft id], draft ids in
    increasing target-id order) and t2d [V] bool (is the token in the draft vocabulary).
    """
    vocab = token_counts.numel()
    if not 0 < draft_vocab_size <= vocab:
        raise ValueError(f"build_vocab_map: draft_vocab_size must be in [1, {vocab}], got {draft_vocab_size}")
    ids = rank_tokens(token_counts)[:draft_vocab_size].long().sort().values
    d2t = ids - torch.arange(draft_vocab_size, dtype=torch.int64)
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[ids] = True
    return d2t, t2d


# ---------------------------------------------------------------------------------------------
# Configuration.
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class TrainConfig:
    """Everything that decides a training run (and must match when it resumes)."""

    data_dir: str = ""  # prepared data (eaglespec.train.data.prepare); several directories joined by ';'
    out_dir: str = ""  # checkpoint, log and exported head go here
    kind: str = "eagle1"  # "eagle1" or "eagle3"
    layers: int = 1  # decoder layers of an eagle1 head (eagle3: always 1)
    # Tokens the head drafts over by default, its most frequent reply tokens (0: the target's
    # vocabulary). eagle3: its output rows; eagle1: written in its config (it borrows the lm_head).
    draft_vocab_size: int = 0
    fc_bias: bool = False
    max_seq_len: int = 2048  # longer sequences are cut
    batch_tokens: int = 16384  # padded tokens per micro-batch (per GPU)
    max_batch_size: int = 64  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    epochs: float = 1.0
    max_steps: int = 0  # optimizer steps; 0: from epochs
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 0.5  # 0: no clipping
    feature_noise: float = 0.1  # input features get U(-a, a) noise (a = this), step 0 only
    value_weight: float = 1.0  # eagle1 SmoothL1 weight
    prob_weight: float = 0.1  # eagle1 soft cross-entropy weight
    ttt_steps: int = 7  # eagle3 unrolled steps
    target_layers: tuple[int, ...] = ()  # eagle3: the target layers whose inputs it reads (empty: 2, N//2, N-3)
    # eagle3: start the output layer and its norm from the target's (the rows of the draft
    # vocabulary's tokens) instead of random weights (a head from init_from keeps its own)
    lm_head_from_target: bool = False
    step_decay: float = 0.8  # eagle3: weight of unrolled step i is step_decay ** i
    init_std: float = 0.02
    init_from: str = ""  # a head directory to start from instead of random weights
    data_fraction: float = 1.0  # train on this nested random fraction of the prepared sequences (data scaling)
    seed: int = 0
    mixed_precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16", "fp32"
    use_stored_features: bool = True  # use features saved by prepare(store_features=...) when present
    log_every: int = 10
    checkpoint_every: int = 200
    time_budget_s: float = 0.0  # > 0: stop (checkpoint and all) once a step ends past it
    export_dtype: str = "bfloat16"  # dtype of the exported head: bfloat16, float16 or float32
    resume: bool = True  # continue from out_dir/checkpoint.pt when present

    def __post_init__(self) -> None:
        if self.kind not in ("eagle1", "eagle3"):
            raise ValueError(f"TrainConfig.kind must be eagle1 or eagle3, got {self.kind!r}")
        for name in ("layers", "batch_tokens", "max_batch_size", "grad_accum", "max_seq_len", "ttt_steps",
                     "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.kind == "eagle3" and self.layers != 1:
            raise ValueError("TrainConfig.layers must be 1 for eagle3 heads")
        self.target_layers = checked_target_layers(self.target_layers, self.kind, "TrainConfig.target_layers")
        if self.lm_head_from_target and (self.kind != "eagle3" or self.init_from):
            raise ValueError("TrainConfig.lm_head_from_target starts a new eagle3 head's own output layer: "
                             + ("eagle1 heads use the target's" if self.kind != "eagle3" else
                                f"a head from init_from ({self.init_from!r}) keeps its own"))
        if self.max_seq_len > self.batch_tokens:
            raise ValueError(f"TrainConfig.max_seq_len ({self.max_seq_len}) exceeds batch_tokens ({self.batch_tokens})")
        if self.max_steps < 0 or self.epochs <= 0 and self.max_steps == 0:
            raise ValueError("TrainConfig: give epochs > 0 or max_steps > 0")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ValueError("TrainConfig: lr must be > 0, min_lr_ratio in [0, 1], warmup_steps >= 0")
        if self.mixed_precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"TrainConfig.mixed_precision must be auto, bf16 or fp32, got {self.mixed_precision!r}")
        if self.export_dtype not in _DTYPES:
            raise ValueError(f"TrainConfig.export_dtype must be one of {sorted(_DTYPES)}, got {self.export_dtype!r}")
        if not 0 < self.data_fraction <= 1:
            raise ValueError(f"TrainConfig.data_fraction must be in (0, 1], got {self.data_fraction}")
        if self.feature_noise < 0 or self.grad_clip < 0:
            raise ValueError("TrainConfig: feature_noise and grad_clip must be >= 0")


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Settings a resumed run may change without changing what it computes.
_RESUME_FREE = {"data_dir", "out_dir", "log_every", "checkpoint_every", "time_budget_s", "export_dtype", "resume"}


def head_config_for(target: LlamaForCausalLM, kind: str, layers: int = 1, draft_vocab_size: int = 0,
                    fc_bias: bool = False, target_layers: tuple[int, ...] = ()) -> EagleConfig:
    """A head shaped like one decoder layer of the target (as the official heads are). An
    EAGLE-3 head reads ``target_layers`` (default: those the target taps now) and is saved with them."""
    tc = target.config
    fields = {f: getattr(tc, f) for f in tc.__slots__}
    layer = LlamaConfig(**{**fields, "num_layers": layers, "eagle3_layers": ()})
    return EagleConfig(kind, layer, fc_bias=fc_bias, draft_vocab_size=draft_vocab_size,
                       target_layers=(tuple(target_layers) or tc.eagle3_layers) if kind == "eagle3" else ())


# ---------------------------------------------------------------------------------------------
# Distributed helpers (torchrun sets WORLD_SIZE, RANK, LOCAL_RANK).
# ---------------------------------------------------------------------------------------------


def init_distributed() -> tuple[int, int, torch.device | None]:
    """(rank, world size, device to use or None) — a process group only when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


# ---------------------------------------------------------------------------------------------
# The trainer.
# ---------------------------------------------------------------------------------------------


def plan_batches(lengths: list[int], batch_tokens: int, max_batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Micro-batches of sequence indices for one epoch, a function of (seed, epoch) only.

    Shuffled, then sorted by length inside windows so that a batch pads little, packed up to
    ``batch_tokens`` padded tokens / ``max_batch_size`` sequences, and the batches shuffled.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(len(lengths), generator=gen).tolist()
    window = 64 * max_batch_size
    batches: list[list[int]] = []
    for w in range(0, len(perm), window):
        chunk = sorted(perm[w:w + window], key=lambda i: (lengths[i], i))
        cur: list[int] = []
        longest = 0
        for i in chunk:
            new_longest = max(longest, lengths[i])
            if cur and (new_longest * (len(cur) + 1) > batch_tokens or len(cur) >= max_batch_size):
                batches.append(cur)
                cur, new_longest = [], lengths[i]
            cur.append(i)
            longest = new_longest
        if cur:
            batches.append(cur)
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in order]


def data_subset(n: int, fraction: float) -> list[int]:
    """Indices of the first ``fraction`` of a fixed random order of n sequences, in data order.
    Growing fractions give nested subsets, so a data-scaling curve adds data and nothing else."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    return sorted(order[:max(1, round(fraction * n))])


class Trainer:
    """Trains one head on prepared data. ``fit`` runs (or resumes) until the last step, the time
    budget or ``max_steps_this_call``; ``export`` writes the official layout."""

    def __init__(self, cfg: TrainConfig, target: LlamaForCausalLM,
                 data: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                 features: list[dict[str, torch.Tensor]] | None = None, progress: bool = False):
        self.cfg = cfg
        self.target = target
        self.device = target.output_weight.device
        self.rank, self.world = (0, 1)
        if (d := _dist()) is not None:
            self.rank, self.world = d.get_rank(), d.get_world_size()
        self.progress = progress and self.rank == 0
        if data is None:
            if not cfg.data_dir:
                raise ValueError("Trainer: give data or TrainConfig.data_dir")
            data, stored = load_prepared_with_features(cfg.data_dir, features is None and cfg.use_stored_features)
            features = stored if features is None else features
        if features is not None and len(features) != len(data):
            raise ValueError(f"Trainer: {len(features)} feature entries for {len(data)} sequences")
        if not cfg.use_stored_features:
            features = None
        if cfg.data_fraction < 1:
            chosen = data_subset(len(data), cfg.data_fraction)
            data = [data[i] for i in chosen]
            features = None if features is None else [features[i] for i in chosen]
        if features is not None:
            need = "taps" if cfg.kind == "eagle3" else "hidden"
            if any(need not in f or "hidden" not in f for f in features[:1]):
                features = None  # stored for the other head kind: compute online
            elif cfg.target_layers and cfg.target_layers != target.config.eagle3_layers:
                features = None  # taps stored from other layers than the head will read: compute online
        # Keep sequences with something to learn: a reply token at index >= 2.
        keep = [i for i, (tok, m) in enumerate(data)
                if len(tok) >= 3 and bool(m[2:cfg.max_seq_len].any())]
        if not keep:
            raise ValueError("Trainer: no sequence has reply tokens to learn from")
        self.data = [(data[i][0][:cfg.max_seq_len].long(), data[i][1][:cfg.max_seq_len].bool()) for i in keep]
        self.features = None if features is None else [{k: v[:cfg.max_seq_len] for k, v in features[i].items()}
                                                       for i in keep]
        self.lengths = [len(t) for t, _ in self.data]
        self.data_size = {"sequences": len(self.data), "tokens": sum(self.lengths),
                          "reply_tokens": sum(int(m.sum()) for _, m in self.data)}
        self.head = self._build_head()
        self.params = [p for p in self.head.parameters()]
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                           weight_decay=cfg.weight_decay)
        # Epoch 0's count; later epochs pack a little differently (total_steps is an estimate in epochs).
        self.steps_per_epoch = self._rank_steps(len(plan_batches(self.lengths, cfg.batch_tokens,
                                                                 cfg.max_batch_size, cfg.seed, 0)))
        if self.steps_per_epoch < 1:
            raise ValueError(f"Trainer: too little data for one optimizer step ({len(self.data)} sequences, "
                             f"grad_accum {cfg.grad_accum}, {self.world} process(es))")
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.noise_gen = torch.Generator(device=self.device).manual_seed(cfg.seed * 7919 + self.rank)
        self.step, self.epoch, self.pos = 0, 0, 0
        self._plan_epoch = -1
        self._rank_batches: list[list[int]] = []
        use_bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and self.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if use_bf16 \
            else contextlib.nullcontext
        self.log_path = os.path.join(cfg.out_dir, "train_log.jsonl") if cfg.out_dir else None
        self.checkpoint_path = os.path.join(cfg.out_dir, "checkpoint.pt") if cfg.out_dir else None
        if cfg.resume and self.checkpoint_path and os.path.isfile(self.checkpoint_path):
            self.load_checkpoint(self.checkpoint_path)

    # ------------------------------------------------------------------ setup

    def _build_head(self) -> EagleHead:
        cfg = self.cfg
        hc = head_config_for(self.target, cfg.kind, cfg.layers, cfg.draft_vocab_size, cfg.fc_bias, cfg.target_layers)
        # The reference kernel set: autograd runs through it (the fused Triton kernels have no
        # backward, and under bf16 autocast they would meet fp32 RoPE tables).
        head = build_head(hc, self.target, kernels="torch", dtype=torch.float32)
        head.init_random(seed=cfg.seed, std=cfg.init_std)
        if cfg.init_from:
            loaded = load_head(cfg.init_from, self.target)
            ours, theirs = hc.to_hf_dict(), loaded.config.to_hf_dict()
            if "eagle_aux_hidden_state_layer_ids" in ours:  # a head saved before its taps were: the default ones
                theirs.setdefault("eagle_aux_hidden_state_layer_ids", ours["eagle_aux_hidden_state_layer_ids"])
            if theirs != ours:
                raise ValueError(f"init_from {cfg.init_from!r}: its shape differs from the configured head")
            head.load_state(loaded.state_items(), source=cfg.init_from)
            return head
        if cfg.kind == "eagle3":
            d2t, t2d = build_vocab_map(self._token_counts(), hc.draft_vocab_size)
            head.d2t.copy_(d2t)
            head.t2d.copy_(t2d)
            if cfg.lm_head_from_target:
                # The head predicts the target's next token: the target's own map from its last
                # normed hidden state to those tokens is a start random weights must learn first.
                with torch.no_grad():
                    rows = self.target.output_weight.index_select(0, head.draft_to_target().to(
                        self.target.output_weight.device))
                    head.lm_head.weight.copy_(rows.to(head.lm_head.weight))
                    head.norm.weight.copy_(self.target.model.norm.weight.to(head.norm.weight))
        return head

    def _token_counts(self) -> torch.Tensor:
        """Counts of the tokens the head learns to predict (reply tokens), for the draft vocab."""
        replies = torch.cat([tokens[mask] for tokens, mask in self.data])
        return torch.bincount(replies, minlength=self.target.config.vocab_size)

    def _rank_steps(self, num_batches: int) -> int:
        return (num_batches // self.world) // self.cfg.grad_accum

    def _lr_factor(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        span = max(self.total_steps - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps) / span, 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def _batches_of_epoch(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches of an epoch: the same count on every rank, a multiple of
        grad_accum (the packing, hence the count, varies a little from epoch to epoch)."""
        if self._plan_epoch != epoch:
            cfg = self.cfg
            batches = plan_batches(self.lengths, cfg.batch_tokens, cfg.max_batch_size, cfg.seed, epoch)
            usable = self._rank_steps(len(batches)) * cfg.grad_accum * self.world
            self._rank_batches = batches[:usable][self.rank::self.world]
            self._plan_epoch = epoch
        return self._rank_batches

    # ------------------------------------------------------------------ one micro-batch

    def _micro_batch(self, indices: list[int]) -> tuple[LossResult, int]:
        """One micro-batch's loss. Nothing here waits for the device: copies to it are
        non-blocking and the loss mask stays on the host, where the scored rows are found."""
        cfg = self.cfg
        tokens, mask, lengths = pad_batch([self.data[i][0] for i in indices], [self.data[i][1] for i in indices])
        tokens = tokens.to(self.device, non_blocking=True)
        b, t = tokens.shape
        want_taps = cfg.kind == "eagle3"
        if self.features is not None:
            hidden = _pad_features([self.features[i]["hidden"] for i in indices], t).to(self.device, non_blocking=True)
            taps = _pad_features([self.features[i]["taps"] for i in indices], t).to(self.device, non_blocking=True) \
                if want_taps else None
        else:
            out = target_forward(self.target, tokens, want_taps=want_taps)
            hidden, taps = out.hidden, out.taps
        target_logits = self._target_logits(hidden)
        feats = taps if want_taps else hidden
        noise = None
        if cfg.feature_noise > 0:
            noise = (torch.rand(feats.shape, generator=self.noise_gen, device=self.device) * 2 - 1) * cfg.feature_noise
        with self.autocast():
            if cfg.kind == "eagle1":
                res = eagle1_loss(self.head, tokens, mask, hidden, target_logits, noise, cfg.value_weight,
                                  cfg.prob_weight)
            else:
                res = eagle3_loss(self.head, tokens, mask, taps, target_logits, cfg.ttt_steps, cfg.step_decay, noise)
        return res, int(lengths.sum())

    def _target_logits(self, hidden: torch.Tensor) -> TargetLogits:
        """The target's logits at the rows a loss asks for, from its final hidden states [B*T, H],
        made as its own forward makes them (its dtype, outside autocast, no graph)."""
        dtype = self.target.output_weight.dtype

        def at(rows: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                return self.target.compute_logits(hidden.index_select(0, rows).to(dtype))
        return at

    def _sync_grads(self) -> None:
        dist = _dist()
        if dist is None or self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(self.params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n

    def _agree(self, flag: bool) -> bool:
        """Rank 0's decision, shared with every rank (so all stop at the same step)."""
        dist = _dist()
        if dist is None or self.world == 1:
            return flag
        t = torch.tensor([1 if flag else 0], device=self.device)
        dist.broadcast(t, 0)
        return bool(t.item())

    # ------------------------------------------------------------------ the loop

    def fit(self, max_steps_this_call: int | None = None) -> dict:
        """Train until the last step, the time budget or ``max_steps_this_call`` more steps; a
        checkpoint is written at every ``checkpoint_every`` steps and when the call ends.
        Returns the last logged record (plus ``stopped``: finished / time_budget / step_limit)."""
        cfg = self.cfg
        if cfg.out_dir and self.rank == 0:
            os.makedirs(cfg.out_dir, exist_ok=True)
        start_time = time.perf_counter()
        first_step = self.step
        window = _Window(self.device)
        tokens_this_call = 0
        last_record: dict = {"step": self.step}
        stopped = "finished"
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train {cfg.kind}", unit="step")
        self.head.train()
        while self.step < self.total_steps:
            batches = self._batches_of_epoch(self.epoch)
            if not batches:
                raise ValueError(f"Trainer: epoch {self.epoch} packs into too few batches for one step")
            micro = batches[self.pos * cfg.grad_accum:(self.pos + 1) * cfg.grad_accum]
            for indices in micro:
                res, ntok = self._micro_batch(indices)
                (res.loss / cfg.grad_accum).backward()
                window.add(res, ntok * self.world)
                tokens_this_call += ntok * self.world
            self._sync_grads()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip) if cfg.grad_clip > 0 else None
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.pos += 1
            if self.pos * cfg.grad_accum >= len(batches):
                self.epoch, self.pos = self.epoch + 1, 0
            if bar is not None:
                bar.update(1)
            over_time = cfg.time_budget_s > 0 and time.perf_counter() - start_time > cfg.time_budget_s
            over_time = self._agree(over_time)
            at_limit = max_steps_this_call is not None and self.step - first_step >= max_steps_this_call
            ending = self.step >= self.total_steps or over_time or at_limit
            if self.step % cfg.log_every == 0 or ending:
                last_record = window.record(self.step, self.epoch, lr, grad_norm)
                self._log(last_record)
                if bar is not None:
                    bar.set_postfix(loss=f"{last_record['loss']:.3f}", acc=f"{last_record['acc'][0]:.2f}")
            if self.step % cfg.checkpoint_every == 0 or ending:
                self.save_checkpoint()
            if over_time and self.step < self.total_steps:
                stopped = "time_budget"
                break
            if at_limit and self.step < self.total_steps:
                stopped = "step_limit"
                break
        if bar is not None:
            bar.close()
        self.head.eval()
        # The whole call's throughput (a log line's covers its window only: the last one may be
        # a few steps, and a window that saved a checkpoint is slower).
        seconds = time.perf_counter() - start_time
        return {**last_record, "stopped": stopped, "total_steps": self.total_steps, "train_seconds": seconds,
                "tokens_per_s_run": tokens_this_call / max(seconds, 1e-9)}

    def _log(self, record: dict) -> None:
        if self.rank != 0 or self.log_path is None:
            return
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: str | None = None) -> None:
        """Head, optimizer, scheduler, RNG states and the data position, written atomically."""
        path = path or self.checkpoint_path
        if path is None:
            return
        noise_states = [self.noise_gen.get_state()]
        if (dist := _dist()) is not None and self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, self.noise_gen.get_state().cpu())
            noise_states = gathered
        if self.rank != 0:
            return
        state = {
            "step": self.step, "epoch": self.epoch, "pos": self.pos, "world": self.world,
            "config": dataclasses.asdict(self.cfg),
            "head": {k: v.detach().cpu() for k, v in self.head.state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "noise": [s.cpu() for s in noise_states],
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }
        tmp = path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, path: str) -> None:
        """Resume exactly where ``save_checkpoint`` left off (same config and world size)."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"cannot read training checkpoint {path!r}: {exc}") from exc
        mine, theirs = dataclasses.asdict(self.cfg), state["config"]
        differ = sorted(k for k in mine if k not in _RESUME_FREE and mine[k] != theirs.get(k))
        if differ:
            raise ValueError(f"checkpoint {path!r} was made with other settings: "
                             + ", ".join(f"{k}={theirs.get(k)!r} (now {mine[k]!r})" for k in differ)
                             + "; use another out_dir or resume = false")
        if state["world"] != self.world:
            raise ValueError(f"checkpoint {path!r} was made with {state['world']} process(es), now {self.world}")
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        if torch.cuda.is_available() and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.noise_gen.set_state(state["rng"]["noise"][self.rank])
        self.step, self.epoch, self.pos = state["step"], state["epoch"], state["pos"]
        if self.log_path and self.rank == 0 and os.path.isfile(self.log_path):
            # Drop log lines of steps after the checkpoint (an interrupted run wrote them).
            with open(self.log_path) as f:
                lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
            with open(self.log_path, "w") as f:
                f.writelines(lines)

    # ------------------------------------------------------------------ export

    def export(self, path: str | None = None) -> str:
        """Write the head in the official layout (config.json + model.safetensors) and the
        ranking of its training replies' tokens (token_ranking.safetensors: reduced vocabularies)."""
        path = path or os.path.join(self.cfg.out_dir, "head")
        if self.rank == 0:
            self.head.set_token_ranking(rank_tokens(self._token_counts()))
            export_head(self.head, self.target, path, _DTYPES[self.cfg.export_dtype])
        return path


def export_head(head: EagleHead, target: LlamaForCausalLM, path: str, dtype: torch.dtype = torch.float32) -> None:
    """save_head in ``dtype`` (a copy; the trained head keeps its fp32 weights)."""
    if dtype == head.fc.weight.dtype:
        save_head(head, path)
        return
    copy = build_head(head.config, target, dtype=dtype)
    copy.load_state(list(head.state_items()), source="trained head")
    copy.set_token_ranking(head.token_ranking)
    save_head(copy, path)


def _pad_features(rows: list[torch.Tensor], t: int) -> torch.Tensor:
    """[n_i, F] per sequence -> [B*T, F] right-padded with zeros."""
    out = torch.zeros(len(rows), t, rows[0].shape[-1], dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out.reshape(len(rows) * t, -1)


class _Window:
    """Loss / accuracy sums since the last log line (device tensors, read once per log)."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.step_losses: list[torch.Tensor] = []
        self.correct: list[torch.Tensor] = []
        self.counts: list[torch.Tensor] = []
        self.micro = 0
        self.tokens = 0
        self.started = time.perf_counter()

    def add(self, res: LossResult, tokens: int) -> None:
        self.loss = self.loss + res.loss.detach().float()
        if not self.correct:
            self.step_losses = [torch.zeros((), device=self.device) for _ in res.correct]
            self.correct = [torch.zeros((), dtype=torch.int64, device=self.device) for _ in res.correct]
            self.counts = [torch.zeros((), dtype=torch.int64, device=self.device) for _ in res.correct]
        for i in range(len(res.correct)):
            self.step_losses[i] = self.step_losses[i] + res.step_losses[i].float()
            self.correct[i] = self.correct[i] + res.correct[i]
            self.counts[i] = self.counts[i] + res.counts[i]
        self.micro += 1
        self.tokens += tokens

    def record(self, step: int, epoch: int, lr: float, grad_norm) -> dict:
        dist = _dist()
        stats = torch.stack([self.loss] + self.step_losses + [c.float() for c in self.correct]
                            + [c.float() for c in self.counts])
        micro = self.micro
        if dist is not None:
            dist.all_reduce(stats)
            micro *= dist.get_world_size()
        values = stats.tolist()  # the one host read per log line
        k = len(self.correct)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        record = {
            "step": step, "epoch": epoch, "loss": values[0] / max(micro, 1),
            "step_loss": [v / max(micro, 1) for v in values[1:1 + k]],
            "acc": [c / n if n else 0.0 for c, n in zip(values[1 + k:1 + 2 * k], values[1 + 2 * k:])],
            "lr": lr, "tokens_per_s": self.tokens / elapsed,
            "grad_norm": None if grad_norm is None else float(grad_norm),
        }
        self.reset()
        return record


# ---------------------------------------------------------------------------------------------
# Evaluation with the real speculative decoder, and plots.
# ---------------------------------------------------------------------------------------------


def speculative_llm(target: LlamaForCausalLM, head: EagleHead, tree: str, tokenizer=None, engine=None,
                    eos_ids: tuple[int, ...] = (), draft_vocab_size: int | None = None):
    """An LLM that drafts with ``head`` over ``tree`` (engine defaults unless given) and over
    ``draft_vocab_size`` of its most frequent tokens (None: the head's default)."""
    from eaglespec.engine.llm import LLM

    return LLM.from_model(target, tokenizer=tokenizer, draft=head, engine=engine, eos_ids=eos_ids,
                          spec=SpecConfig(tree=tree, draft_vocab_size=draft_vocab_size))


def evaluate_tau(llm, prompts: list, params: SamplingParams | None = None, tree: str | None = None) -> dict:
    """Generate ``prompts`` with the engine's speculative decoder and measure the head.

    ``llm`` must carry a draft head; ``tree`` (when given and different from the LLM's) rebuilds
    an LLM around the same target, head and engine settings. Returns tau = tokens per
    speculative step (accepted drafts + the target's token, over all prompts' steps), acceptance
    rate per draft depth (accepted over proposed drafts; ``pooled_speculation``),
    tokens_per_target_forward = new tokens / every target forward, and totals. The two differ
    where prompts outnumber the batch: a request admitted late is prefilled beside the running
    ones, which decode one plain token in that forward (design note 63); tau measures the head,
    the other the engine's run.
    """
    if llm.speculative is None:
        raise ValueError("evaluate_tau needs an LLM with a draft head")
    if tree is not None and tree != llm.spec_config.tree:
        llm = speculative_llm(llm.model, llm.speculative.head, tree, llm.tokenizer, llm.engine_config, llm.eos_ids,
                              llm.spec_config.draft_vocab_size)
    params = params or SamplingParams(max_tokens=128)
    start = time.perf_counter()
    outs = llm.generate(list(prompts), params)
    elapsed = time.perf_counter() - start
    errors = [o.error for o in outs if o.error]
    if errors:
        raise ValueError(f"evaluate_tau: generation failed: {errors[0]}")
    new = sum(o.stats["new_tokens"] for o in outs)
    forwards = sum(o.stats["target_forwards"] for o in outs)
    return {
        **pooled_speculation([o.stats for o in outs]),
        "tokens_per_target_forward": new / forwards if forwards else 0.0,
        "new_tokens": new, "target_forwards": forwards, "prompts": len(outs),
        "tree": llm.spec_config.tree, "tokens_per_s": new / elapsed if elapsed > 0 else 0.0,
    }


def chat_prompts(tokenizer, questions: list[str]) -> list[list[int]]:
    """Token ids of single-turn chat prompts (the chat template applied)."""
    return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                           add_generation_prompt=True)) for q in questions]


def plot_log(jsonl: str, png: str) -> bool:
    """Loss and per-step accuracy against the step; False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    with open(jsonl) as f:
        records = [json.loads(ln) for ln in f if ln.strip()]
    records = [r for r in records if "loss" in r]
    if not records:
        raise ValueError(f"plot_log: no training records in {jsonl!r}")
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(steps, [r["loss"] for r in records])
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    for i in range(len(records[-1]["acc"])):
        ax_acc.plot(steps, [r["acc"][i] if i < len(r["acc"]) else float("nan") for r in records], label=f"step {i}")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("top-1 agreement with the target")
    if len(records[-1]["acc"]) > 1:
        ax_acc.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return True


__all__ = ["eagle1_loss", "eagle3_loss",
           "build_vocab_map", "TrainConfig", "Trainer", "plan_batches", "export_head", "evaluate_tau",
           "speculative_llm", "chat_prompts", "plot_log", "init_distributed", "head_config_for"]
