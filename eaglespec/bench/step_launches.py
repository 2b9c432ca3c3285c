"""Kernel launches of one speculative step, counted on any device (a proxy for the GPU count).

``python -m eaglespec.bench.step_launches --trees "chain:3;dynamic:5,8,32" --batches 1,16``
builds the SmolLM2-135M shape with random weights and a random one-layer EAGLE-1 head,
prefills every row, and counts the operations of one speculative step and of one plain
decode step (Triton backend; on a CPU run it under ``TRITON_INTERPRET=1``). Each counted
aten op is about one GPU kernel launch (``topk`` is several on CUDA, views and ``empty`` are
none and are not counted) and each Triton kernel launch counts once. ``--top N`` prints the
most frequent ops of the step.
"""

from __future__ import annotations

import argparse
import collections
import json

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from eaglespec.bench.decode import PRESETS
from eaglespec.bench.spec_step import prefill_all, random_head
from eaglespec.config import EngineConfig, LlamaConfig, SamplingParams, SpecConfig
from eaglespec.engine.graphs import bucket_for
from eaglespec.engine.llm import LLM
from eaglespec.models.llama import build_model

# Ops that launch nothing on a GPU: views, metadata, allocation.
NO_KERNEL = {
    "view", "_unsafe_view", "reshape", "expand", "slice", "select", "as_strided", "t", "transpose",
    "unsqueeze", "squeeze", "permute", "detach", "alias", "empty", "empty_like", "empty_strided",
    "new_empty", "new_empty_strided", "split", "split_with_sizes", "unbind", "chunk", "narrow",
    "view_as", "lift_fresh", "_reshape_alias", "unflatten", "flatten", "diagonal", "resize_",
    "set_", "is_same_size", "_to_copy_noop", "sym_size", "sym_stride", "sym_numel", "dim",
    "is_nonzero", "_local_scalar_dense", "real", "conj", "_conj", "_neg_view", "imag",
    "expand_as", "view_as_real", "view_as_complex", "clone_noop", "movedim", "swapaxes",
}


# Composite ops that return their input unchanged when there is nothing to do.
MAYBE_ALIAS = {"to", "contiguous", "type_as", "reshape", "float", "long", "int", "bool"}


def _same_storage(out, arg) -> bool:
    if not isinstance(out, torch.Tensor) or not isinstance(arg, torch.Tensor):
        return False
    return out.untyped_storage().data_ptr() == arg.untyped_storage().data_ptr()


class LaunchCounter(TorchDispatchMode):
    """Counts aten ops that launch a kernel, and Triton kernel launches (as ``triton:<name>``).

    Ops run inside an interpreted Triton kernel (its emulation on the CPU) are not counted."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.inside_kernel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.inside_kernel:
            name = func.overloadpacket.__name__
            if name in MAYBE_ALIAS and _same_storage(out, args[0]):
                return out  # a no-op ``.to`` / ``.contiguous``: no kernel
            if name not in NO_KERNEL:
                self.counts[name] += 1
        return out

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class count_launches:
    """``with count_launches() as c: ...`` then ``c.total`` / ``c.counts``."""

    def __enter__(self) -> LaunchCounter:
        self.mode = LaunchCounter()
        self.patches = []
        try:
            from triton.runtime.interpreter import InterpretedFunction
            from triton.runtime.jit import JITFunction
        except ImportError:
            InterpretedFunction = JITFunction = None
        for cls in (InterpretedFunction, JITFunction):
            if cls is None:
                continue
            original = cls.run
            mode = self.mode

            def run(fn_self, *args, _original=original, **kwargs):
                if kwargs.get("warmup"):
                    return _original(fn_self, *args, **kwargs)
                mode.counts["triton:" + getattr(fn_self, "__name__", "kernel")] += 1
                mode.inside_kernel += 1
                try:
                    return _original(fn_self, *args, **kwargs)
                finally:
                    mode.inside_kernel -= 1

            cls.run = run
            self.patches.append((cls, original))
        self.mode.__enter__()
        return self.mode

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)
        for cls, original in self.patches:
            cls.run = original


def narrow_config(cfg: LlamaConfig, num_layers: int) -> LlamaConfig:
    """The same structure with tiny widths and ``num_layers`` layers: the launches of the real
    model are those of 2 layers plus (layers - 2) times one layer's, fast on a CPU."""
    fields = {f: getattr(cfg, f) for f in cfg.__slots__}
    fields.update(vocab_size=512, hidden_size=64, intermediate_size=128, num_heads=4,
                  num_kv_heads=2 if cfg.num_kv_heads < cfg.num_heads else 4, head_dim=16, num_layers=num_layers,
                  eagle3_layers=())
    return LlamaConfig(**fields)


