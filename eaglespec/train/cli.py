"""``eaglespec train prepare | fit | eval | all --config FILE.toml [--section.key value ...]``.

The TOML file has four sections: [target] (the model), [data] (self-distillation), [train]
(``TrainConfig``) and [eval] (tau on held-out prompts with the real engine). Any key can be
overridden on the command line, e.g. ``--train.lr 3e-4 --data.stop 2000``. Relative paths are
relative to the current directory. ``fit`` may run under torchrun (one process per GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from dataclasses import dataclass

from eaglespec.train.trainer import TrainConfig


@dataclass(slots=True)
class TargetSection:
    model: str = ""  # HF directory or .gguf file; "" = the embedded SmolLM2-135M-Instruct
    device: str = ""  # "" = cuda when present
    dtype: str = ""  # "" = bfloat16 on CUDA, float32 on CPU


@dataclass(slots=True)
class DataSection:
    # sharegpt | mtbench | self (requests the target writes itself, prompts start <= i < stop of
    # <dir>/self-prompts.jsonl, whose first `stop` are written first when missing) | a .json / .jsonl / .txt file
    source: str = "sharegpt"
    start: int = 0  # conversations start <= i < stop of the source
    stop: int = 16000
    dir: str = "runs/data"  # where prepared shards go (train.data_dir defaults to it)
    max_prompt_tokens: int = 512  # longer prompts are skipped
    max_new_tokens: int = 256
    temperature: float = 0.0
    shard_size: int = 1000
    turns: int = 1  # > 1: also answer later user turns, with the regenerated history
    seed: int = 0
    samples: int = 0  # more replies per conversation, sampled at sample_temperature (more data)
    sample_temperature: float = 0.8
    store_features: str = ""  # "" (online), "hidden" (EAGLE-1) or "taps" (EAGLE-3)
    max_batch_size: int = 256  # engine settings for the generation
    max_model_len: int = 1024
    gpu_memory_fraction: float = 0.5


@dataclass(slots=True)
class EvalSection:
    source: str = "mtbench"  # prompts (first user turns, chat template applied)
    start: int = 0
    stop: int = 80
    head: str = ""  # "" = <train.out_dir>/head
    tree: str = "dynamic:5,8,32"  # one tree spec, or several separated by ';'
    draft_vocab_size: int = 0  # tokens the head drafts over (0: its default; the target's vocabulary size: all)
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    max_batch_size: int = 64
    max_model_len: int = 2048
    gpu_memory_fraction: float = 0.5
    out: str = ""  # "" = <train.out_dir>/eval.json


@dataclass(slots=True)
class RunConfig:
    target: TargetSection
    data: DataSection
    train: TrainConfig
    eval: EvalSection


SECTIONS = {"target": TargetSection, "data": DataSection, "train": TrainConfig, "eval": EvalSection}


def _read_toml(path: str) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError as exc:
            raise ValueError("TOML configs need Python 3.11+ (tomllib) or the tomli package") from exc
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    with open(path, "rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML: {exc}") from exc


def _coerce(section: str, key: str, value, kind):
    """``value`` as the field's type (TOML gives int for 1 where a float is meant, etc.)."""
    name = f"{section}.{key}"
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        return float(value)
    if kind == tuple[int, ...]:
        if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise ValueError(f"{name} must be a list of integers, e.g. [2, 15, 29], got {value!r}")
        return tuple(value)
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    return value


def _parse_literal(text: str):
    """A command-line value: a TOML literal when it parses as one (3e-4, true, "x"), else text."""
    try:
        import tomllib
    except ImportError:
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path: str, overrides: dict[str, str] | None = None) -> RunConfig:
    """Read a TOML run config and apply ``section.key -> value`` overrides (strings)."""
    raw = _read_toml(path)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}; expected {sorted(SECTIONS)}")
    values = {name: dict(raw.get(name, {})) for name in SECTIONS}
    for dotted, text in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if section not in SECTIONS or not key:
            raise ValueError(f"override --{dotted}: use --SECTION.KEY with SECTION in {sorted(SECTIONS)}")
        kind = typing.get_type_hints(SECTIONS[section]).get(key)
        values[section][key] = text if kind is str else _parse_literal(text)
    built = {}
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(values[name]) - fields)
        if bad:
            raise ValueError(f"[{name}]: unknown key(s) {bad}; known: {sorted(fields)}")
        kwargs = {k: _coerce(name, k, v, hints[k]) for k, v in values[name].items()}
        built[name] = cls(**kwargs)
    cfg = RunConfig(**built)
    if not cfg.train.data_dir:
        cfg.train.data_dir = cfg.data.dir
    if not cfg.train.out_dir:
        raise ValueError("[train] out_dir is required")
    return cfg


