"""The paged attention kernels of whichever eaglespec is on the path, on fixed random inputs:
their outputs' digests (to compare two trees bit for bit) and their times (triton's do_bench over
a CUDA-graph replay, median, after a warm-up that brings the clocks up). Run once per tree,
interleaved (A, B, A), then `--compare` the saved digests:

    PYTHONPATH=.prev python3 benchmarks/attention_kernels_ab.py --label prev --out DIR
    PYTHONPATH=.     python3 benchmarks/attention_kernels_ab.py --label main --out DIR
    python3 benchmarks/attention_kernels_ab.py --compare DIR/prev.json DIR/main.json

Cases: prefill of SmolLM2's and Llama-3.1-8B's heads (fresh prompts, and a chunk after a cached
prefix), decode and two-pass tree attention at batch 1 and 64. A change meant to leave the
compiled kernels as they were should give identical outputs and times within the noise.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import pathlib

import torch

import eaglespec
from eaglespec.ops import attention as A
from graph_timing import graph_bench_ms  # beside this script

BLOCK = 16
HEADS = {"smollm2": (9, 3, 64), "llama8b": (32, 8, 128)}  # query heads, KV heads, head dim


def paged(batch: int, keys: int, hkv: int, d: int, gen: torch.Generator) -> tuple:
    """A bf16 cache of ``keys`` tokens per sequence in shuffled blocks, and its block tables."""
    per_seq = -(-keys // BLOCK)
    k = torch.randn(batch * per_seq, BLOCK, hkv, d, generator=gen).to("cuda", torch.bfloat16)
    v = torch.randn(batch * per_seq, BLOCK, hkv, d, generator=gen).to("cuda", torch.bfloat16)
    tables = torch.randperm(batch * per_seq, generator=gen).view(batch, per_seq).to("cuda", torch.int32)
    return k, v, tables


def cases(gen: torch.Generator) -> dict:
    """name -> a no-argument call of one kernel launcher."""
    out = {}
    for model, (hq, hkv, d) in HEADS.items():
        scale = d ** -0.5
        for batch, prefix, new in [(1, 0, 2048), (4, 0, 1024), (4, 1024, 512)]:
            k, v, tables = paged(batch, prefix + new, hkv, d, gen)
            q = torch.randn(batch * new, hq, d, generator=gen).to("cuda", torch.bfloat16)
            cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * new
            lens = torch.full((batch,), prefix + new, dtype=torch.int32, device="cuda")
            out[f"{model}-prefill-b{batch}-cached{prefix}-new{new}"] = (
                lambda q=q, k=k, v=v, t=tables, cu=cu, lens=lens, n=new, s=scale:
                A.paged_prefill_attention(q, k, v, t, cu, lens, n, s))
        for batch, context, nodes in [(1, 512, 1), (64, 512, 1), (1, 512, 16), (64, 512, 16)]:
            k, v, tables = paged(batch, context, hkv, d, gen)
            q = torch.randn(batch, nodes, hq, d, generator=gen).to("cuda", torch.bfloat16)
            lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
            if nodes == 1:
                out[f"{model}-decode-b{batch}-ctx{context}"] = (
                    lambda q=q, k=k, v=v, t=tables, lens=lens, s=scale:
                    A.paged_decode_attention(q, k, v, t, lens, s, out_dtype=torch.bfloat16)[0])
            else:
                k_tree = torch.randn(batch, nodes, hkv, d, generator=gen).to("cuda", torch.bfloat16)
                v_tree = torch.randn(batch, nodes, hkv, d, generator=gen).to("cuda", torch.bfloat16)
                chain = torch.tensor([(1 << (i + 1)) - 1 for i in range(nodes)], dtype=torch.int64)
                bits = chain.expand(batch, nodes).contiguous().to("cuda")
                out[f"{model}-tree{nodes}-b{batch}-ctx{context}"] = (
                    lambda q=q, k=k, v=v, t=tables, lens=lens, kt=k_tree, vt=v_tree, b=bits, s=scale:
                    A.two_pass_tree_attention(q, k, v, t, lens, kt, vt, b, s))
    return out


def time_us(fn) -> float:
    """Median µs of fn's CUDA-graph replay after half a second of warm-up replays (an idle GPU's
    clocks start low, and the first process of an A/B would otherwise time slower), cold L2
    before each. Eager calls timed the host: a decode case's two launches took 99-270 µs from
    one process to the next."""
    return 1000 * graph_bench_ms(fn, warmup_ms=500, rep_ms=200)


def digest(t: torch.Tensor) -> str:
    """sha256 of the tensor's bytes: equal digests, bit-for-bit equal outputs."""
    return hashlib.sha256(t.contiguous().view(torch.uint8).cpu().numpy().tobytes()).hexdigest()


def measure(label: str, out_dir: pathlib.Path) -> None:
    gen = torch.Generator().manual_seed(0)
    calls = cases(gen)
    digests = {name: digest(fn()) for name, fn in calls.items()}
    times = {name: time_us(fn) for name, fn in calls.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{label}.json").write_text(json.dumps(digests, indent=1) + "\n")
    runs = out_dir / "times.jsonl"
    with runs.open("a") as f:
        f.write(json.dumps({"label": label, "code": str(pathlib.Path(eaglespec.__file__).parent),
                            "device": torch.cuda.get_device_name(), "times_us": times}) + "\n")
    for name, us in times.items():
        print(f"{label:6s} {name:40s} {us:9.1f} us")


def compare(a: pathlib.Path, b: pathlib.Path) -> int:
    """Prints whether each case's outputs are identical; non-zero exit where any differs."""
    left, right = json.loads(a.read_text()), json.loads(b.read_text())
    if left.keys() != right.keys():
        print(f"the two runs measured different cases: {sorted(left.keys() ^ right.keys())}")
        return 1
    same = [name for name in left if left[name] == right[name]]
    for name in left:
        print(f"{name:40s} {'identical' if name in same else 'DIFFERENT'}")
    print(f"{len(same)} of {len(left)} outputs identical")
    return int(len(same) < len(left))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", help="this run's name (its outputs' digests go to OUT/LABEL.json)")
    parser.add_argument("--out", type=pathlib.Path, help="folder for the digests and times.jsonl")
    parser.add_argument("--compare", nargs=2, type=pathlib.Path, metavar=("A", "B"),
                        help="compare two runs' saved digests instead of measuring")
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    if not (args.label and args.out):
        parser.error("--label and --out are needed to measure")
    if not torch.cuda.is_available():
        parser.error("the kernels' times need a CUDA device")
    measure(args.label, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