def build(preset: str, device: torch.device, tree: str, max_batch: int, context: int, backend: str,
          narrow_layers: int = 0):
    cfg: LlamaConfig = PRESETS[preset]
    if narrow_layers:
        cfg = narrow_config(cfg, narrow_layers)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    target = build_model(cfg, device, dtype)
    target.init_random(seed=0)
    head = random_head(target)
    engine = EngineConfig(max_batch_size=max_batch, max_model_len=context + 128, num_blocks=max_batch * (
        (context + 128) // 16 + 2) + 2, use_cuda_graphs=False, attention_backend=backend)
    return LLM.from_model(target, draft=head, spec=SpecConfig(tree=tree), engine=engine)


def count_step(llm: LLM, batch: int, context: int, tree: str,
               sampled: bool = False) -> tuple[LaunchCounter, LaunchCounter]:
    """Counters of one speculative step and one plain decode step at ``batch`` rows, greedy or
    (``sampled``) at temperature 0.7 and top-p 0.9."""
    gen = torch.Generator().manual_seed(batch)
    vocab = llm.model.config.vocab_size
    for i in range(batch):
        params = (SamplingParams(temperature=0.7, top_p=0.9, seed=i, max_tokens=4, ignore_eos=True) if sampled
                  else SamplingParams(max_tokens=4, ignore_eos=True))
        llm.add_request(torch.randint(0, vocab, (context,), generator=gen).tolist(), params)
    reqs = prefill_all(llm, batch)
    sr = llm.speculative
    for r in reqs:
        llm.scheduler._grow(r, r.num_cached + sr.lookahead)
    bucket = bucket_for(batch, llm.runner.buckets)
    greedy = not sampled
    graphs = sr.programs[tree].graphs[greedy] if hasattr(sr, "programs") else sr.graphs[greedy]
    # Each step runs once before it is counted, as a CUDA graph is captured after warm-up runs:
    # buffers made once per batch size are not part of the replayed step.
    with torch.inference_mode():
        sr.stage_inputs(graphs, reqs, bucket)
        graphs.run(bucket)
        with count_launches() as spec_counter:
            graphs.run(bucket)
        decode = llm.runner.decode_graphs[greedy]
        llm.runner.stage_inputs(decode, reqs, bucket)
        decode.run(bucket)
        with count_launches() as decode_counter:
            decode.run(bucket)
    return spec_counter, decode_counter


def _extrapolate(two: LaunchCounter, three: LaunchCounter, layers: int) -> LaunchCounter:
    """Counts at ``layers`` layers from counts at 2 and 3 (each layer adds the same launches)."""
    out = LaunchCounter()
    for name in set(two.counts) | set(three.counts):
        out.counts[name] = two.counts[name] + (layers - 2) * (three.counts[name] - two.counts[name])
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="smollm2-135m", choices=sorted(PRESETS))
    ap.add_argument("--trees", default="chain:3;dynamic:5,8,32")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--context", type=int, default=32)
    ap.add_argument("--backend", default="triton", choices=["triton", "torch"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--top", type=int, default=0, help="print the N most frequent ops of each step")
    ap.add_argument("--narrow", action="store_true",
                    help="tiny widths, 2 and 3 layers, extrapolated to the preset's layers: the same launch "
                         "counts, fast under TRITON_INTERPRET=1")
    ap.add_argument("--sampled", action="store_true", help="count the sampled step (temperature 0.7, top-p 0.9) "
                                                             "instead of the greedy one")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    layers = PRESETS[args.preset].num_layers
    for tree in args.trees.split(";"):
        for batch in batches:
            if args.narrow:  # per-layer launches are the same at every layer: extrapolate
                two, three = (count_step(build(args.preset, device, tree, batch, args.context, args.backend, n),
                                               batch, args.context, tree, args.sampled)
                              for n in (2, 3))
                spec_c, decode_c = (_extrapolate(a, b, layers) for a, b in zip(two, three))
            else:
                spec_c, decode_c = count_step(build(args.preset, device, tree, batch, args.context, args.backend),
                                              batch, args.context, tree, args.sampled)
            row = {"tree": tree, "batch": batch, "sampled": args.sampled,
                   "step_launches": spec_c.total,
                   "decode_launches": decode_c.total, "step_ops": dict(spec_c.counts.most_common())}
            rows.append(row)
            print(f"{tree:>16s} batch {batch:3d}: step {spec_c.total:5d} launches, decode {decode_c.total:4d}",
                  flush=True)
            for name, n in spec_c.counts.most_common(args.top):
                print(f"    {n:5d}  {name}")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