# ---------------------------------------------------------------------------------------------
# Commands.
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class LoadedTarget:
    model: object  # LlamaForCausalLM
    tokenizer: object
    eos_ids: tuple[int, ...]


def load_target(section: TargetSection, device=None) -> LoadedTarget:
    """The target (weights, tokenizer, EOS ids) without a serving KV pool."""
    from eaglespec.config import EngineConfig
    from eaglespec.engine.llm import LLM

    tiny_pool = EngineConfig(num_blocks=2, max_batch_size=1, max_model_len=16, use_cuda_graphs=False)
    llm = LLM(model=section.model or None, draft="none", device=device or section.device or None,
              dtype=section.dtype or None, engine=tiny_pool, progress=True)
    return LoadedTarget(llm.model, llm.tokenizer, llm.eos_ids)


def _engine(max_batch_size: int, max_model_len: int, fraction: float):
    from eaglespec.config import EngineConfig

    return EngineConfig(max_batch_size=max_batch_size, max_model_len=max_model_len,
                        gpu_memory_fraction=fraction)


def _release(device) -> None:
    import gc

    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def run_prepare(cfg: RunConfig, target: LoadedTarget | None = None) -> dict:
    from eaglespec.engine.llm import LLM
    from eaglespec.train.data import load_conversations, prepare, prepared_summary
    from eaglespec.train.self_prompts import SELF_PROMPTS, SelfPromptSettings, write_self_prompts

    target = target or load_target(cfg.target)
    d = cfg.data
    llm = LLM.from_model(target.model, tokenizer=target.tokenizer,
                         engine=_engine(d.max_batch_size, d.max_model_len, d.gpu_memory_fraction),
                         eos_ids=target.eos_ids)
    if d.source == "self":  # written once into the data directory, reused when the run resumes
        prompts = write_self_prompts(llm, os.path.join(d.dir, SELF_PROMPTS),
                                     SelfPromptSettings(count=d.stop, seed=d.seed))
        conversations = [[p] for p in prompts[d.start:d.stop]]
    else:
        conversations = load_conversations(d.source, d.start, d.stop)
    prepare(llm, conversations, d.dir, max_prompt_tokens=d.max_prompt_tokens, max_new_tokens=d.max_new_tokens,
            temperature=d.temperature, shard_size=d.shard_size, turns=d.turns, seed=d.seed,
            store_features=d.store_features or False, samples=d.samples, sample_temperature=d.sample_temperature)
    del llm
    _release(target.model.output_weight.device)
    summary = {"data_dir": d.dir, "conversations": len(conversations), **prepared_summary(d.dir)}
    print(json.dumps(summary))
    return summary


def run_fit(cfg: RunConfig, target: LoadedTarget | None = None) -> dict:
    from eaglespec.bench.results import device_name
    from eaglespec.train.trainer import Trainer, init_distributed, plot_log

    rank, world, device = init_distributed()
    target = target or load_target(cfg.target, device=device)
    trainer = Trainer(cfg.train, target.model, progress=True)
    if rank == 0:
        size = trainer.data_size
        print(f"training {cfg.train.kind}: {size['sequences']} sequences ({size['tokens']:,} tokens, "
              f"{size['reply_tokens']:,} reply tokens), {trainer.steps_per_epoch} steps/epoch, "
              f"{trainer.total_steps} steps, {world} process(es)", file=sys.stderr)
    result = trainer.fit()
    path = trainer.export()
    if rank == 0:
        result["head"] = path
        result["data"] = trainer.data_size
        result["device"] = device_name(target.model.output_weight.device)
        log = trainer.log_path
        if log and os.path.isfile(log):
            png = os.path.splitext(log)[0] + ".png"
            result["plot"] = png if plot_log(log, png) else None
        with open(os.path.join(cfg.train.out_dir, "fit.json"), "w") as f:  # what the run trained on (data scaling)
            json.dump(result, f, indent=1)
        print(json.dumps(result))
    del trainer
    _release(target.model.output_weight.device)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return result


