"""``LLM``: load a target (and a draft head), then generate, stream or chat."""

from __future__ import annotations

import itertools
import random
from typing import Iterator, Sequence

import torch

from eaglespec.config import EngineConfig, SamplingParams, SpecConfig
from eaglespec.engine.request import Output, Request
from eaglespec.engine.runner import DecodeFlight, ModelRunner, resolve_backend
from eaglespec.engine.scheduler import Scheduler
from eaglespec.models.eagle import EagleHead, load_head
from eaglespec.models.llama import LlamaForCausalLM, build_model
from eaglespec.speculative.step import SpeculativeRunner

Prompt = str | Sequence[int]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(names)}")
    return names[dtype]


def shipped_head_path() -> str | None:
    """The draft head trained for the embedded default model, if this install carries one."""
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "smollm2-eagle")
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def default_spec_config(draft, default_draft: bool) -> SpecConfig:
    """The tree that served the shipped head best, else the library default."""
    import json
    import os

    path = shipped_head_path() if default_draft and draft is None else None
    if path and os.path.isfile(os.path.join(path, "serving.json")):
        with open(os.path.join(path, "serving.json")) as f:
            return SpecConfig(tree=json.load(f)["tree"])
    return SpecConfig()


class LLM:
    """The public entry point (see DESIGN.md's public contract)."""

    def __init__(self, model: str | None = None, draft: str | None = None, spec: SpecConfig | None = None,
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 engine: EngineConfig | None = None, progress: bool = False):
        from eaglespec.models.loading import default_model_path, open_checkpoint
        from eaglespec.tokenizer import Tokenizer

        self.device = resolve_device(device)
        dt = resolve_dtype(dtype, self.device)
        ckpt = open_checkpoint(model or default_model_path(), progress=progress)
        kernels = resolve_backend((engine or EngineConfig()).attention_backend, self.device)
        target = build_model(ckpt.config, self.device, dt, kernels=kernels)
        target.load_hf_tensors(ckpt.tensors, source=ckpt.path)
        tokenizer = Tokenizer.from_source(ckpt.tokenizer_source)
        if ckpt.chat_template and not tokenizer.chat_template:
            tokenizer.chat_template = ckpt.chat_template
        eos = tuple(dict.fromkeys(ckpt.generation_eos_ids + tokenizer.eos_ids + ckpt.config.eos_token_ids))
        self._setup(target, tokenizer, eos, draft, spec, engine, default_draft=model is None)

    @classmethod
    def from_model(cls, target: LlamaForCausalLM, tokenizer=None, draft=None, spec: SpecConfig | None = None,
                   engine: EngineConfig | None = None, eos_ids: tuple[int, ...] = ()) -> "LLM":
        """Wrap an already built model (tests, benchmarks). Prompts are then token-id lists
        unless a tokenizer is given; ``draft`` is a draft-head module or None."""
        self = cls.__new__(cls)
        self.device = target.output_weight.device
        self._setup(target, tokenizer, eos_ids or target.config.eos_token_ids, draft, spec, engine,
                    default_draft=False)
        return self

    def _setup(self, target, tokenizer, eos_ids, draft, spec, engine, default_draft: bool) -> None:
        import dataclasses

        from eaglespec.speculative.tree import parse_tree

        self.model = target
        self.tokenizer = tokenizer
        self.eos_ids = tuple(eos_ids)
        self.engine_config = engine or EngineConfig()
        if not self.engine_config.max_model_len:  # 0: the model's own context length
            self.engine_config = dataclasses.replace(self.engine_config,
                                                     max_model_len=target.config.max_position_embeddings)
        self.spec_config = spec
        head = self._resolve_draft(draft, target, default_draft)
        if head is not None:
            self.spec_config = spec or default_spec_config(draft, default_draft)
        lookahead = parse_tree(self.spec_config.tree).depth + 1 if head is not None else 1
        self.runner = ModelRunner(target, self.engine_config, self.device, lookahead)
        self.speculative = SpeculativeRunner(self.runner, head, self.spec_config) if head is not None else None
        self.scheduler = Scheduler(self.runner.allocator, self.engine_config.max_batch_size,
                                   self.engine_config.max_model_len, self.engine_config.prefill_token_budget,
                                   lookahead=lookahead)
        self._ids = itertools.count()
        self._requests: dict[int, Request] = {}
        self._in_flight: DecodeFlight | None = None  # a decode step queued but not read yet

    @staticmethod
    def _resolve_draft(draft, target: LlamaForCausalLM, default_draft: bool) -> EagleHead | None:
        if isinstance(draft, EagleHead):
            return draft
        if draft == "none":
            return None
        if draft is None:
            path = shipped_head_path() if default_draft else None
            return load_head(path, target) if path else None
        return load_head(draft, target)

    # ------------------------------------------------------------------ requests

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this LLM has no tokenizer: give prompts as lists of token ids")
            return self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt]
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        return ids

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None) -> int:
        from eaglespec.tokenizer import IncrementalDetokenizer

        params = params or SamplingParams()
        ids = self._encode(prompt)
        self.scheduler.check_prompt(len(ids))
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        req = Request(next(self._ids), ids, params, seed,
                      IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None)
        self._requests[req.request_id] = req
        self.scheduler.add(req)
        return req.request_id

    def step(self) -> list[Request]:
        """Run one engine step; returns the requests that made progress (finished ones included).

        Plain decoding overlaps the host with the device: while a decode step runs, the next
        one is queued with its input tokens taken on the device, and only then are the first
        step's tokens read and checked. That needs the batch to go on unchanged (nothing to
        admit, nothing finished or preempted, room for one more token each); otherwise the
        step ends without a successor. A request that stops while its successor runs wastes
        that one token, which is dropped.
        """
        flight, self._in_flight = self._in_flight, None
        if flight is None:
            scheduled = self.scheduler.schedule()
            if scheduled is None:
                return []
            reqs = scheduled.requests
            if not reqs or scheduled.kind == "prefill" or self.speculative is not None:
                emitted = [] if not reqs else (self._prefill(reqs) if scheduled.kind == "prefill"
                                               else self._speculate(reqs))
                self._apply(reqs, emitted, prefill=scheduled.kind == "prefill")
                return reqs
            flight = self.runner.launch_decode(reqs)
        if self.engine_config.overlap_decode and self._can_follow(flight.reqs):
            self._in_flight = self.runner.launch_decode(flight.reqs, follow=flight)
        live = [r for r in flight.reqs if not r.finished]
        self._apply(flight.reqs, [[t] for t in flight.wait()], prefill=False)  # the one host read of the step
        return live

    def _can_follow(self, reqs: list[Request]) -> bool:
        """Whether the next decode step may be queued before this one's tokens are known: the
        same requests, none finished, nobody waiting for a free row, no limit reached by the
        token in flight, and KV room without preemption (the room is taken here)."""
        sched = self.scheduler
        if sched.waiting and len(sched.running) < sched.max_batch:
            return False
        if len(sched.running) != len(reqs) or any(a is not b for a, b in zip(sched.running, reqs)):
            return False
        allocator, new_blocks = self.runner.allocator, 0
        for r in reqs:
            if (r.finished or len(r.output_ids) + 1 >= r.params.max_tokens
                    or len(r.all_ids) + 1 >= self.engine_config.max_model_len):
                return False
            new_blocks += max(0, allocator.blocks_needed(r.num_cached + sched.lookahead) - len(r.blocks))
        if new_blocks > allocator.num_free:
            return False
        for r in reqs:
            allocator.grow(r.blocks, r.num_cached + sched.lookahead)
        return True

    def _apply(self, reqs: list[Request], emitted: list[list[int]], prefill: bool) -> None:
        """Append each request's new tokens (stop checks included) and retire finished ones."""
        limit = self.engine_config.max_model_len
        for req, toks in zip(reqs, emitted):
            # A step near the limit may have computed tokens past it (see scheduler.py): dropped.
            req.record_step(toks[:max(limit - len(req.all_ids), 0)], self.eos_ids, prefill)
            if not req.finished and len(req.all_ids) >= limit:
                req.finish("length")
        for req in list(self.scheduler.running):
            if req.finished:
                self.scheduler.retire(req)
                if self.speculative is not None:
                    self.speculative.release(req)

    def _prefill(self, reqs: list[Request]) -> list[list[int]]:
        spec = self.speculative
        want = {} if spec is None else {"want_hidden": spec.feature == "hidden", "want_taps": spec.feature == "taps"}
        tokens, out, new_counts = self.runner.prefill(reqs, **want)
        if spec is not None:
            spec.after_prefill(reqs, out, tokens, new_counts)
        return [[t] for t in tokens.tolist()]

    def _speculate(self, reqs: list[Request]) -> list[list[int]]:
        tokens, counts = self.speculative.step(reqs)
        tokens, counts = tokens.tolist(), counts.tolist()  # the one host read of the step
        depth = self.speculative.shape.depth
        emitted = []
        for req, row, n in zip(reqs, tokens, counts):
            req.num_cached += n
            if not req.proposed_per_depth:
                req.proposed_per_depth = [0] * depth
                req.accepted_per_depth = [0] * depth
            for d in range(depth):
                req.proposed_per_depth[d] += 1
                req.accepted_per_depth[d] += int(n - 1 > d)
            emitted.append(row[:n])
        return emitted

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._in_flight is not None

    def _drain(self) -> None:
        while self.has_work:
            self.step()

    # ------------------------------------------------------------------ public API

    def generate(self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None,
                 ) -> list[Output]:
        """Generate for a batch of prompts (strings or token-id lists), continuously batched."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        encoded = [self._encode(p) for p in prompts]
        for ids in encoded:  # refuse the whole batch before any of it is queued
            self.scheduler.check_prompt(len(ids))
        ids = [self.add_request(p, sp) for p, sp in zip(encoded, plist)]
        self._drain()
        return [self._requests.pop(i).to_output() for i in ids]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text pieces of one prompt as they are produced."""
        rid = self.add_request(prompt, params)
        req = self._requests[rid]
        while not req.finished:
            self.step()
            if req.pending_text:
                piece, req.pending_text = req.pending_text, ""
                yield piece
        if req.pending_text:
            yield req.pending_text
        self._drain()
        self._requests.pop(rid, None)

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> Output:
        """Apply the chat template to one conversation and generate the assistant's reply."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate([self.tokenizer.encode(text)], params)[0]

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """The target's full-sequence logits [T, vocab] (fp32)."""
        return self.runner.full_logits(self._encode(token_ids))
