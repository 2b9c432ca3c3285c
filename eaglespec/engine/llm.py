"""``LLM``: load a target (and a draft head), then generate, stream or chat."""

from __future__ import annotations

import logging
import numbers
import os
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from eaglespec.config import EngineConfig, SamplingParams, SpecConfig
from eaglespec.engine.core import EngineCore, RequestDelta
from eaglespec.engine.distributed import (RankArgs, RankGroup, check_tensor_parallel_size,
                                          leave_after_following)
from eaglespec.engine.request import Output, Request
from eaglespec.engine.runner import ModelRunner, resolve_backend
from eaglespec.engine.scheduler import Scheduler
from eaglespec.engine.step_control import SINGLE_PROCESS, StepControl
from eaglespec.models.eagle import EagleHead, load_head
from eaglespec.models.llama import LlamaForCausalLM, build_model
from eaglespec.models.tensor_parallel import SINGLE, TensorParallel
from eaglespec.speculative.step import SpeculativeRunner

if TYPE_CHECKING:
    from eaglespec.models.loading import LoadedCheckpoint

Prompt = str | Sequence[int]
log = logging.getLogger(__name__)


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
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "smollm2-eagle")
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def is_default_model(path) -> bool:
    """Whether ``path`` is the embedded default model (the one the shipped head was trained for)."""
    from eaglespec.models.loading import default_model_path

    try:
        return os.path.samefile(path, default_model_path())
    except (OSError, ValueError):  # no default model installed, or no such path
        return False


def check_speculation_args(draft, spec, default_draft: bool) -> SpecConfig | None:
    """Check ``draft`` and ``spec`` before anything is loaded; return ``spec`` as a SpecConfig.

    A tree needs a draft head: with ``draft="none"``, or no head for this model, a given spec is
    an error rather than silently ignored. The tree itself is parsed (limits, choices file).
    """
    from eaglespec.speculative.tree import parse_tree

    if isinstance(spec, str):
        spec = SpecConfig(tree=spec)
    if spec is not None and not isinstance(spec, SpecConfig):
        raise TypeError(f"spec must be a SpecConfig, a tree string or None, got {type(spec).__name__}")
    if draft is not None and not isinstance(draft, (str, os.PathLike, EagleHead)):
        raise TypeError(f"draft must be a draft-head directory, 'none' or None, got {type(draft).__name__}")
    speculating = draft != "none" and (draft is not None or (default_draft and shipped_head_path() is not None))
    if spec is not None and not speculating:
        why = ("draft='none' (--draft none) turns speculation off" if draft == "none"
               else "there is no draft head for this model (pass draft=PATH / --draft PATH)")
        raise ValueError(f"a tree was given (spec={spec.tree!r} / --tree) but {why}: drop the tree or give a head")
    if isinstance(draft, (str, os.PathLike)) and draft != "none" and not os.path.isdir(draft):
        raise FileNotFoundError(f"draft head directory not found: {os.fspath(draft)!r} (give a directory with "
                                f"config.json and model.safetensors, or 'none')")
    if spec is not None:
        for tree in spec.trees:
            parse_tree(tree)
    return spec


def load_rank_models(model_path, head_path: str | None, device: torch.device, dtype: torch.dtype, kernels: str,
                     tp: TensorParallel, progress: bool) -> tuple["LoadedCheckpoint", LlamaForCausalLM,
                                                                  EagleHead | None]:
    """The checkpoint, target and draft head (None without ``head_path``) as rank ``tp.rank``
    holds them: the one place a rank opens, builds and loads its models (``tp`` is SINGLE on
    one device). The checkpoint yields only this rank's slices and the target is its shard; the
    head is replicated, with the whole embedding and output matrix it borrows (read from the
    target's checkpoint when the target is a shard, see models/eagle.py)."""
    from eaglespec.models.eagle import borrowed_weights
    from eaglespec.models.loading import open_checkpoint

    ckpt = open_checkpoint(model_path, progress=progress, tp=tp)
    target = build_model(ckpt.config, device, dtype, kernels=kernels, tp=tp)
    target.load_hf_tensors(ckpt.tensors, source=ckpt.path)
    head = None
    if head_path is not None:
        head = load_head(head_path, target, borrowed_weights(target, checkpoint=os.fspath(model_path)))
    return ckpt, target, head


def draft_head_path(draft, default_draft: bool) -> str | None:
    """The head directory ``draft`` names (None: no head; the shipped one for the default model)."""
    if draft == "none":
        return None
    if draft is None:
        return shipped_head_path() if default_draft else None
    return os.fspath(draft)


