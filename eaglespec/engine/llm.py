"""``LLM``: load a target (and a draft head), then generate, stream or chat."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from eaglespec.config import EngineConfig, SamplingParams, SpecConfig
from eaglespec.engine.core import EngineCore, RequestDelta
from eaglespec.engine.request import Output, Request
from eaglespec.engine.runner import ModelRunner, resolve_backend
from eaglespec.engine.scheduler import Scheduler
from eaglespec.models.eagle import EagleHead, load_head
from eaglespec.models.llama import LlamaForCausalLM, build_model
from eaglespec.speculative.step import SpeculativeRunner

Prompt = str | Sequence[int]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on (default: cuda when present); ValueError for one that cannot be used."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unknown = f"device {device!r} is not one eaglespec runs on: use cpu, cuda or cuda:N"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(unknown) from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(unknown)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available here (torch {torch.__version__}, "
                             f"{'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'}); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


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


class TextStream:
    """What ``LLM.stream`` returns: iterate for the text pieces of one request as they are
    produced; once the iteration is over, ``output`` holds the finished request's Output."""

    def __init__(self):
        self.output: Output | None = None
        self._pieces: Iterator[str] = iter(())

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        return next(self._pieces)


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

        self.model = target
        self.tokenizer = tokenizer
        self.eos_ids = tuple(eos_ids)
        self.engine_config = engine or EngineConfig()
        if not self.engine_config.max_model_len:  # 0: the model's own context length
            self.engine_config = dataclasses.replace(self.engine_config,
                                                     max_model_len=target.config.max_position_embeddings)
        head = self._resolve_draft(draft, target, default_draft)
        self.spec_config = (spec or default_spec_config(draft, default_draft)) if head is not None else spec
        self.core = EngineCore(target, tokenizer, self.eos_ids, head, self.spec_config, self.engine_config,
                               self.device)
        self._requests: dict[int, Request] = {}  # this front end's requests, finished ones until collected

    # The engine's parts, for tests and benchmarks that look inside.
    @property
    def runner(self) -> ModelRunner:
        return self.core.runner

    @property
    def scheduler(self) -> Scheduler:
        return self.core.scheduler

    @property
    def speculative(self) -> SpeculativeRunner | None:
        return self.core.speculative

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

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None) -> int:
        rid = self.core.add_request(prompt if isinstance(prompt, str) else list(prompt), params)
        self._requests[rid] = self.core.requests[rid]
        return rid

    def step(self) -> list[RequestDelta]:
        """Run one engine step (see ``EngineCore.step``)."""
        return self.core.step()

    @property
    def has_work(self) -> bool:
        return self.core.has_work

    def _drain(self) -> None:
        while self.core.has_work:
            self.core.step()

    # ------------------------------------------------------------------ public API

    def generate(self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None,
                 ) -> list[Output]:
        """Generate for a batch of prompts (strings or token-id lists), continuously batched."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        encoded = [self.core.encode(p) for p in prompts]
        for ids in encoded:  # refuse the whole batch before any of it is queued
            self.scheduler.check_prompt(len(ids))
        ids = [self.add_request(p, sp) for p, sp in zip(encoded, plist)]
        self._drain()
        return [self._requests.pop(i).to_output() for i in ids]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> TextStream:
        """Text pieces of one prompt as they are produced (``TextStream.output`` at the end)."""
        stream = TextStream()
        stream._pieces = self._stream_pieces(prompt, params, stream)
        return stream

    def _stream_pieces(self, prompt: Prompt, params: SamplingParams | None, stream: TextStream) -> Iterator[str]:
        rid = self.add_request(prompt, params)
        try:
            finished = False
            while not finished:
                for delta in self.core.step():
                    if delta.request_id == rid:
                        if delta.new_text:
                            yield delta.new_text
                        finished = delta.finished
            stream.output = self._requests[rid].to_output()
        finally:
            self.core.abort(rid)  # a stream closed early frees its blocks
            self._requests.pop(rid, None)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """The token ids of one conversation under the chat template, ready for the reply."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text)

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> Output:
        """Apply the chat template to one conversation and generate the assistant's reply."""
        return self.generate([self.chat_prompt(messages)], params)[0]

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """The target's full-sequence logits [T, vocab] (fp32)."""
        return self.runner.full_logits(self.core.encode(token_ids))