def run_eval(cfg: RunConfig, target: LoadedTarget | None = None) -> dict:
    from eaglespec.config import SamplingParams
    from eaglespec.models.eagle import load_head, save_acceptance
    from eaglespec.train.data import load_conversations
    from eaglespec.train.trainer import chat_prompts, evaluate_tau, speculative_llm

    target = target or load_target(cfg.target)
    e = cfg.eval
    head_path = e.head or os.path.join(cfg.train.out_dir, "head")
    head = load_head(head_path, target.model)
    conversations = [c for c in load_conversations(e.source, e.start, e.stop) if c]
    if target.tokenizer is None:
        raise ValueError("eval needs a target with a tokenizer")
    prompts = chat_prompts(target.tokenizer, [c[0] for c in conversations])
    params = SamplingParams(temperature=e.temperature, max_tokens=e.max_tokens, seed=e.seed)
    results = {}
    for tree in [t.strip() for t in e.tree.split(";") if t.strip()]:
        llm = speculative_llm(target.model, head, tree, target.tokenizer,
                              _engine(e.max_batch_size, e.max_model_len, e.gpu_memory_fraction), target.eos_ids,
                              e.draft_vocab_size or None)
        results[tree] = evaluate_tau(llm, prompts, params)
        del llm
        _release(target.model.output_weight.device)
    report = {"head": head_path, "prompts": len(prompts), "source": e.source, "max_tokens": e.max_tokens,
              "temperature": e.temperature, "draft_vocab_size": e.draft_vocab_size or head.config.draft_vocab_size,
              "results": results}
    # The run's own head keeps its greedy acceptance on its own draft vocabulary (tree="auto"'s priors).
    if e.temperature == 0 and not e.head and not e.draft_vocab_size:
        save_acceptance(head_path, {tree: r["accept_rate_per_depth"] for tree, r in results.items()},
                        {"source": e.source, "prompts": len(prompts), "max_tokens": e.max_tokens, "temperature": 0.0,
                         "draft_vocab_size": head.config.draft_vocab_size})
    out = e.out or os.path.join(cfg.train.out_dir, "eval.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report))
    return report


def run_all(cfg: RunConfig) -> dict:
    """prepare, fit and eval in one process (the target is loaded once)."""
    target = load_target(cfg.target)
    run_prepare(cfg, target)
    fit = run_fit(cfg, target)
    return {"fit": fit, "eval": run_eval(cfg, target)}


_COMMANDS = {"prepare": run_prepare, "fit": run_fit, "eval": run_eval, "all": run_all}


def _add_override_options(parser: argparse.ArgumentParser) -> None:
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"[{section}] overrides")
        for f in dataclasses.fields(cls):
            group.add_argument(f"--{section}.{f.name}", dest=f"override:{section}.{f.name}", metavar="V",
                               default=None)


def cpu_training_note(device: str) -> str | None:
    """What to expect when training runs on the CPU (said before anything loads), else None."""
    import torch

    if device.startswith("cuda") or (not device and torch.cuda.is_available()):
        return None
    return ("eaglespec train: running on the CPU (no CUDA device): fine for a small run, e.g. --data.stop 8 "
            "--data.max_new_tokens 32 --train.epochs 1 --eval.stop 2 --eval.max_tokens 16; the configs' full "
            "recipes (16,000 conversations, hours of GPU work) need a GPU")


def _dispatch(args) -> int:
    overrides = {k.split(":", 1)[1]: v for k, v in vars(args).items() if k.startswith("override:") and v is not None}
    cfg = load_config(args.config, overrides)
    cpu_note = cpu_training_note(cfg.target.device)
    if cpu_note:
        print(cpu_note, file=sys.stderr, flush=True)
    _COMMANDS[args.train_command](cfg)
    return 0


def _rank_tokens(args) -> int:
    from eaglespec.train.token_ranking import run

    run(args)
    return 0


def add_train_commands(subparsers) -> None:
    """Add ``train prepare | fit | eval | all | rank-tokens`` to an argparse sub-parser set (``eaglespec`` CLI)."""
    train = subparsers.add_parser("train", help="train EAGLE draft heads (prepare | fit | eval | all)")
    sub = train.add_subparsers(dest="train_command", required=True)
    helps = {"prepare": "regenerate replies with the target (self-distillation) into sharded files",
             "fit": "train the head (resumes from <train.out_dir>/checkpoint.pt); torchrun for several GPUs",
             "eval": "tau and acceptance per depth of the exported head with the real speculative engine",
             "all": "prepare, fit and eval in one process"}
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text + ". Override any config key with --SECTION.KEY VALUE.")
        p.add_argument("--config", required=True, help="TOML file with [target], [data], [train], [eval]")
        _add_override_options(p)
        p.set_defaults(fn=_dispatch)
    from eaglespec.train import token_ranking

    text = "rank the target's reply tokens by frequency into a head directory (reduced draft vocabularies)"
    p = sub.add_parser("rank-tokens", help=text, description=token_ranking.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    token_ranking.add_arguments(p)
    p.set_defaults(fn=_rank_tokens)