def load_tokenizer(ckpt) -> tuple["Tokenizer | None", str]:
    """The checkpoint's tokenizer, or (None, why) when its files have none: such a model still
    serves token-id prompts (as vLLM's ``skip_tokenizer_init``); text fails then, saying why."""
    from eaglespec.tokenizer import Tokenizer

    try:
        tokenizer = Tokenizer.from_source(ckpt.tokenizer_source)
    except FileNotFoundError as err:
        return None, str(err)
    if ckpt.chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = ckpt.chat_template
    return tokenizer, ""


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

    def __init__(self, model: str | None = None, draft: str | None = None, spec: SpecConfig | str | None = None,
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 engine: EngineConfig | None = None, progress: bool = False, tensor_parallel_size: int = 1):
        """tensor_parallel_size: ranks (GPUs, or CPU processes) the model runs on. Above 1 this
        process is rank 0 and starts the others (one per GPU, cuda:r for rank r), or, under
        torchrun, joins the job: there a process of rank > 0 follows rank 0 until it closes,
        then exits with status 0 (the script's later lines never run there). ``close()`` (or
        the interpreter's exit) stops the ranks."""
        from eaglespec.models.loading import default_model_path

        self._ranks: RankGroup | None = None
        if model is not None and not isinstance(model, (str, os.PathLike)):
            raise TypeError(f"model must be a path (HF directory or .gguf file) or None, got {type(model).__name__}")
        model_path = model if model is not None else default_model_path()
        default_draft = is_default_model(model_path)
        # Arguments first: a bad tree or draft path fails before seconds of loading.
        spec = check_speculation_args(draft, spec, default_draft)
        dev = resolve_device(device)
        world_size = check_tensor_parallel_size(tensor_parallel_size, dev)
        if world_size == 1:
            self._load(model_path, draft, spec, dev, dtype, engine, progress, default_draft, SINGLE, SINGLE_PROCESS)
            return
        if isinstance(draft, EagleHead):
            raise ValueError("draft: with tensor_parallel_size > 1 give the head's directory (every rank loads "
                             "it), not a module")
        args = RankArgs(os.fspath(model_path), os.fspath(draft) if draft is not None else None, spec, dtype, engine,
                        dev.type, default_draft)
        self._ranks = RankGroup.start(args, world_size, build_engine=LLM._for_rank)
        self._load_rank(args, progress and self._ranks.rank == 0)
        if self._ranks.rank != 0:  # under torchrun: serve rank 0 until it closes, then leave
            self._ranks.follow(self.core)
            leave_after_following()

    @classmethod
    def _for_rank(cls, args: RankArgs, ranks: RankGroup) -> "LLM":
        """A worker rank's engine (distributed.py), built exactly as rank 0 builds its own."""
        self = cls.__new__(cls)
        self._ranks = ranks
        self._load_rank(args, progress=False)
        return self

    def _load_rank(self, args: RankArgs, progress: bool) -> None:
        ranks = self._ranks
        try:
            self._load(args.model, args.draft, args.spec, ranks.device, args.dtype, args.engine, progress,
                       args.default_draft, ranks.tensor_parallel, ranks.control)
        except BaseException as exc:
            if ranks.rank == 0:
                ranks.abandon(exc)  # stops the workers; raises a worker's error when it caused this one
            raise
        ranks.last_fingerprint = lambda: self.core.last_fingerprint

    def _load(self, model_path, draft, spec, device: torch.device, dtype, engine, progress: bool,
              default_draft: bool, tp: TensorParallel, control: StepControl) -> None:
        self.device = device
        kernels = resolve_backend((engine or EngineConfig()).attention_backend, device)
        module = draft if isinstance(draft, EagleHead) else None  # a head built by the caller (one device)
        head_path = None if module is not None else draft_head_path(draft, default_draft)
        ckpt, target, head = load_rank_models(model_path, head_path, device, resolve_dtype(dtype, device), kernels,
                                              tp, progress)
        tokenizer, no_tokenizer_reason = load_tokenizer(ckpt)
        tokenizer_eos = tokenizer.eos_ids if tokenizer is not None else ()
        eos = tuple(dict.fromkeys(ckpt.generation_eos_ids + tokenizer_eos + ckpt.config.eos_token_ids))
        draft = module if module is not None else head if head is not None else "none"
        self._setup(target, tokenizer, eos, draft, spec, engine, default_draft=default_draft,
                    no_tokenizer_reason=no_tokenizer_reason, control=control)

    @classmethod
    def from_model(cls, target: LlamaForCausalLM, tokenizer=None, draft=None, spec: SpecConfig | str | None = None,
                   engine: EngineConfig | None = None, eos_ids: tuple[int, ...] = (),
                   tensor_parallel_size: int = 1) -> "LLM":
        """Wrap an already built model (tests, benchmarks). Prompts are then token-id lists
        unless a tokenizer is given; ``draft`` is a draft-head module or None."""
        if tensor_parallel_size != 1:
            raise ValueError(f"LLM.from_model runs on one device (tensor_parallel_size=1), got "
                             f"tensor_parallel_size={tensor_parallel_size!r}: every rank loads its own shard, so "
                             f"tensor parallelism needs a checkpoint path: LLM(model=PATH, tensor_parallel_size=N)")
        spec = check_speculation_args(draft, spec, default_draft=False)
        self = cls.__new__(cls)
        self._ranks = None
        self.device = target.output_weight.device
        self._setup(target, tokenizer, eos_ids or target.config.eos_token_ids, draft, spec, engine,
                    default_draft=False)
        return self

    def _setup(self, target, tokenizer, eos_ids, draft, spec, engine, default_draft: bool,
               no_tokenizer_reason: str = "", control: StepControl = SINGLE_PROCESS) -> None:
        import dataclasses

        self.model = target
        self.tokenizer = tokenizer
        self.eos_ids = tuple(eos_ids)
        self.engine_config = engine or EngineConfig()
        if not self.engine_config.max_model_len:  # 0: the model's own context length
            self.engine_config = dataclasses.replace(self.engine_config,
                                                     max_model_len=target.config.max_position_embeddings)
        head = self._resolve_draft(draft, target, default_draft)
        self.spec_config = (spec or SpecConfig()) if head is not None else spec
        self.core = EngineCore(target, tokenizer, self.eos_ids, head, self.spec_config, self.engine_config,
                               self.device, no_tokenizer_reason=no_tokenizer_reason, control=control)
        self._requests: dict[int, Request] = {}  # this front end's requests, finished ones until collected

    @property
    def tensor_parallel_size(self) -> int:
        return self._ranks.world_size if self._ranks is not None else 1

    def close(self) -> None:
        """Stop the other tensor-parallel ranks and leave their groups (nothing to do on one
        device). Raises when a rank had failed. The engine takes no work afterwards."""
        if self._ranks is not None:
            self._ranks.close()  # once: a second call does nothing

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # an error (or Ctrl-C) is on its way out: closing must not hide it
            self.close()
        except Exception:  # noqa: BLE001
            log.warning("closing the tensor-parallel engine after %s failed", exc_type.__name__, exc_info=True)

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
        path = draft_head_path(draft, default_draft)
        return load_head(path, target) if path is not None else None

    # ------------------------------------------------------------------ requests

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, what: str = "prompt") -> int:
        rid = self.core.add_request(prompt, params, what)
        self._requests[rid] = self.core.requests[rid]
        return rid

    def step(self) -> list[RequestDelta]:
        """Run one engine step (see ``EngineCore.step``)."""
        return self.core.step()

    def collect(self, request_id: int) -> Output:
        """The output of a finished request (after ``step`` reported it finished); the front end
        forgets the request."""
        req = self._requests.get(request_id)
        if req is None or not req.finished:
            raise ValueError(f"request {request_id} is {'unknown' if req is None else 'still running'}")
        return self._requests.pop(request_id).to_output()

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
        prompts = _prompt_list(prompts)
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        encoded = []
        for i, (p, sp) in enumerate(zip(prompts, plist)):  # refuse the whole batch before any of it is queued
            encoded.append(self.core.encode(p, f"prompts[{i}]"))
            self.scheduler.check_prompt(len(encoded[-1]))
            if sp is not None and not isinstance(sp, SamplingParams):
                raise TypeError(f"params[{i}] must be a SamplingParams or None, got {type(sp).__name__}")
        ids = [self.add_request(p, sp, f"prompts[{i}]") for i, (p, sp) in enumerate(zip(encoded, plist))]
        self._drain()
        return [self.collect(i) for i in ids]

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
        """The token ids of one conversation under the chat template, ready for the reply
        (messages checked: role and content of each, OpenAI text parts joined)."""
        from eaglespec.tokenizer import chat_messages

        messages = chat_messages(messages)
        if self.tokenizer is None:
            raise ValueError(f"chat needs a tokenizer, and this model has none ({self.core.no_tokenizer_reason})")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text)

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> Output:
        """Apply the chat template to one conversation and generate the assistant's reply."""
        return self.generate([self.chat_prompt(messages)], params)[0]

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """The target's full-sequence logits [T, vocab] (fp32)."""
        ids = self.core.encode(token_ids, "token_ids")
        limit = self.engine_config.max_model_len
        if len(ids) > limit:
            raise ValueError(f"token_ids: {len(ids)} tokens, more than max_model_len ({limit})")
        return self.core.full_logits(ids)


def _prompt_list(prompts) -> list:
    """``prompts`` as a list of prompts: one string or token-id list becomes a list of one."""
    if isinstance(prompts, str) or isinstance(prompts, torch.Tensor) and prompts.dim() == 1:
        return [prompts]
    if isinstance(prompts, (bytes, bytearray)):
        raise TypeError("prompts is bytes: decode it to str, or give a list of token ids")
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a string, a list of int token ids, or a list of those; "
                        f"got {type(prompts).__name__}")
    if prompts and isinstance(prompts[0], numbers.Number) and not isinstance(prompts[0], bool):
        return [prompts]
    return list(prompts)
